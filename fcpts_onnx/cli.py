"""Command line: argparse -> options -> the same functions the Python API exposes."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .allocation import ALLOCATORS
from .api import default_output_path, default_report_path, run
from .config import SparsifyOptions
from .errors import FcptsError, OptionError
from .images import ImageFolder
from .inspection import format_inspection, inspect_model
from .learner.options import (
    CONSTRAINTS,
    DEFAULT_BATCH,
    DEFAULT_ITERS,
    DEFAULT_TIME_BUDGET,
    INITS,
    LOSS_KINDS,
    MIN_AUTO_BATCH,
    PENALTY_THRESHOLD_LR,
    PROJECTED_THRESHOLD_LR,
    LearnOptions,
)
from .report import jsonable


def _op_types(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _shape(text: str) -> tuple[str, tuple[int, ...]]:
    name, sep, dims = text.rpartition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, tuple(int(d) for d in dims.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=D0,D1,... (e.g. input=1,3,224,224), got {text!r}") from None


def _batch_axis(text: str) -> tuple[str, int]:
    name, sep, axis = text.rpartition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, int(axis)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=AXIS (e.g. state=1), got {text!r}") from None


def _hw(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.lower().replace("x", ",").split(",")]
        if len(parts) == 1:
            parts = parts * 2
        if len(parts) != 2 or min(parts) < 1:
            raise ValueError
        return parts[0], parts[1]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW such as 224x224 (or one number), got {text!r}") from None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _sparsity(text: str) -> float:
    try:
        value = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number such as 0.8 or 80%, got {text!r}") from None
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fcpts-onnx", description="Post-training sparsity for exported ONNX models.")
    parser.add_argument("--version", action="version", version=f"fcpts-onnx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    opt = sub.add_parser("optimize", help="sparsify a model to an exact global sparsity",
                         description="Sparsify MODEL to an exact global sparsity, write a verified copy "
                                     "and a report.")
    opt.add_argument("model", help="input ONNX model (never modified)")
    opt.add_argument("--sparsity", type=_sparsity, default=0.8,
                     help="global target: fraction of zeros over all prunable weights, e.g. 0.8 or 80%% "
                          "(default 0.8)")
    opt.add_argument("--calib", metavar="PATH",
                     help=".npz (keys = input names, first axis = sample) or .npy (single input); "
                          "without it, verification runs on generated inputs")
    opt.add_argument("-o", "--output", metavar="PATH", help="output model (default MODEL.sparse.onnx)")
    opt.add_argument("--method", default=None, choices=["fcpts", *sorted(ALLOCATORS)],
                     help="fcpts (learned; default when --calib is given) or a data-free allocator "
                          "(default global without --calib)")
    opt.add_argument("--reconstruct", action=argparse.BooleanOptionalAction, default=None,
                     help="tune surviving weights, biases and norm parameters on the calibration data "
                          "(default: on for fcpts, off for data-free methods)")
    opt.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                     help="keep weights whose name or node name matches REGEX dense (repeatable)")
    opt.add_argument("--op-types", type=_op_types, metavar="OPS",
                     help="comma list of op types to prune (default Conv,ConvTranspose,Gemm,MatMul,LSTM,GRU,RNN)")
    opt.add_argument("--max-layer-sparsity", type=float, default=0.98, metavar="F",
                     help="no layer pruned beyond this fraction (default 0.98)")
    opt.add_argument("--plot", nargs="?", const=True, metavar="PNG",
                     help="draw the per-layer allocation (default OUTPUT stem + .allocation.png)")
    images = opt.add_argument_group("image folder calibration (--calib DIR)")
    images.add_argument("--resize", type=int, metavar="N", help="resize the shorter side to N, then centre-crop")
    images.add_argument("--crop", type=_hw, metavar="HxW", help="crop size (default: the model's input size)")
    images.add_argument("--mean", type=_floats, default=(0.0,), metavar="M[,M,M]",
                        help="subtracted after scaling, per channel (e.g. 0.485,0.456,0.406)")
    images.add_argument("--std", type=_floats, default=(1.0,), metavar="S[,S,S]",
                        help="divides after the mean, per channel (e.g. 0.229,0.224,0.225)")
    images.add_argument("--scale", type=float, default=1 / 255, help="multiplies 0..255 pixels first (default 1/255)")
    images.add_argument("--layout", choices=("NCHW", "NHWC"), help="default: guessed from the input shape")
    images.add_argument("--channel-order", choices=("RGB", "BGR"), default="RGB")
    images.add_argument("--max-images", type=int, metavar="N", help="use at most N images")
    learn = opt.add_argument_group("learning (fcpts and --reconstruct)")
    learn.add_argument("--iters", type=int, help=f"optimisation steps (default: {DEFAULT_ITERS}, or as many "
                       f"as fit in {DEFAULT_TIME_BUDGET:.0f} s if fewer)")
    learn.add_argument("--time-budget", type=float, metavar="SECONDS",
                       help="size the learning stage to take about this long, from a measured step time")
    learn.add_argument("--batch-size", type=int,
                       help=f"calibration samples per learning step and per onnxruntime run (default "
                            f"{DEFAULT_BATCH}; a run sized by time learns on a smaller batch, down to "
                            f"{MIN_AUTO_BATCH}, where {DEFAULT_BATCH} would fit fewer than {DEFAULT_ITERS} steps)")
    learn.add_argument("--lr", type=float, default=LearnOptions.lr,
                       help=f"learning rate of weights, biases, norms (default {LearnOptions.lr:g})")
    learn.add_argument("--threshold-lr", type=float, default=None,
                       help=f"step size of the log-thresholds (default {PROJECTED_THRESHOLD_LR:g}; "
                            f"Adam's learning rate with --constraint penalty, default {PENALTY_THRESHOLD_LR:g})")
    learn.add_argument("--lambda", dest="lambda_", type=float, default=LearnOptions.lambda_,
                       help=f"weight of the global sparsity constraint (default {LearnOptions.lambda_:g})")
    learn.add_argument("--constraint", choices=CONSTRAINTS, default=LearnOptions.constraint,
                       help="projected: allocation moves on the target surface (default); penalty: the "
                            "reference's L_rec + lambda * |s - S|")
    learn.add_argument("--init", choices=INITS, default=LearnOptions.init,
                       help="fcpts starting allocation; best (default) picks the data-free allocation "
                            "with the lowest held-out loss, and with reconstruction lets short trial runs "
                            "from each (the run's own first steps) overturn that choice where they beat it clearly")
    learn.add_argument("--no-refine", dest="refine", action="store_false",
                       help="fcpts without reconstruction: skip the pair exchanges of zeros between layers "
                            "that follow the gradient steps (on by default where one sweep over all pairs fits in 30%% of "
                            "the time budget, and they take up to that)")
    learn.add_argument("--temperature", type=float, default=LearnOptions.temperature,
                       help=f"distillation temperature on logits (default {LearnOptions.temperature:g})")
    learn.add_argument("--loss", choices=LOSS_KINDS, default="auto",
                       help="reconstruction loss: auto (KL on logits, NMSE otherwise), kl, nmse, or nmse-channel "
                            "(NMSE per channel on axis 1, channels averaged: for outputs that mix scales, such as "
                            "a detection head's box coordinates beside class scores)")
    learn.add_argument("--class-axis", type=int, metavar="AXIS",
                       help="output axis holding class scores, e.g. 1 for segmentation [N, classes, H, W]: "
                            "KL and top-1 along it, per position (default: last axis of softmax outputs, "
                            "axis 1 of 2-D logits)")
    learn.add_argument("--holdout", type=float, default=0.1,
                       help="fraction of calibration samples never learned on (default 0.1)")
    learn.add_argument("--seed", type=int, default=0, help="seed of batch order and subsamples (default 0)")
    learn.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    learn.add_argument("--max-memory", metavar="SIZE",
                       help="memory a learning step may take, e.g. 8G; the batch shrinks to fit, and models "
                            "whose declared shapes need more are refused (default: 80%% of free memory)")
    opt.add_argument("--shape", type=_shape, action="append", default=[], metavar="NAME=DIMS",
                     help="full shape of a generated input with dynamic dims, e.g. input=8,3,224,224")
    opt.add_argument("--batch-axis", type=_batch_axis, action="append", default=[], metavar="NAME=AXIS",
                     help="the axis of input NAME that holds the samples, where the graph does not say "
                          "(a streaming state [2, batch, 128]: state=1); calibration data for it is given "
                          "that way too")
    ext = opt.add_mutually_exclusive_group()
    ext.add_argument("--external-data", dest="external_data", action="store_true", default=None,
                     help="store tensors in OUTPUT.data (default: as the input does)")
    ext.add_argument("--no-external-data", dest="external_data", action="store_false",
                     help="store tensors inside the .onnx file")
    rep = opt.add_mutually_exclusive_group()
    rep.add_argument("--report", metavar="PATH", help="JSON report (default OUTPUT stem + .report.json)")
    rep.add_argument("--no-report", action="store_true", help="write no JSON report")
    opt.add_argument("--store", choices=("dense", "sparse"), default="dense",
                     help="sparse: write pruned weights as ONNX sparse tensors (graph.sparse_initializer) where "
                          "that is smaller (default dense)")
    opt.add_argument("--bench", action="store_true",
                     help="benchmark input vs output at the end (onnxruntime, deepsparse if set up; batch 1 and 16, "
                          "about 1 s per case) and add the figures to the report")
    opt.add_argument("--json", action="store_true", help="print the JSON report on stdout instead of the table")
    opt.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")

    from .bench.cli import add_bench_parser

    add_bench_parser(sub, _shape)

    ins = sub.add_parser("inspect", help="show prunable layers, storage, sparsity and MACs",
                         description="Show what fcpts-onnx finds in MODEL.")
    ins.add_argument("model", help="ONNX model")
    ins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ins.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                     help="as in optimize: show these weights as skipped")
    ins.add_argument("--op-types", type=_op_types, metavar="OPS", help="as in optimize")
    ins.add_argument("--parity", action="store_true",
                     help="build the trainable form and compare it with onnxruntime (exit 1 if it differs)")
    ins.add_argument("--calib", metavar="PATH", help="with --parity: data to compare on (default generated)")
    ins.add_argument("--device", default="cpu", help="with --parity: cpu or cuda (default cpu)")
    ins.add_argument("--shape", type=_shape, action="append", default=[], metavar="NAME=DIMS",
                     help="pin a dynamic input's shape to count MACs, e.g. x=1,3,224,224")
    ins.add_argument("--batch-axis", type=_batch_axis, action="append", default=[], metavar="NAME=AXIS",
                     help="with --parity: as in optimize")
    return parser


def _optimize(args: argparse.Namespace) -> int:
    shapes = dict(args.shape)
    if shapes and args.calib and args.calib != "random":  # --calib random generates its inputs: sizes apply
        raise OptionError("--shape sizes generated inputs; with --calib the data gives the shapes, drop --shape")
    learn = LearnOptions(
        iters=args.iters, batch_size=args.batch_size, lr=args.lr, threshold_lr=args.threshold_lr,
        lambda_=args.lambda_, constraint=args.constraint, init=args.init, temperature=args.temperature, seed=args.seed, time_budget=args.time_budget,
        loss=args.loss, class_axis=args.class_axis, refine=args.refine,
    )
    options = SparsifyOptions(
        sparsity=args.sparsity, method=args.method,
        batch_size=args.batch_size if args.batch_size is not None else DEFAULT_BATCH, nodes_to_exclude=tuple(args.exclude),
        op_types=args.op_types, max_layer_sparsity=args.max_layer_sparsity,
        external_data=args.external_data, reconstruct=args.reconstruct, holdout=args.holdout,
        device=args.device, learn=learn, store=args.store, max_memory=args.max_memory,
        batch_axes=dict(args.batch_axis),
    )
    report_path = False if args.no_report else args.report
    calib = args.calib
    if calib and Path(calib).is_dir():
        calib = ImageFolder(calib, resize=args.resize, crop=args.crop, mean=args.mean, std=args.std,
                            scale=args.scale, layout=args.layout, channel_order=args.channel_order,
                            limit=args.max_images)
    plot_path = None
    if args.plot:
        output = Path(args.output) if args.output else default_output_path(args.model)
        plot_path = Path(output.with_name(output.stem + ".allocation.png") if args.plot is True else args.plot)
        if not plot_path.parent.is_dir():
            raise OptionError(f"{plot_path.parent}: plot folder does not exist; create it or choose another --plot")
    report = run(args.model, args.output, calib, options, input_shapes=shapes or None,
                 report_path=report_path, quiet=args.quiet or args.json)
    if args.bench:
        from .bench.cli import bench_into_report

        bench_into_report(report, args, report_path)
    if plot_path is not None:
        from .plots import plot_allocation

        plot_allocation(report, plot_path)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    elif not args.quiet:
        print(report.format_table())
        if report_path is not False:
            print(f"report: {args.report or default_report_path(report.output_path)}")
        if plot_path is not None:
            print(f"plot: {plot_path}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    if args.parity:
        from .inspection import format_parity, inspect_parity

        info = inspect_parity(args.model, args.calib, device=args.device, input_shapes=dict(args.shape) or None,
                              batch_axes=dict(args.batch_axis))
        print(json.dumps(jsonable(info), indent=2) if args.json else format_parity(info))
        return 0 if info["parity"]["passed"] else 1
    if args.calib:
        raise OptionError("--calib is used by inspect only with --parity")
    info = inspect_model(args.model, nodes_to_exclude=tuple(args.exclude), op_types=args.op_types,
                         input_shapes=dict(args.shape) or None)
    print(json.dumps(jsonable(info), indent=2) if args.json else format_inspection(info))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "bench":
            from .bench.cli import run_bench

            return run_bench(args)
        return {"optimize": _optimize, "inspect": _inspect}[args.command](args)
    except FcptsError as exc:
        print(f"fcpts-onnx: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("fcpts-onnx: interrupted; no output was written", file=sys.stderr)
        return 130
    except MemoryError:
        print("fcpts-onnx: error: out of memory; no output was written; lower --max-memory or --batch-size, "
              "or free memory", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug in the tool: still one line, and the way to the traceback
        if os.environ.get("FCPTS_ONNX_DEBUG"):
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        print(f"fcpts-onnx: internal error: {type(exc).__name__}: {first}; no output was written. This is a "
              "bug in fcpts-onnx: rerun with FCPTS_ONNX_DEBUG=1 for the traceback and report it", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
