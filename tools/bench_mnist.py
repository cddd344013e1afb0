"""The MNIST quality benchmark: every method, with and without reconstruction, at several sparsities.

    python tools/bench_mnist.py [--sparsities 0.7,0.8,0.9] [--methods fcpts,lamp,global,erk,uniform]
                                [--iters N] [--seeds 0,1,2] [--json OUT]

Bundled MNIST CNN (digit-recognizer-py), 512 calibration images (10% held out from
learning), top-1 accuracy on the other 4488 labelled images with onnxruntime. Prints a
markdown table (method x sparsity, reconstruction off/on) and the wall time of each run.
With several ``--seeds`` (the learner's batch order and subsamples), each learned cell is the
mean accuracy over seeds with its range; data-free runs without reconstruction use no seed and
run once. One image of 4488 is 0.022%, so near the dense accuracy a second table gives the
test log-loss (mean cross-entropy of the labels), which moves continuously, and a third the
KL divergence from the dense model's outputs on the same images (fidelity, the learner's
objective; log-loss can go below the dense model's, KL cannot go below 0).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "mnist_cnn" / "mnist_cnn.onnx"
CALIB = ROOT / "models" / "mnist_cnn" / "calib.npz"


def _mnist_eval():
    spec = importlib.util.spec_from_file_location("mnist_eval", ROOT / "tools" / "mnist_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    from learn_overrides import parse_learn_overrides

    from fcpts_onnx import sparsify
    from fcpts_onnx.learner.options import LearnOptions

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", default="0.7,0.8,0.9")
    parser.add_argument("--methods", default="fcpts,lamp,global,erk,uniform")
    parser.add_argument("--reconstruct", default="off,on", help="off, on, or off,on")
    parser.add_argument("--iters", type=int)
    parser.add_argument("--seeds", default="0", help="learner seeds, e.g. 0,1,2")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--learn", action="append", metavar="KEY=VALUE",
                        help="any LearnOptions field, for experiments (repeatable; 'none' for None)")
    args = parser.parse_args(argv)
    overrides = parse_learn_overrides(args.learn)
    mnist_eval = _mnist_eval()
    sparsities = [float(s) for s in args.sparsities.split(",")]
    methods = args.methods.split(",")
    recon_modes = [m == "on" for m in args.reconstruct.split(",")]
    dense = mnist_eval.fidelity(MODEL, MODEL)
    results = {"dense": dense["accuracy"], "dense_nll": dense["nll"], "runs": []}
    seeds = [int(x) for x in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            for recon in recon_modes:
                learned = recon or method == "fcpts"
                for s in sparsities:
                    for seed in seeds if learned else seeds[:1]:
                        out = Path(tmp) / "m.onnx"
                        start = time.perf_counter()
                        report = sparsify(MODEL, out, CALIB, sparsity=s, method=method, reconstruct=recon,
                                          learn=LearnOptions(**{"iters": args.iters, "seed": seed, **overrides}), report_path=False)
                        seconds = time.perf_counter() - start
                        test = mnist_eval.fidelity(out, MODEL)
                        acc = test["accuracy"]
                        fid = report.fidelity[0]
                        learning = report.learning or {}
                        results["runs"].append({"method": method, "reconstruct": recon, "sparsity": s, "seed": seed,
                                                "accuracy": acc, "test_nll": test["nll"],
                                                "test_agreement": test["agreement"], "test_kl": test["kl"],
                                                "seconds": round(seconds, 1),
                                                "holdout_top1": fid["top1_agreement"], "holdout_kl": fid["kl"],
                                                "start": learning.get("initial_allocation"),
                                                "start_choice": learning.get("start_choice"),
                                                "start_trials_holdout_loss": learning.get("start_trials_holdout_loss")})
                        print(f"{method:8s} recon={'on ' if recon else 'off'} {s:.0%} seed {seed}: accuracy {acc:.2%} "
                              f"(test NLL {test['nll']:.4f}, KL to dense {test['kl']:.5f}) "
                              f"(held-out top-1 agreement {fid['top1_agreement']:.2%}, KL {fid['kl']:.5f}, "
                              f"{seconds:.1f} s){_start(learning)}", flush=True)
    print(f"\ndense accuracy: {results['dense']:.2%}\n")
    _table(results["runs"], methods, recon_modes, sparsities, "accuracy", "{:.2%}")
    print("\nTest log-loss (mean cross-entropy of the 4488 labels; dense "
          f"{results['dense_nll']:.4f}), lower is better:\n")
    _table(results["runs"], methods, recon_modes, sparsities, "test_nll", "{:.4f}")
    print("\nFidelity: KL(dense || sparse) of the output distributions on the 4488 test images "
          "(T=1), lower is better:\n")
    _table(results["runs"], methods, recon_modes, sparsities, "test_kl", "{:.5f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _start(learning: dict) -> str:
    """fcpts's start and how it was chosen, as the CLI report says it; empty for other methods."""
    from fcpts_onnx.report import describe_start_choice

    if learning.get("method") != "fcpts":
        return ""
    return f", start {learning['initial_allocation']}{describe_start_choice(learning)}"


def _table(runs: list[dict], methods, recon_modes, sparsities, key: str, fmt: str) -> None:
    """Markdown: method x reconstruction rows, one column per sparsity; mean (range) over seeds."""
    print("| method | reconstruction | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |")
    print("|---|---|" + "---|" * len(sparsities))
    for method in methods:
        for recon in recon_modes:
            cells = []
            for s in sparsities:
                values = [r[key] for r in runs
                          if r["method"] == method and r["reconstruct"] == recon and r["sparsity"] == s]
                mean = sum(values) / len(values)
                spread = f" ({fmt.format(min(values))}-{fmt.format(max(values))})" if len(values) > 1 else ""
                cells.append(fmt.format(mean) + spread)
            print(f"| {method} | {'on' if recon else 'off'} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
