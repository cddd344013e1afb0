"""Elementwise operators: unary maths and activations, broadcasting arithmetic, comparison
and logic, Where, Clip, Cast.

Semantics follow onnxruntime's CPU kernels (numpy broadcasting, C-style integer arithmetic
that wraps, integer Div truncating toward zero, Pow through double precision for integer
bases, Cast rounding through float32 into half types). Float computations stay in torch so
gradients flow; half-precision ONNX values are float32 here (see ``dtypes.torch_dtype``), so
the half types are only visible where a Cast rounds to them.

torch computes little on uint16/uint32/uint64: those run in a wider signed type and wrap
back (uint64 through int64, exact below 2**63).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from onnx import TensorProto

from ...errors import UnsupportedModelError
from ..registry import register

# ---------------------------------------------------------------------------------------
# helpers

_WIDER = {torch.uint16: torch.int32, torch.uint32: torch.int64, torch.uint64: torch.int64}
_UNSIGNED = (torch.uint8, torch.uint16, torch.uint32, torch.uint64)


def _widened(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor | None) -> torch.Tensor:
    """``fn(*tensors)``, with uint16/32/64 computed in a wider signed type and narrowed back."""
    narrow = next((t.dtype for t in tensors if t is not None and t.dtype in _WIDER), None)
    if narrow is None:
        return fn(*tensors)
    wide = [t.to(_WIDER[t.dtype]) if t is not None and t.dtype in _WIDER else t for t in tensors]
    out = fn(*wide)
    return out.to(narrow) if out.dtype == _WIDER[narrow] else out


def _legacy_align(ctx, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Before opset 7, B broadcast onto A only with ``broadcast=1``, aligned at ``axis``."""
    if ctx.opset >= 7 or not ctx.attr("broadcast", 0):
        return a, b
    axis = ctx.attr("axis")
    if axis is None or b.dim() == 0:
        return a, b  # suffix alignment: numpy broadcasting already does it
    if axis < 0:
        axis += a.dim()
    return a, b.reshape(*b.shape, *([1] * (a.dim() - axis - b.dim())))


def _binary(op_type: str, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], since: int = 1) -> None:
    def impl(ctx, a, b):
        a, b = _legacy_align(ctx, a, b)
        return _widened(fn, a, b)

    impl.__name__ = op_type.lower()
    register(op_type, since=since)(impl)


def _unary(op_type: str, fn: Callable[[torch.Tensor], torch.Tensor], since: int = 1) -> None:
    def impl(ctx, x):
        return _widened(fn, x)

    impl.__name__ = op_type.lower()
    register(op_type, since=since)(impl)


# ---------------------------------------------------------------------------------------
# unary maths

for _op, _fn, _since in (
    ("Exp", torch.exp, 1), ("Log", torch.log, 1), ("Sqrt", torch.sqrt, 1),
    ("Reciprocal", torch.reciprocal, 1), ("Floor", torch.floor, 1), ("Ceil", torch.ceil, 1),
    ("Round", torch.round, 11),  # torch.round rounds half to even, like ONNX
    ("Sin", torch.sin, 7), ("Cos", torch.cos, 7), ("Tan", torch.tan, 7), ("Asin", torch.asin, 7),
    ("Acos", torch.acos, 7), ("Atan", torch.atan, 7), ("Sinh", torch.sinh, 9), ("Cosh", torch.cosh, 9),
    ("Asinh", torch.asinh, 9), ("Acosh", torch.acosh, 9), ("Atanh", torch.atanh, 9),
    ("Tanh", torch.tanh, 1), ("Sigmoid", torch.sigmoid, 1), ("Erf", torch.erf, 9),
    ("Not", torch.logical_not, 1), ("IsNaN", torch.isnan, 9), ("BitwiseNot", torch.bitwise_not, 18),
    ("Softsign", F.softsign, 1),
):
    _unary(_op, _fn, _since)


@register("Neg", since=1)
def neg(ctx, x):
    return torch.neg(x)


@register("Abs", since=1)
def abs_(ctx, x):
    if x.dtype in _UNSIGNED:
        return x
    return torch.abs(x)


