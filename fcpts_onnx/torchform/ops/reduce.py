"""Reductions: ReduceMean/Sum/Max/Min/Prod/L1/L2/LogSum/LogSumExp/SumSquare, ArgMax,
ArgMin, CumSum, TopK.

Axes are an attribute before opset 18 (ReduceSum: before 13) and an optional input from
then on. No axes means all axes, unless ``noop_with_empty_axes`` is set, when the input
comes back elementwise-transformed as by a reduction over a single element (onnxruntime:
ReduceSumSquare squares, ReduceL1/L2 take |x|, ReduceLogSum takes log x, the rest copy).
Reductions over an empty set give onnxruntime's identities: Sum/Mean/L1/L2/SumSquare 0,
Prod 1, Max -inf, Min +inf, LogSum and LogSumExp -inf. Integer inputs keep their dtype
(integer ReduceMean truncates, as onnxruntime's C++ division does).
"""

from __future__ import annotations

import torch

from ..registry import register, tensor_ints


def _axes(ctx, x: torch.Tensor, axes_input, from_input: bool) -> list[int] | None:
    """Sorted, normalised reduction axes; None when the reduction is a no-op."""
    if from_input:
        axes = tensor_ints(axes_input) if axes_input is not None else []
    else:
        axes = ctx.ints("axes") or []
    rank = x.dim()
    if not axes:
        if ctx.attr("noop_with_empty_axes", 0):
            return None
        return list(range(rank))
    out = set()
    for a in axes:
        if not -rank <= a < max(rank, 1):
            raise ValueError(f"{ctx.node.op_type}: axis {a} out of range for rank {rank}")
        out.add(a + rank if a < 0 else a)
    return sorted(out)


def _finish(y: torch.Tensor, axes: list[int], keepdims: bool) -> torch.Tensor:
    """``y`` reduced with keepdim=True -> drop the reduced axes unless keepdims."""
    if keepdims:
        return y
    return y.reshape([d for i, d in enumerate(y.shape) if i not in set(axes)])


def _is_int(x: torch.Tensor) -> bool:
    return not x.is_floating_point() and not x.is_complex()


def _sum(x, axes):
    return x.sum(dim=axes, keepdim=True, dtype=x.dtype) if axes else x.clone()


def _prod(x, axes):
    y = x
    for a in axes:
        y = y.prod(dim=a, keepdim=True, dtype=x.dtype)
    return y


def _count(x, axes) -> int:
    count = 1
    for a in axes:
        count *= x.shape[a]
    return count


def _reduced_shape(x, axes) -> list[int]:
    return [1 if i in axes else d for i, d in enumerate(x.shape)]


def _mean(x, axes):
    if not axes:
        return x.clone()
    count = _count(x, axes)
    if count == 0:  # onnxruntime: 0, not nan
        return x.new_zeros(_reduced_shape(x, axes))
    if _is_int(x):
        return torch.div(_sum(x, axes), count, rounding_mode="trunc")
    return x.mean(dim=axes, keepdim=True)


def _extreme(x, axes, largest: bool):
    if not axes:
        return x.clone()
    if _count(x, axes) == 0:  # onnxruntime: the identity of max/min
        if x.dtype == torch.bool:
            fill = not largest
        elif _is_int(x):
            info = torch.iinfo(x.dtype)
            fill = info.min if largest else info.max
        else:
            fill = -float("inf") if largest else float("inf")
        return torch.full(_reduced_shape(x, axes), fill, dtype=x.dtype, device=x.device)
    return x.amax(dim=axes, keepdim=True) if largest else x.amin(dim=axes, keepdim=True)


def _max(x, axes):
    return _extreme(x, axes, True)


def _min(x, axes):
    return _extreme(x, axes, False)


def _float_op(fn):
    """Float math on an integer input: computed in float64, truncated back (C++ casts)."""
    def wrapped(x, axes):
        if _is_int(x):
            return fn(x.to(torch.float64), axes).trunc().to(x.dtype)
        return fn(x, axes)
    return wrapped


def _l1(x, axes):
    return _sum(x.abs(), axes)


