"""How much better than LAMP can any per-layer allocation be on MNIST, without reconstruction?

    python tools/mnist_allocation_ceiling.py [--sparsity 0.7] [--search calib,half,test]
                                             [--min-t 0]

Without reconstruction a method is fully described by how many of each layer's smallest
weights it zeroes (five numbers on the bundled MNIST CNN), so a greedy search over those
counts bounds what a learned allocation can reach. Starting from LAMP's counts, the search
moves m zeros from one layer to another (m = 5%, 2%, 1%, then 0.5% of the smaller layer,
the global count exact throughout) and keeps a move when the mean KL(dense || sparse) at T=1
on its search images falls (with ``--min-t T``: falls by more than T standard errors of
the paired per-image differences). One search per ``--search`` set:

- ``calib``: the 512 calibration images, everything a learner sees (it learns on 461 of
  them); scored on the 4488 test images, it says what the calibration data can identify;
- ``half``: test images 0-2243, scored on 2244-4487 (about 4x the calibration data);
- ``test``: the 4488 test images, scored on the same images; this ceiling is optimistic
  (selected on what it is scored on) and says whether any better allocation exists at all.

Each line gives LAMP's and the searched allocation's mean KL on the scoring images and the
paired t of the difference (negative: closer to the dense model). The prunable weights are
fed to one onnxruntime session as inputs, so no model is rebuilt per candidate. About 1 to
6 minutes per search on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "mnist_cnn" / "mnist_cnn.onnx"
CALIB = ROOT / "models" / "mnist_cnn" / "calib.npz"
sys.path.insert(0, str(ROOT / "tools"))
STEPS = (0.05, 0.02, 0.01, 0.005)


class WeightsAsInputs:
    """One onnxruntime session whose prunable weights are graph inputs, fed per call."""

    def __init__(self, model: onnx.ModelProto, names: list[str]):
        model = onnx.ModelProto.FromString(model.SerializeToString())
        kept = [t for t in model.graph.initializer if t.name not in names]
        moved = {t.name: t for t in model.graph.initializer if t.name in names}
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        for name in names:
            t = moved[name]
            model.graph.input.append(onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def logp(self, weights: dict[str, np.ndarray], x: np.ndarray, batch: int = 1024) -> np.ndarray:
        import mnist_eval

        z = np.concatenate([self.session.run(None, {self.input: x[i:i + batch], **weights})[0]
                            for i in range(0, len(x), batch)])
        return mnist_eval._log_softmax(z.astype(np.float64))


def mnist_allocation(sparsity: float):
    """The bundled model, its prunable weights' names and values, the allocation problem at
    ``sparsity`` (the CLI's default bounds) and LAMP's zero counts for it."""
    from fcpts_onnx.allocation.problem import AllocationProblem
    from fcpts_onnx.allocation.registry import get_allocator
    from fcpts_onnx.discovery import discover
    from fcpts_onnx.masks import magnitude
    from fcpts_onnx.onnx_io import load_model

    loaded = load_model(MODEL)
    names = [w.name for w in discover(loaded.model).weights]
    originals = {t.name: numpy_helper.to_array(t) for t in loaded.model.graph.initializer if t.name in names}
    problem = AllocationProblem([magnitude(originals[n]) for n in names], [originals[n].shape for n in names],
                                sparsity, 0.98)
    lamp = np.asarray(get_allocator("lamp")(problem), dtype=np.int64)
    return loaded.model, names, originals, problem, lamp


def per_image_kl(dense_logp: np.ndarray, logq: np.ndarray) -> np.ndarray:
    return np.sum(np.exp(dense_logp) * (dense_logp - logq), axis=1)


def paired_t(diff: np.ndarray) -> float:
    se = diff.std(ddof=1) / np.sqrt(diff.size)
    return float(diff.mean() / se) if se > 0 else 0.0


def main(argv: list[str] | None = None) -> int:
    import mnist_eval

    from fcpts_onnx.masks import zero_smallest

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--search", default="calib,half,test", help="comma-separated: calib, half, test")
    parser.add_argument("--min-t", type=float, default=0.0, help="keep a move only if it lowers the search "
                        "images' KL by more than this many standard errors (0: any decrease)")
    args = parser.parse_args(argv)

    model, names, originals, problem, lamp = mnist_allocation(args.sparsity)
    session = WeightsAsInputs(model, names)

    with np.load(mnist_eval.DEFAULT_EVAL_NPZ) as data:
        test = mnist_eval.preprocess(data["images"]).astype(np.float32)
    with np.load(CALIB) as data:
        calib = data[list(data.keys())[0]].astype(np.float32)
    half = len(test) // 2
    sets = {"calib": (calib, test), "half": (test[:half], test[half:]), "test": (test, test)}

    def weights(counts: np.ndarray) -> dict[str, np.ndarray]:
        return {n: zero_smallest(originals[n], int(k)) for n, k in zip(names, counts)}

    dense_cache: dict[int, np.ndarray] = {}

    def kl(counts: np.ndarray, x: np.ndarray) -> np.ndarray:
        if id(x) not in dense_cache:
            dense_cache[id(x)] = session.logp(originals, x)
        return per_image_kl(dense_cache[id(x)], session.logp(weights(counts), x))

    def sparsities(counts: np.ndarray) -> str:
        return " / ".join(f"{k / n:.3f}" for k, n in zip(counts, problem.sizes))

    print(f"{args.sparsity:.0%} without reconstruction; layers {', '.join(names)}")
    print(f"LAMP's allocation: {sparsities(lamp)}")
    for key in args.search.split(","):
        if key not in sets:
            parser.error(f"--search {key!r}: choose from {', '.join(sets)}")
        search, score = sets[key]
        current, current_kl = lamp.copy(), kl(lamp, search)
        for fraction in STEPS:
            moved = True
            while moved:
                moved = False
                for i in range(len(names)):
                    for j in range(len(names)):
                        m = int(fraction * min(problem.sizes[i], problem.sizes[j]))
                        if i == j or m == 0:
                            continue
                        candidate = current.copy()
                        candidate[i] += m
                        candidate[j] -= m
                        if candidate[i] > problem.caps[i] or candidate[j] < problem.floors[j]:
                            continue
                        trial = kl(candidate, search)
                        diff = trial - current_kl
                        if diff.mean() < 0 and -paired_t(diff) > args.min_t:
                            current, current_kl, moved = candidate, trial, True
        base, found = kl(lamp, score), kl(current, score)
        print(f"search on {key} ({len(search)} images), scored on {len(score)}: {sparsities(current)}; "
              f"search-set KL {kl(lamp, search).mean():.5f} -> {current_kl.mean():.5f}; "
              f"scored KL LAMP {base.mean():.5f}, searched {found.mean():.5f} "
              f"({found.mean() / base.mean() - 1:+.1%}, t = {paired_t(found - base):+.2f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
