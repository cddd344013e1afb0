"""A scikit-learn MLP exported by skl2onnx, sparsified on real digits.

    python tools/bench_sklearn.py [--sparsity 0.9,0.95] [--runs fcpts:on,lamp:on,global:on]
                                  [--seeds 0,1,2] [--no-bias-tuning]

The model and the digits are tests/data/skl2onnx (tools/export_sklearn.py): an MLPClassifier
(64 -> 64 -> 32 -> 10) trained on all 1797 of scikit-learn's 8x8 digits. A fixed permutation
(seed 0) gives 512 calibration images and 1285 test images; the classifier was trained on
those too, so the test accuracy says how much of the dense model's (100%) the sparse one
keeps, and the KL of its class distribution from the dense one's says it continuously.
``--no-bias-tuning`` leaves the layers' [1, N] intercepts as constants, as the trainable form
did before it read them as biases.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from bench_orientation import kl  # noqa: E402  (mean KL of class distributions)

DATA = ROOT / "tests" / "data" / "skl2onnx"
MODEL = DATA / "mlp_digits_nozipmap.onnx"


def split() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(calibration images, test images, test labels), pixels / 16 as the model was trained."""
    with np.load(DATA / "digits.npz") as data:
        x, y = data["pixels"].astype(np.float32) / 16, data["labels"]
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    return x[:512], x[512:], y[512:]


def predict(path: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    labels, probabilities = session.run(["label", "probabilities"], {"X": x})
    return labels, probabilities


def main(argv: list[str] | None = None) -> int:
    from fcpts_onnx import sparsify
    from fcpts_onnx.learner.options import LearnOptions

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsity", default="0.9,0.95")
    parser.add_argument("--runs", default="fcpts:on,lamp:on,global:on")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--no-bias-tuning", action="store_true")
    args = parser.parse_args(argv)
    if args.no_bias_tuning:
        import fcpts_onnx.torchform.module as module

        module._output_shape = lambda *a: None  # no linear layer's output shape: no [1, N] bias recognised
    calib, test_x, test_y = split()
    dense_labels, dense_p = predict(MODEL, test_x)
    print(f"dense: accuracy {np.mean(dense_labels == test_y):.2%} on {len(test_y)} test digits")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sparse.onnx"
        for sparsity in (float(s) for s in args.sparsity.split(",")):
            for run in args.runs.split(","):
                method, recon = run.split(":")
                seeds = [int(s) for s in args.seeds.split(",")] if method == "fcpts" or recon == "on" else [0]
                accuracy, kls = [], []
                for seed in seeds:
                    sparsify(MODEL, out, {"X": calib}, sparsity=sparsity, method=method, reconstruct=recon == "on",
                             learn=LearnOptions(seed=seed), report_path=False)
                    labels, p = predict(out, test_x)
                    accuracy.append(float(np.mean(labels == test_y)))
                    kls.append(kl(dense_p, p))
                print(f"{sparsity:.0%} {method:7s} reconstruction {recon:3s}: accuracy {np.mean(accuracy):.2%} "
                      f"({min(accuracy):.2%}-{max(accuracy):.2%}), KL {np.mean(kls):.4f} "
                      f"({min(kls):.4f}-{max(kls):.4f}) over seeds {seeds}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
