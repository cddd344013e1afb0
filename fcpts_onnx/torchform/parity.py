"""Parity: does the trainable form compute what onnxruntime computes?

Checked on a calibration batch before anything is learned. Per float output the measure is
max |ours - ort| / max |ort| (max |ort| at least 1 for a Sigmoid's output, see
unit_range_values); integer and bool outputs must be equal. On failure the first
node whose output diverges is found by exposing every intermediate value in onnxruntime.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import torch

from ..errors import UnsupportedModelError
from .module import OnnxModule

# Relative tolerance by the reference output's dtype. Half-precision graphs are computed by
# onnxruntime in half precision and by us in float32, so they can only agree to their epsilon.
TOLERANCE = {"float32": 1e-4, "float64": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
_HALF_TYPES = {onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16"}


def half_precision_floor(model: onnx.ModelProto) -> float:
    """The tolerance of the lowest-precision float the graph computes in, 0 if none is half.

    A graph converted to fp16 with float32 inputs and outputs (onnxruntime's
    ``convert_float_to_float16(keep_io_types=True)``) computes in half precision between its
    boundary Casts; its float32 outputs carry fp16 rounding (1e-3 relative on a BERT), which
    the float32 tolerance would call a mismatch.
    """
    graph = model.graph
    types = {t.data_type for t in graph.initializer}
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to":
                types.add(attr.i)
            elif attr.type == onnx.AttributeProto.TENSOR:
                types.add(attr.t.data_type)
    for vi in (*graph.input, *graph.value_info, *graph.output):
        types.add(vi.type.tensor_type.elem_type)
    return max((TOLERANCE[name] for code, name in _HALF_TYPES.items() if code in types), default=0.0)


# onnxruntime's CPU Sigmoid approximates the function to an absolute accuracy of about 1e-7,
# not a relative one: at x = -16 (sigmoid 1.1e-7) it is 57% off, at -8 about 1e-4. A sigmoid
# output of a detector that sees only negatives (a wake word, a VAD on silence) then fails a
# check relative to its largest value, though both sides compute the same function. Such
# values are compared against the function's range, 1, instead.
_UNIT_RANGE_OPS = {"Sigmoid"}
# ops that only move, pick or join values: their output stays in their inputs' range
_RANGE_PRESERVING_OPS = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Slice",
                         "Gather", "GatherElements", "GatherND", "Expand", "Concat", "Split", "Tile",
                         "Max", "Min", "MaxPool", "GlobalMaxPool", "ReduceMax", "ReduceMin", "ReduceMean",
                         "AveragePool", "GlobalAveragePool"}


def unit_range_values(graph: onnx.GraphProto, outer: frozenset[str] = frozenset()) -> set[str]:
    """Names of values that come out of a Sigmoid, through ops that keep its range and through
    If nodes whose every branch yields such a value (``outer``: those of enclosing graphs)."""
    unit = set(outer)
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in _UNIT_RANGE_OPS:
            unit.update(o for o in node.output if o)
        elif node.op_type in _RANGE_PRESERVING_OPS:
            data = [i for i in node.input[:1 if node.op_type not in ("Concat", "Max", "Min") else None] if i]
            if data and all(i in unit for i in data):
                unit.update(o for o in node.output if o)
        elif node.op_type == "If":
            branches = [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
            inner = frozenset(unit)
            kept = [unit_range_values(g, inner) for g in branches]
            for k, out in enumerate(node.output):
                if out and branches and all(k < len(g.output) and g.output[k].name in u
                                            for g, u in zip(branches, kept)):
                    unit.add(out)
    return unit


@dataclass
class OutputParity:
    name: str
    dtype: str
    max_abs_diff: float
    max_abs_reference: float
    relative_diff: float
    tolerance: float
    passed: bool


@dataclass
class ParityResult:
    """Parity of every output, and where it first broke if it did."""

    outputs: list[OutputParity]
    n_samples: int
    device: str
    first_divergence: dict | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    def to_dict(self) -> dict:
        return asdict(self) | {"passed": self.passed}

    def summary(self) -> str:
        worst = max(self.outputs, key=lambda o: o.relative_diff / o.tolerance)
        return (f"max |diff| / max |ref| = {worst.relative_diff:.2e} on output {worst.name!r} "
                f"(tolerance {worst.tolerance:g})")


def _compare(name: str, ours: np.ndarray, ref: np.ndarray, floor: float = 0.0, unit_range: bool = False) -> OutputParity:
    dtype = ref.dtype.name
    tolerance = TOLERANCE.get(dtype, 0.0)
    if dtype in TOLERANCE:  # floats only: integers and bools must match exactly
        tolerance = max(tolerance, floor)
    if ours.shape != ref.shape:
        return OutputParity(name, dtype, float("inf"), 0.0, float("inf"), tolerance, False)
    if not np.issubdtype(ref.dtype, np.floating) and dtype != "bfloat16":
        equal = bool(np.array_equal(ours, ref))
        return OutputParity(name, dtype, 0.0 if equal else float("inf"), 0.0, 0.0 if equal else float("inf"),
                            0.0, equal)
    ref64, ours64 = ref.astype(np.float64), ours.astype(np.float64)
    both_nan = np.isnan(ref64) & np.isnan(ours64)
    diff = np.where(both_nan, 0.0, np.abs(ours64 - ref64))
    max_diff = float(np.max(diff)) if diff.size else 0.0
    finite_ref = ref64[np.isfinite(ref64)]
    scale = float(np.max(np.abs(finite_ref))) if finite_ref.size else 0.0
    measure = max(scale, 1.0) if unit_range else scale
    relative = max_diff / measure if measure > 0 else max_diff
    if np.isnan(relative):
        relative = float("inf")
    return OutputParity(name, dtype, max_diff, scale, relative, tolerance, relative <= tolerance)


def _ort_run(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return dict(zip(names, session.run(names, dict(feeds))))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(f"onnxruntime cannot run the model for the parity check: {first}") from None


def _to_numpy(value: torch.Tensor, like: np.ndarray) -> np.ndarray:
    array = value.detach().cpu().numpy()
    return array.astype(like.dtype) if like.dtype != array.dtype and like.dtype.name != "bfloat16" else array


def check_parity(model: onnx.ModelProto, module: OnnxModule, feeds: Mapping[str, np.ndarray], *,
                 device: str | torch.device = "cpu", locate: bool = True) -> ParityResult:
    """Compare ``module`` with onnxruntime on ``feeds``; find the first divergent node on failure."""
    names = list(module.output_names)
    reference = _ort_run(model, feeds, names)
    torch_feeds = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in feeds.items()}
    with torch.no_grad():
        ours = module.run(torch_feeds)
    floor = half_precision_floor(model)
    unit = unit_range_values(model.graph)
    outputs = [_compare(n, _to_numpy(ours[n], reference[n]), reference[n], floor, n in unit) for n in names]
    n_samples = next(iter(feeds.values())).shape[0] if feeds else 0
    result = ParityResult(outputs, n_samples, str(device))
    for o in outputs:
        if o.name in unit and o.max_abs_reference < 1.0:
            result.notes.append(
                f"output {o.name!r} comes out of a Sigmoid: its difference is measured against the sigmoid's "
                f"range (1), not its largest value ({o.max_abs_reference:.2g}); onnxruntime's Sigmoid is accurate "
                "to about 1e-7, not to a share of small values")
    if not result.passed and locate:
        result.first_divergence = first_divergent_node(model, module, feeds, device=device)
    return result


def first_divergent_node(model: onnx.ModelProto, module: OnnxModule, feeds: Mapping[str, np.ndarray], *,
                         device: str | torch.device = "cpu") -> dict | None:
    """The first node (in graph order) whose output differs beyond tolerance, with the numbers."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    candidates = []
    for node in probe.graph.node:
        if node.op_type == "Constant":
            continue
        for out in node.output:
            if out:
                candidates.append((node, out))
                if out not in existing:
                    probe.graph.output.append(onnx.ValueInfoProto(name=out))
    names = [out for _, out in candidates]
    reference = _ort_run(probe, feeds, names)
    torch_feeds = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in feeds.items()}
    with torch.no_grad():
        env = module.run(torch_feeds, keep_all=True)
    floor = half_precision_floor(model)
    unit = unit_range_values(model.graph)
    for node, out in candidates:
        if out not in env or not isinstance(env[out], torch.Tensor):
            continue
        ref = reference[out]
        if not isinstance(ref, np.ndarray):
            continue
        comparison = _compare(out, _to_numpy(env[out], ref), ref, floor, out in unit)
        if not comparison.passed:
            return {"node": node.name, "op_type": node.op_type, "output": out,
                    "relative_diff": comparison.relative_diff, "tolerance": comparison.tolerance,
                    "shape_ours": list(env[out].shape), "shape_reference": list(ref.shape)}
    return None