@register("Sign", since=9)
def sign(ctx, x):
    if x.dtype in _UNSIGNED:
        return (x != 0).to(x.dtype)
    if x.is_floating_point():
        return torch.where(torch.isnan(x), x, torch.sign(x))  # torch.sign(nan) is 0
    return torch.sign(x)


@register("IsInf", since=10)
def isinf(ctx, x):
    negative, positive = ctx.attr("detect_negative", 1), ctx.attr("detect_positive", 1)
    if negative and positive:
        return torch.isinf(x)
    if positive:
        return torch.isposinf(x)
    if negative:
        return torch.isneginf(x)
    return torch.zeros_like(x, dtype=torch.bool)


# ---------------------------------------------------------------------------------------
# activations


@register("Relu", since=1)
def relu(ctx, x):
    if x.dtype in _UNSIGNED:
        return x
    return torch.relu(x)


@register("LeakyRelu", since=1)
def leaky_relu(ctx, x):
    return F.leaky_relu(x, ctx.attr("alpha", 0.01))


@register("PRelu", since=1)
def prelu(ctx, x, slope):
    if ctx.opset < 7 and slope.dim() == 1 and x.dim() > 2 and slope.numel() == x.shape[1] > 1:
        # Before numpy broadcasting, a 1-D slope was per channel.
        slope = slope.reshape(-1, *([1] * (x.dim() - 2)))
    # onnxruntime broadcasts both ways (X [3] with slope [2, 3] gives [2, 3]).
    return torch.where(x < 0, x * slope, x)


@register("ThresholdedRelu", since=10)
def thresholded_relu(ctx, x):
    return torch.where(x > ctx.attr("alpha", 1.0), x, torch.zeros_like(x))


@register("Elu", since=1)
def elu(ctx, x):
    return F.elu(x, ctx.attr("alpha", 1.0))


@register("Selu", since=1)
def selu(ctx, x):
    alpha = ctx.attr("alpha", 1.67326319217681884765625)
    gamma = ctx.attr("gamma", 1.05070102214813232421875)
    return F.elu(x, alpha) * gamma


@register("Celu", since=12)
def celu(ctx, x):
    return F.celu(x, ctx.attr("alpha", 1.0))


@register("Softplus", since=1)
def softplus(ctx, x):
    # log(1 + exp(x)); beyond the threshold x + log1p(exp(-x)) rounds to x in the dtype.
    return F.softplus(x, beta=1.0, threshold=40.0 if x.dtype == torch.float64 else 20.0)


@register("HardSigmoid", since=1)
def hard_sigmoid(ctx, x):
    return torch.clamp(x * ctx.attr("alpha", 0.2) + ctx.attr("beta", 0.5), 0.0, 1.0)


@register("HardSwish", since=14)
def hard_swish(ctx, x):
    # onnxruntime: x * HardSigmoid(x, alpha=1/6, beta=0.5), the same function up to rounding;
    # torch's kernel is one pass each way where the spelled-out form is four forward
    return F.hardswish(x)


@register("Mish", since=18)
def mish(ctx, x):
    return F.mish(x)


@register("Swish", since=24)
def swish(ctx, x):
    alpha = float(ctx.attr("alpha", 1.0))
    return F.silu(x) if alpha == 1.0 else x * torch.sigmoid(alpha * x)


