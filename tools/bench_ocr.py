"""The mobile-CNN quality benchmark: PaddleOCR PP-OCRv4 recogniser (rapidocr-onnxruntime) at 50%.

    python tools/bench_ocr.py [--runs global:off,lamp:off,global:on,fcpts:on] [--sparsity 0.5]
                              [--iters 60] [--batch-size 16] [--calib 256] [--test 64] [--no-refine]
                              [--json OUT]

A real pretrained mobile network (PPLCNet-style backbone: depthwise convolutions, BatchNorm
folded into the convolutions, weights in Constant nodes). Calibration and test inputs are
rendered text lines (tools/ocr_data.py; seeds 0 and 1, so the test lines are never learned
on). For each method:reconstruction pair, prints the per-time-step top-1 agreement of the
sparse model with the dense one on the test lines, the share of lines whose greedy CTC
decoding is identical, the held-out distillation KL the learner saw, and the wall time.
Needs ``pip install --no-deps rapidocr-onnxruntime==1.4.4``.
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


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort
    from learn_overrides import parse_learn_overrides
    from ocr_data import ctc_greedy, packaged_file, text_lines

    from fcpts_onnx import sparsify
    from fcpts_onnx.learner.options import LearnOptions
    from fcpts_onnx.report import describe_start_choice

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="global:off,lamp:off,global:on,fcpts:on")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--iters", type=int, default=60, help="learning steps; 0: the default time budget")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="learning batch; 0: the tool's default (64, smaller where a run sized by time needs it)")
    parser.add_argument("--calib", type=int, default=256)
    parser.add_argument("--test", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", default="best", help="fcpts start allocation (LearnOptions.init)")
    parser.add_argument("--threshold-lr", type=float, default=LearnOptions.threshold_lr)
    parser.add_argument("--final-tune", type=float, default=LearnOptions.final_tune_fraction,
                        help="share of steps with the allocation frozen (LearnOptions.final_tune_fraction)")
    parser.add_argument("--no-refine", action="store_true",
                        help="fcpts without reconstruction: skip the pair exchanges (LearnOptions.refine)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--learn", action="append", metavar="KEY=VALUE",
                        help="any LearnOptions field, for experiments (repeatable; 'none' for None)")
    args = parser.parse_args(argv)
    overrides = parse_learn_overrides(args.learn)
    model = packaged_file("rapidocr_onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx", "rapidocr-onnxruntime==1.4.4")
    if model is None:
        return 2
    test = text_lines(args.test, seed=1)
    dense = ort.InferenceSession(str(model)).run(None, {"x": test})[0]
    dense_text = ctc_greedy(dense)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "calib.npz"
        np.savez(calib, x=text_lines(args.calib, seed=0))
        out = Path(tmp) / "sparse.onnx"
        for run in args.runs.split(","):
            method, recon = run.split(":")
            start = time.perf_counter()
            report = sparsify(model, out, calib, sparsity=args.sparsity, method=method, reconstruct=recon == "on",
                              learn=LearnOptions(**{"iters": args.iters or None, "batch_size": args.batch_size or None,
                                                    "seed": args.seed, "init": args.init,
                                                    "threshold_lr": args.threshold_lr,
                                                    "final_tune_fraction": args.final_tune,
                                                    "refine": not args.no_refine, **overrides}),
                              report_path=False)
            seconds = time.perf_counter() - start
            sparse = ort.InferenceSession(str(out)).run(None, {"x": test})[0]
            row = {
                "method": method, "reconstruct": recon == "on", "sparsity": args.sparsity,
                "step_agreement": float((dense.argmax(-1) == sparse.argmax(-1)).mean()),
                "lines_identical": float(np.mean([a == b for a, b in zip(dense_text, ctc_greedy(sparse))])),
                "holdout_kl": (report.learning or {}).get("holdout_loss", {}).get("best"),
                "seconds": round(seconds, 1),
                "steps": (report.learning or {}).get("steps"),
                "batch_size": (report.learning or {}).get("batch_size"),
                "batch_choice": (report.learning or {}).get("batch_choice"),
                "notes": list(report.notes),
                "start": (report.learning or {}).get("initial_allocation"),
                "start_candidates_holdout_loss": (report.learning or {}).get("start_candidates_holdout_loss"),
                "start_trials_holdout_loss": (report.learning or {}).get("start_trials_holdout_loss"),
                "start_choice": (report.learning or {}).get("start_choice"),
                "start_choice_text": describe_start_choice(report.learning) if report.learning else "",
                "best_step": (report.learning or {}).get("best_step"),
                "holdout_curve": (report.learning or {}).get("holdout_loss", {}).get("curve"),
                # fcpts without reconstruction: the pair exchanges after the gradient steps
                "refinement": (report.learning or {}).get("refinement"),
            }
            results.append(row)
            kl = "-" if row["holdout_kl"] is None else f"{row['holdout_kl']:.3f}"
            print(f"{method:8s} recon={recon:3s}: step agreement {row['step_agreement']:.1%}, lines identical "
                  f"{row['lines_identical']:.0%}, held-out KL {kl}, {seconds:.0f} s"
                  + (f" (start {row['start']}{row['start_choice_text']}, best step {row['best_step']})" if method == "fcpts" else "")
                  + (_exchanges(row["refinement"]) if row["refinement"] else ""), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _exchanges(refined: dict) -> str:
    if "skipped" in refined:
        return f"; no pair exchanges: {refined['skipped']}"
    return (f"; pair exchanges: {refined['exchanges_kept']} of {refined['evaluations']} kept in "
            f"{refined['seconds']:.0f} s, held-out {refined['holdout_loss']['before']:.3f} -> "
            f"{refined['holdout_loss']['after']:.3f}" + ("" if refined["accepted"] else " (not used)")
            + ("" if refined["converged"] else ", stopped by the time budget"))


if __name__ == "__main__":
    sys.exit(main())
