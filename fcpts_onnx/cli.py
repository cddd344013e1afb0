"""Command line: argparse -> options -> the same functions the Python API exposes."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from . import __version__
from .allocation import ALLOCATORS
from .api import run
from .config import SparsifyOptions
from .errors import FcptsError, OptionError
from .inspection import format_inspection, inspect_model
from .learner.options import DEFAULT_ITERS, LOSS_KINDS, LearnOptions


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
                     help="comma list of op types to prune (default Conv,ConvTranspose,Gemm,MatMul)")
    opt.add_argument("--max-layer-sparsity", type=float, default=0.98, metavar="F",
                     help="no layer pruned beyond this fraction (default 0.98)")
    learn = opt.add_argument_group("learning (fcpts and --reconstruct)")
    learn.add_argument("--iters", type=int, help=f"optimisation steps (default {DEFAULT_ITERS}, or sized by "
                                                  "--time-budget)")
    learn.add_argument("--time-budget", type=float, metavar="SECONDS",
                       help="size the run to take about this long, from a measured step time")
    learn.add_argument("--batch-size", type=int, default=LearnOptions.batch_size,
                       help=f"calibration samples per step (default {LearnOptions.batch_size})")
    learn.add_argument("--lr", type=float, default=LearnOptions.lr,
                       help=f"learning rate of weights, biases, norms (default {LearnOptions.lr:g})")
    learn.add_argument("--threshold-lr", type=float, default=LearnOptions.threshold_lr,
                       help=f"learning rate of the log-thresholds (default {LearnOptions.threshold_lr:g})")
    learn.add_argument("--lambda", dest="lambda_", type=float, default=LearnOptions.lambda_,
                       help=f"weight of the global sparsity constraint (default {LearnOptions.lambda_:g})")
    learn.add_argument("--temperature", type=float, default=LearnOptions.temperature,
                       help=f"distillation temperature on logits (default {LearnOptions.temperature:g})")
    learn.add_argument("--loss", choices=LOSS_KINDS, default="auto",
                       help="reconstruction loss: auto (KL on logits, NMSE otherwise), kl or nmse")
    learn.add_argument("--holdout", type=float, default=0.1,
                       help="fraction of calibration samples never learned on (default 0.1)")
    learn.add_argument("--seed", type=int, default=0, help="seed of batch order and subsamples (default 0)")
    learn.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    opt.add_argument("--shape", type=_shape, action="append", default=[], metavar="NAME=DIMS",
                     help="full shape of a generated input with dynamic dims, e.g. input=8,3,224,224")
    ext = opt.add_mutually_exclusive_group()
    ext.add_argument("--external-data", dest="external_data", action="store_true", default=None,
                     help="store tensors in OUTPUT.data (default: as the input does)")
    ext.add_argument("--no-external-data", dest="external_data", action="store_false",
                     help="store tensors inside the .onnx file")
    rep = opt.add_mutually_exclusive_group()
    rep.add_argument("--report", metavar="PATH", help="JSON report (default OUTPUT stem + .report.json)")
    rep.add_argument("--no-report", action="store_true", help="write no JSON report")
    opt.add_argument("--json", action="store_true", help="print the JSON report on stdout instead of the table")
    opt.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")

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
    return parser


def _optimize(args: argparse.Namespace) -> int:
    shapes = dict(args.shape)
    if shapes and args.calib:
        raise OptionError("--shape sizes generated inputs; with --calib the data gives the shapes, drop --shape")
    learn = LearnOptions(
        iters=args.iters, batch_size=args.batch_size, lr=args.lr, threshold_lr=args.threshold_lr,
        lambda_=args.lambda_, temperature=args.temperature, seed=args.seed, time_budget=args.time_budget,
        loss=args.loss,
    )
    options = SparsifyOptions(
        sparsity=args.sparsity, method=args.method, nodes_to_exclude=tuple(args.exclude),
        op_types=args.op_types, max_layer_sparsity=args.max_layer_sparsity,
        external_data=args.external_data, reconstruct=args.reconstruct, holdout=args.holdout,
        device=args.device, learn=learn,
    )
    report_path = False if args.no_report else args.report
    report = run(args.model, args.output, args.calib, options, input_shapes=shapes or None,
                 report_path=report_path, quiet=args.quiet or args.json)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    elif not args.quiet:
        print(report.format_table())
        if report_path is not False:
            print(f"report: {args.report or report.output_path.rsplit('.onnx', 1)[0] + '.report.json'}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    if args.parity:
        from .inspection import format_parity, inspect_parity

        info = inspect_parity(args.model, args.calib, device=args.device, input_shapes=dict(args.shape) or None)
        print(json.dumps(info, indent=2) if args.json else format_parity(info))
        return 0 if info["parity"]["passed"] else 1
    if args.calib:
        raise OptionError("--calib is used by inspect only with --parity")
    info = inspect_model(args.model, nodes_to_exclude=tuple(args.exclude), op_types=args.op_types,
                         input_shapes=dict(args.shape) or None)
    print(json.dumps(info, indent=2) if args.json else format_inspection(info))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"optimize": _optimize, "inspect": _inspect}[args.command](args)
    except FcptsError as exc:
        print(f"fcpts-onnx: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("fcpts-onnx: interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
