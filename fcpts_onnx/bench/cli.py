"""``fcpts-onnx bench`` and ``optimize --bench``: argparse in, benchmark(), table/JSON/PNG out."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from ..errors import FcptsError, OptionError
from ..report import jsonable
from .core import DEFAULT_BATCHES, bench_optimized, benchmark
from .runners import ENV_PYTHON, RUNTIMES
from .timing import Budget


def _batches(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(p) for p in text.split(",") if p.strip())
        if not values or min(values) < 1:
            raise ValueError
        return values
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected positive batch sizes such as 1,16, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def add_bench_parser(sub, shape_type: Callable) -> argparse.ArgumentParser:
    b = sub.add_parser(
        "bench", help="time dense vs sparse models on onnxruntime and DeepSparse; sizes and MACs",
        description="Time each model on each runtime at each batch size (latency median/p90/p99, items/s, "
                    "speedup vs the first model, which is the dense reference), and report file/zip/"
                    "sparse_initializer sizes and MACs. Exit status 1 when a case failed.")
    b.add_argument("models", nargs="+", metavar="MODEL", help="DENSE.onnx first, then the models to compare")
    b.add_argument("--batch", type=_batches, default=DEFAULT_BATCHES, metavar="B[,B...]",
                   help="batch sizes (default 1,16)")
    b.add_argument("--runtime", type=_names, metavar="NAMES",
                   help=f"comma list from {','.join(RUNTIMES)} (default: onnxruntime, onnxruntime-cuda when a GPU "
                        "provider is present, deepsparse when set up)")
    b.add_argument("--threads", type=int, metavar="N", help="threads/cores per runtime (default: runtime's own)")
    budget = b.add_mutually_exclusive_group()
    budget.add_argument("--iterations", type=int, metavar="N", help="timed runs per case")
    budget.add_argument("--time", type=float, metavar="S", help="seconds of timed runs per case (default 5)")
    b.add_argument("--warmup", type=int, default=3, metavar="N", help="untimed runs before timing (default 3)")
    b.add_argument("--shape", type=shape_type, action="append", default=[], metavar="NAME=DIMS",
                   help="full shape of an input with dynamic dims, e.g. x=1,3,224,224 (batch from --batch)")
    b.add_argument("--calib", metavar="PATH",
                   help=".npz/.npy inputs (first axis = sample), repeated or cut to each batch size")
    b.add_argument("--deepsparse-python", metavar="PATH",
                   help=f"interpreter of the DeepSparse venv (default ${ENV_PYTHON}, else .venv-deepsparse)")
    b.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT ('-' for stdout)")
    b.add_argument("--plot", metavar="PNG", help="draw speedup per batch size and runtime")
    b.add_argument("--markdown", action="store_true", help="print markdown tables instead of plain text")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    return b


def _check_out(path: str | None, what: str) -> None:
    if path and path != "-":
        parent = Path(path).parent
        if not parent.is_dir():
            raise OptionError(f"{parent}: {what} folder does not exist; create it or choose another path")
        if Path(path).is_dir():
            raise OptionError(f"{path}: is a folder; give a file name")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OptionError(f"{parent}: {what} folder is not writable")


def _progress(quiet: bool) -> Callable[[str], None] | None:
    if quiet:
        return None
    return lambda msg: print(f"bench: {msg}", file=sys.stderr, flush=True)


def run_bench(args: argparse.Namespace) -> int:
    _check_out(args.json, "--json")
    _check_out(args.plot, "--plot")
    if args.iterations is not None:
        budget = Budget(warmup=args.warmup, iterations=args.iterations, seconds=None)
    else:
        budget = Budget(warmup=args.warmup, seconds=args.time if args.time is not None else 5.0)
    result = benchmark(
        args.models, batch_sizes=args.batch, runtimes=args.runtime, threads=args.threads, budget=budget,
        input_shapes=dict(args.shape) or None, calibration=args.calib, deepsparse_python=args.deepsparse_python,
        progress=_progress(args.quiet or args.json == "-"),
    )
    data = jsonable(result.to_dict())
    if args.plot:
        from .plot import plot_speedups

        plot_speedups(data, args.plot)
    if args.json == "-":
        print(json.dumps(data, indent=2))
    else:
        if args.json:
            tmp = Path(args.json).with_name(f".{Path(args.json).name}.tmp-{os.getpid()}")
            try:
                tmp.write_text(json.dumps(data, indent=2) + "\n")
                os.replace(tmp, args.json)
            finally:
                tmp.unlink(missing_ok=True)
        print(result.format_markdown() if args.markdown else result.format_table())
        if args.json:
            print(f"json: {args.json}")
        if args.plot:
            print(f"plot: {args.plot}")
    return 1 if result.failed else 0


def bench_into_report(report, args: argparse.Namespace, report_path) -> None:
    """``optimize --bench``: time input vs output, store the figures under the report's "bench" key."""
    from ..api import default_report_path

    calib = args.calib if args.calib and Path(args.calib).suffix in (".npz", ".npy") else None
    try:
        result = bench_optimized(report.input_path, report.output_path, input_shapes=dict(args.shape) or None,
                                 calibration=calib, progress=_progress(args.quiet or args.json))
        report.bench = result.to_dict()
    except FcptsError as exc:
        report.notes.append(f"--bench did not run: {exc}")
    if report_path is not False:
        report.write_json(args.report or default_report_path(report.output_path))