@_float_op
def _l2(x, axes):
    if not axes:
        return x.abs()
    if _count(x, axes) == 0:
        return x.new_zeros(_reduced_shape(x, axes))
    # vector_norm's gradient at 0 is 0 (sqrt(sum(x*x)) would give nan there).
    return torch.linalg.vector_norm(x, 2, dim=axes, keepdim=True)


@_float_op
def _log_sum(x, axes):
    return torch.log(_sum(x, axes))


@_float_op
def _log_sum_exp(x, axes):
    if not axes:
        return x.clone()
    if _count(x, axes) == 0:
        return torch.full(_reduced_shape(x, axes), -float("inf"), dtype=x.dtype, device=x.device)
    return torch.logsumexp(x, dim=axes, keepdim=True)


def _sum_square(x, axes):
    return _sum(x * x, axes)


_REDUCTIONS = {
    "ReduceSum": (_sum, 13), "ReduceMean": (_mean, 18), "ReduceMax": (_max, 18),
    "ReduceMin": (_min, 18), "ReduceProd": (_prod, 18), "ReduceL1": (_l1, 18),
    "ReduceL2": (_l2, 18), "ReduceLogSum": (_log_sum, 18), "ReduceLogSumExp": (_log_sum_exp, 18),
    "ReduceSumSquare": (_sum_square, 18),
}


def _make_reduce(fn, from_input: bool):
    def reduce(ctx, x, axes_input=None):
        axes = _axes(ctx, x, axes_input, from_input)
        if axes is None:  # noop_with_empty_axes: only the elementwise part, as onnxruntime
            return fn(x, [])
        keepdims = bool(ctx.attr("keepdims", 1))
        return _finish(fn(x, axes), axes, keepdims)
    return reduce


for _name, (_fn, _input_since) in _REDUCTIONS.items():
    register(_name, since=1)(_make_reduce(_fn, from_input=False))
    register(_name, since=_input_since)(_make_reduce(_fn, from_input=True))


def _arg(ctx, x, largest: bool):
    axis = int(ctx.attr("axis", 0))
    axis = axis + x.dim() if axis < 0 else axis
    keepdims = bool(ctx.attr("keepdims", 1))
    last = bool(ctx.attr("select_last_index", 0))
    pick = torch.argmax if largest else torch.argmin
    if last:
        size = x.shape[axis]
        idx = size - 1 - pick(x.flip(axis), dim=axis, keepdim=True)
    else:
        idx = pick(x, dim=axis, keepdim=True)
    return idx if keepdims else idx.squeeze(axis)


@register("ArgMax", since=1)
def arg_max(ctx, x):
    return _arg(ctx, x, True)


@register("ArgMin", since=1)
def arg_min(ctx, x):
    return _arg(ctx, x, False)


@register("CumSum", since=11)
def cum_sum(ctx, x, axis):
    a = tensor_ints(axis)[0]
    a = a + x.dim() if a < 0 else a
    reverse = bool(ctx.attr("reverse", 0))
    exclusive = bool(ctx.attr("exclusive", 0))
    y = x.flip(a) if reverse else x
    s = y.cumsum(a, dtype=x.dtype)
    if exclusive:
        # y_i = sum_{j<i} x_j: the inclusive sums shifted by one, a zero in front.
        n = x.shape[a]
        s = torch.cat([torch.zeros_like(s.narrow(a, 0, min(n, 1))), s.narrow(a, 0, max(n - 1, 0))], dim=a)
    return s.flip(a) if reverse else s


def _top_k(ctx, x, k: int):
    axis = int(ctx.attr("axis", -1))
    axis = axis + x.dim() if axis < 0 else axis
    largest = bool(ctx.attr("largest", 1))
    if not 0 <= k <= x.shape[axis]:
        raise ValueError(f"TopK: k={k} for a dimension of {x.shape[axis]}")
    # A stable sort orders ties by index, as onnxruntime's comparator does.
    values, indices = torch.sort(x, dim=axis, descending=largest, stable=True)
    return values.narrow(axis, 0, k), indices.narrow(axis, 0, k)


@register("TopK", since=1)
def top_k_v1(ctx, x):
    return _top_k(ctx, x, int(ctx.attr("k")))


@register("TopK", since=10)
def top_k(ctx, x, k):
    return _top_k(ctx, x, tensor_ints(k)[0])