@register("Gelu", since=20)
def gelu(ctx, x):
    approximate = ctx.attr("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise UnsupportedModelError(f"Gelu node {ctx.name!r}: unknown approximate={approximate!r}")
    y = F.gelu(x, approximate=approximate)
    if approximate == "none":
        y = torch.where(x == math.inf, x, y)  # torch's exact Gelu gives NaN at +inf, onnxruntime inf
    return y


@register("Shrink", since=9)
def shrink(ctx, x):
    bias, lambd = ctx.attr("bias", 0.0), ctx.attr("lambd", 0.5)
    # onnxruntime computes every dtype in float32 (integers truncate back, doubles round)
    v = x if x.dtype == torch.float32 else x.to(torch.float32)
    y = torch.where(v < -lambd, v + bias, torch.where(v > lambd, v - bias, torch.zeros_like(v)))
    return y if y.dtype == x.dtype else y.to(x.dtype)


# ---------------------------------------------------------------------------------------
# binary arithmetic


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")  # C integer division


_binary("Add", torch.add)
_binary("Sub", torch.sub)
_binary("Mul", torch.mul)
_binary("Div", _div)


def _exact_fmod(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """C fmod. torch's vectorised float32 fmod divides, so huge quotients lose the remainder
    (fmod(5, 1.2e-38) gave NaN, not 0; 24437 of 200000 extreme float32 pairs were off), while
    its float64 kernel matched numpy's fmod on all of them: narrower floats go through float64."""
    if a.is_floating_point() and a.dtype != torch.float64:
        return torch.fmod(a.double(), b.double()).to(torch.promote_types(a.dtype, b.dtype))
    return _widened(torch.fmod, a, b)


@register("Mod", since=10)
def mod(ctx, a, b):
    if ctx.attr("fmod", 0):
        return _exact_fmod(a, b)  # sign of the dividend, like C fmod / %
    if a.is_floating_point():
        # Floor modulo (the sign of the divisor; onnxruntime allows it on floats from
        # opset 28) computed as numpy does: fmod, then shifted into the divisor's sign.
        r = _exact_fmod(a, b)
        return torch.where((r != 0) & ((r < 0) != (b < 0)), r + b, r)
    return _widened(torch.remainder, a, b)


@register("Pow", since=1)
def pow_(ctx, x, y):
    x, y = _legacy_align(ctx, x, y)
    if x.is_floating_point():
        if not y.is_floating_point():
            return torch.pow(x, y.to(x.dtype))
        if y.dtype != x.dtype:  # float ** double: onnxruntime computes in double
            common = torch.promote_types(x.dtype, y.dtype)
            return torch.pow(x.to(common), y.to(common)).to(x.dtype)
        if y.numel() == 1 and not y.requires_grad and y.device.type == "cpu":
            # A number as the exponent takes torch's fast paths forward and backward (x * x for
            # the 2 of a spelled-out LayerNorm, 0.2 ms where a tensor exponent's pow took 1.9 ms
            # on a BERT layer); onnxruntime also squares for 2.
            out = torch.pow(x, y.reshape(()).item())
            return torch.broadcast_to(out, torch.broadcast_shapes(x.shape, y.shape))
        return torch.pow(x, y)
    # Integer base: onnxruntime multiplies for a single exponent of 2 or 3 (wrapping like C)
    # and otherwise casts std::pow(double, double) back to the integer type.
    if y.numel() == 1 and x.numel() > 1:
        e = y.reshape(-1)[0].item()
        if e in (2, 3):
            out = x * x if e == 2 else x * x * x
            return torch.broadcast_to(out, torch.broadcast_shapes(x.shape, y.shape))
    return torch.pow(x.double(), y.double()).to(x.dtype)


@register("BitShift", since=11)
def bit_shift(ctx, x, y):
    direction = ctx.attr("direction")
    if direction == "LEFT":
        return _widened(torch.bitwise_left_shift, x, y)
    if direction == "RIGHT":
        return _widened(torch.bitwise_right_shift, x, y)
    raise UnsupportedModelError(f"BitShift node {ctx.name!r}: direction must be LEFT or RIGHT, got {direction!r}")


_binary("BitwiseAnd", torch.bitwise_and, since=18)
_binary("BitwiseOr", torch.bitwise_or, since=18)
_binary("BitwiseXor", torch.bitwise_xor, since=18)


# ---------------------------------------------------------------------------------------
# variadic


def _fold(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], inputs) -> torch.Tensor:
    out = inputs[0]
    for t in inputs[1:]:
        out = _widened(fn, out, t)
    return out


@register("Sum", since=1)
def sum_(ctx, *inputs):
    return _fold(torch.add, inputs)


@register("Mean", since=1)
def mean(ctx, *inputs):
    # onnxruntime sums in order, then multiplies by 1/n in the input dtype.
    out = _fold(torch.add, inputs)
    return out if len(inputs) == 1 else out * (1.0 / len(inputs))


@register("Max", since=1)
def max_(ctx, *inputs):
    return _fold(torch.maximum, inputs)  # NaN propagates, as in onnxruntime


@register("Min", since=1)
def min_(ctx, *inputs):
    return _fold(torch.minimum, inputs)


# ---------------------------------------------------------------------------------------
# comparison and logic

_binary("Equal", torch.eq)
_binary("Less", torch.lt)
_binary("Greater", torch.gt)
_binary("LessOrEqual", torch.le, since=12)
_binary("GreaterOrEqual", torch.ge, since=12)
_binary("And", torch.logical_and)
_binary("Or", torch.logical_or)
_binary("Xor", torch.logical_xor)


@register("Where", since=9)
def where(ctx, condition, x, y):
    return _widened(lambda a, b: torch.where(condition.bool(), a, b), x, y)


# ---------------------------------------------------------------------------------------
# Clip

_FLT_MAX = 3.4028234663852886e38


@register("Clip", since=1)
def clip_attributes(ctx, x):
    return torch.clamp(x, ctx.attr("min", -_FLT_MAX), ctx.attr("max", _FLT_MAX))


@register("Clip", since=11)
def clip(ctx, x, lo=None, hi=None):
    # min/max are optional inputs (None when absent, even with max present). onnxruntime
    # clips an absent bound at the dtype's extremes, so floats lose their infinities.
    if x.is_floating_point():
        info = torch.finfo(x.dtype)
        lo = info.min if lo is None else lo.reshape(()).to(x.dtype)
        hi = info.max if hi is None else hi.reshape(()).to(x.dtype)
        return torch.clamp(x, lo, hi)
    if lo is None and hi is None:
        return x
    lo = None if lo is None else lo.reshape(()).to(x.dtype)
    hi = None if hi is None else hi.reshape(()).to(x.dtype)
    return _widened(lambda t, a, b: torch.clamp(t, min=a, max=b), x, lo, hi)


# ---------------------------------------------------------------------------------------
# Cast

_HALF = {TensorProto.FLOAT16: torch.float16, TensorProto.BFLOAT16: torch.bfloat16}
_CAST_DTYPE = {
    TensorProto.FLOAT: torch.float32, TensorProto.DOUBLE: torch.float64, TensorProto.BOOL: torch.bool,
    TensorProto.INT8: torch.int8, TensorProto.INT16: torch.int16, TensorProto.INT32: torch.int32,
    TensorProto.INT64: torch.int64, TensorProto.UINT8: torch.uint8, TensorProto.UINT16: torch.uint16,
    TensorProto.UINT32: torch.uint32, TensorProto.UINT64: torch.uint64,
}


def cast_to(x: torch.Tensor, to: int | str, where: str = "Cast") -> torch.Tensor:
    """``x`` cast to ONNX element type ``to`` as onnxruntime does (float16/bfloat16 values
    come back rounded but stored as float32, the module's compute type for half types)."""
    if isinstance(to, str):  # Cast-1..5 named the type
        to = TensorProto.DataType.Value(to.upper())
    if to in _HALF:
        if x.dtype != torch.float32:
            x = x.to(torch.float32)  # onnxruntime converts through float: double rounding
        return x.to(_HALF[to]).to(torch.float32)
    target = _CAST_DTYPE.get(to)
    if target is None:
        raise UnsupportedModelError(
            f"{where}: casting to {TensorProto.DataType.Name(to)} is not supported by the trainable form")
    if x.dtype == target:
        return x
    if x.is_floating_point() and target in (torch.uint16, torch.uint32):
        # float -> uint16/32 goes through int64, which wraps like onnxruntime on x86.
        return x.to(torch.int64).to(target)
    return x.to(target)  # float -> int truncates toward zero


@register("Cast", since=1)
def cast(ctx, x):
    return cast_to(x, ctx.attr("to"), f"Cast node {ctx.name!r}")


@register("CastLike", since=15)
def cast_like(ctx, x, like):
    # The target's ONNX type is not known here: a float16 target is float32 in the module.
    return x if x.dtype == like.dtype else x.to(like.dtype)


del _op, _fn, _since
