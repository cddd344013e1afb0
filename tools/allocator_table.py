"""MNIST accuracy of every data-free allocator at several sparsities (the foundation's table).

    python tools/allocator_table.py [--sparsities 0.5,0.7,0.8,0.9] [--json OUT]

Runs fcpts_onnx.sparsify on the bundled MNIST CNN with its calibration split and measures
top-1 accuracy on the 4488-image labelled evaluation split with onnxruntime.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
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
    from fcpts_onnx import sparsify
    from fcpts_onnx.allocation import ALLOCATORS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", default="0.5,0.7,0.8,0.9")
    parser.add_argument("--methods", default=",".join(sorted(ALLOCATORS)))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    methods = args.methods.split(",")
    evaluate = _mnist_eval().evaluate

    results = {"dense": evaluate(MODEL)}
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            for s in sparsities:
                out = Path(tmp) / f"{method}_{s}.onnx"
                report = sparsify(MODEL, out, CALIB, sparsity=s, method=method, report_path=False)
                results[f"{method}@{s}"] = evaluate(out)
                assert report.zero_params == report.required_zeros
    header = "| method | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |"
    print(f"dense accuracy: {results['dense']:.2%}")
    print(header)
    print("|" + " --- |" * (len(sparsities) + 1))
    for method in methods:
        print(f"| {method} | " + " | ".join(f"{results[f'{method}@{s}']:.2%}" for s in sparsities) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
