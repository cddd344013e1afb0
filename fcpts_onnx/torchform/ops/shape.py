"""Shape and indexing operators: Shape, Size, Reshape, Flatten, Transpose, Concat, Split,
Slice, Squeeze, Unsqueeze, Gather, GatherElements, GatherND, ScatterND, ScatterElements,
Scatter, Expand, Tile, ConstantOfShape, Range, Identity, OneHot, NonZero, Trilu, EyeLike,
Compress.

Semantics follow onnxruntime's CPU provider (clamping of Slice bounds, the INT_MAX "to the
end" sentinels, Split-18's uneven last chunk, negative indices...).

Devices: Shape and Size results are small int64 tensors kept on the CPU, so shape
arithmetic never syncs with an accelerator. Ops that combine a tensor with index-like
inputs move the index-like inputs to the data's device; an integer-only Concat of tensors
on different devices is done on the CPU (shape building), anything else on the accelerator.
Ops that create data from shapes alone (ConstantOfShape, Range) put it on ``ctx.device``
(the device of the run's inputs) when the module provides it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..dtypes import to_torch, torch_dtype
from ..registry import register, tensor_ints

_INT32_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1
_CPU = torch.device("cpu")


# -- helpers -----------------------------------------------------------------------------

def _axis(axis: int, rank: int) -> int:
    """A possibly negative axis as an index in [0, rank)."""
    a = int(axis)
    if a < -rank or a >= max(rank, 1):
        raise ValueError(f"axis {axis} is out of range for rank {rank}")
    return a + rank if a < 0 else a


def _run_device(ctx, fallback: torch.device) -> torch.device:
    """Where created data goes: the run's device when the module says, else ``fallback``."""
    device = getattr(ctx, "device", None)
    return torch.device(device) if device is not None else fallback


def _indices(indices: torch.Tensor, size: int, device: torch.device) -> torch.Tensor:
    """Index tensor as int64 on ``device`` with negative entries counted from the end."""
    idx = indices.to(device=device, dtype=torch.int64)
    return torch.where(idx < 0, idx + size, idx)


# -- shapes ------------------------------------------------------------------------------

@register("Shape", since=1)
def shape(ctx, x):
    # Opset 15: start/end select a slice of the shape; both are clamped to [0, rank].
    dims = list(x.shape)
    rank = len(dims)
    start = ctx.attr("start", 0)
    end = ctx.attr("end", None)
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = rank if end is None else min(max(end + rank if end < 0 else end, 0), rank)
    return torch.tensor(dims[start:end] if start < end else [], dtype=torch.int64, device=_CPU)


@register("Size", since=1)
def size(ctx, x):
    return torch.tensor(x.numel(), dtype=torch.int64, device=_CPU)


def _reshape_dims(x: torch.Tensor, requested: list[int], allowzero: bool) -> list[int]:
    dims = []
    for i, d in enumerate(requested):
        if d == 0 and not allowzero:
            if i >= x.dim():
                raise ValueError(f"Reshape: 0 at position {i} copies a dimension the rank-{x.dim()} input lacks")
            d = x.shape[i]
        dims.append(int(d))
    if dims.count(-1) > 1:
        raise ValueError("Reshape: more than one -1 in the shape")
    if -1 in dims:
        known = math.prod(d for d in dims if d != -1)
        if known == 0:
            if x.numel() != 0:
                raise ValueError(f"Reshape: cannot infer -1 for {x.numel()} elements into {requested}")
            dims[dims.index(-1)] = 0
        else:
            if x.numel() % known:
                raise ValueError(f"Reshape: {tuple(x.shape)} cannot take the shape {requested}")
            dims[dims.index(-1)] = x.numel() // known
    return dims


@register("Reshape", since=1)
def reshape_v1(ctx, x, *_):
    return x.reshape(_reshape_dims(x, ctx.ints("shape", []), False))


@register("Reshape", since=5)
def reshape(ctx, x, shape_):
    return x.reshape(_reshape_dims(x, tensor_ints(shape_), bool(ctx.attr("allowzero", 0))))


@register("Flatten", since=1)
def flatten(ctx, x):
    rank = x.dim()
    axis = int(ctx.attr("axis", 1))
    if axis < 0:
        axis += rank
    if not 0 <= axis <= rank:
        raise ValueError(f"Flatten: axis {ctx.attr('axis')} out of range for rank {rank}")
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@register("Transpose", since=1)
def transpose(ctx, x):
    perm = ctx.ints("perm")
    if perm is None:
        perm = list(range(x.dim()))[::-1]
    return x.permute([_axis(p, x.dim()) for p in perm])


@register("Concat", since=1)
def concat(ctx, *inputs):
    tensors = [t for t in inputs if t is not None]
    axis = _axis(ctx.attr("axis", 1), tensors[0].dim())
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        integer = all(not t.is_floating_point() and not t.is_complex() for t in tensors)
        target = _CPU if integer else next(d for d in (t.device for t in tensors) if d.type != "cpu")
        tensors = [t.to(target) for t in tensors]
    return torch.cat(tensors, dim=axis)


def _split_sizes(ctx, dim: int, split: list[int] | None, n_outputs: int) -> list[int]:
    if split:
        if sum(split) != dim or len(split) != n_outputs:
            raise ValueError(f"Split: sizes {split} do not split {dim} into {n_outputs} outputs")
        return split
    num_outputs = ctx.attr("num_outputs", None)
    if num_outputs is not None:  # opset 18: the last chunk may be smaller
        n = int(num_outputs)
        chunk = -(-dim // n)
        sizes = [chunk] * (n - 1) + [dim - chunk * (n - 1)]
        if sizes[-1] < 0:
            raise ValueError(f"Split: {dim} cannot be split into {n} chunks of {chunk}")
        return sizes
    if dim % n_outputs:
        raise ValueError(f"Split: {dim} cannot be split evenly into {n_outputs} outputs")
    return [dim // n_outputs] * n_outputs


@register("Split", since=1)
def split(ctx, x, split_=None):
    # Opset 1: sizes as the second input or the attribute; 2-12: the attribute; 13+: the
    # input; 18+: or num_outputs. The absent ones read as "not given" in every version.
    axis = _axis(ctx.attr("axis", 0), x.dim())
    sizes = tensor_ints(split_) if split_ is not None else ctx.ints("split")
    n_outputs = len(ctx.node.output)
    return tuple(torch.split(x, _split_sizes(ctx, x.shape[axis], sizes, n_outputs), dim=axis))


def _slice(x: torch.Tensor, starts: list[int], ends: list[int], axes: list[int] | None,
           steps: list[int] | None) -> torch.Tensor:
    rank = x.dim()
    axes = list(range(len(starts))) if not axes else [_axis(a, rank) for a in axes]
    steps = [1] * len(starts) if not steps else steps
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise ValueError("Slice: starts, ends, axes and steps differ in length")
    if len(set(axes)) != len(axes):
        raise ValueError(f"Slice: repeated axes {axes}")
    index: list[slice] = [slice(None)] * rank
    backwards: list[tuple[int, int, int, int]] = []
    for start, end, axis, step in zip(starts, ends, axes, steps):
        dim = x.shape[axis]
        if step == 0:
            raise ValueError("Slice: step 0")
        start = start + dim if start < 0 else start
        start = min(max(start, 0), dim - 1 if step < 0 else dim)
        if end in (_INT32_MAX, _INT64_MAX):  # onnxruntime: "to the end" in either direction
            end = -1 if step < 0 else dim
        else:
            end = end + dim if end < 0 else end
            end = min(max(end, -1 if step < 0 else 0), dim)
        count = max(0, math.ceil((end - start) / step))
        if count == 0:
            index[axis] = slice(0, 0)
        elif step > 0:
            # A single element: step 1 (a huge step would overflow torch's stride arithmetic).
            index[axis] = slice(start, start + (count - 1) * step + 1, step if count > 1 else 1)
        else:
            backwards.append((axis, start, step, count))
    y = x[tuple(index)] if rank else x
    for axis, start, step, count in backwards:
        rows = torch.arange(count, device=x.device) * step + start  # arange(start, end, huge step) overflows
        y = y.index_select(axis, rows)
    return y


@register("Slice", since=1)
def slice_v1(ctx, x):
    return _slice(x, ctx.ints("starts"), ctx.ints("ends"), ctx.ints("axes"), None)


@register("Slice", since=10)
def slice_(ctx, x, starts, ends, axes=None, steps=None):
    return _slice(x, tensor_ints(starts), tensor_ints(ends), tensor_ints(axes) if axes is not None else None,
                  tensor_ints(steps) if steps is not None else None)


def _squeeze(x: torch.Tensor, axes: list[int] | None) -> torch.Tensor:
    if not axes:
        return x.reshape([d for d in x.shape if d != 1])
    drop = {_axis(a, x.dim()) for a in axes}
    for a in drop:
        if x.shape[a] != 1:
            raise ValueError(f"Squeeze: dimension {a} of {tuple(x.shape)} is not 1")
    return x.reshape([d for i, d in enumerate(x.shape) if i not in drop])


def _unsqueeze(x: torch.Tensor, axes: list[int]) -> torch.Tensor:
    rank = x.dim() + len(axes)
    inserted = sorted(_axis(a, rank) for a in axes)
    if len(set(inserted)) != len(inserted):
        raise ValueError(f"Unsqueeze: repeated axes {axes}")
    dims = list(x.shape)
    for a in inserted:
        dims.insert(a, 1)
    return x.reshape(dims)


@register("Squeeze", since=1)
def squeeze_v1(ctx, x):
    return _squeeze(x, ctx.ints("axes"))


@register("Squeeze", since=13)
def squeeze(ctx, x, axes=None):
    return _squeeze(x, tensor_ints(axes) if axes is not None else None)


@register("Unsqueeze", since=1)
def unsqueeze_v1(ctx, x):
    return _unsqueeze(x, ctx.ints("axes"))


@register("Unsqueeze", since=13)
def unsqueeze(ctx, x, axes):
    return _unsqueeze(x, tensor_ints(axes))


# -- gather / scatter --------------------------------------------------------------------

@register("Gather", since=1)
def gather(ctx, data, indices):
    axis = _axis(ctx.attr("axis", 0), data.dim())
    size = data.shape[axis]
    idx = _indices(indices, size, data.device)
    out = data.index_select(axis, idx.reshape(-1))
    return out.reshape([*data.shape[:axis], *indices.shape, *data.shape[axis + 1:]])


@register("GatherElements", since=11)
def gather_elements(ctx, data, indices):
    axis = _axis(ctx.attr("axis", 0), data.dim())
    idx = _indices(indices, data.shape[axis], data.device)
    return torch.gather(data, axis, idx)


def _linear_nd(indices: torch.Tensor, dims: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """indices[..., k] into the first k = len(dims) dimensions -> linear row numbers [...]."""
    idx = indices.to(device=device, dtype=torch.int64)
    sizes = torch.tensor(dims, dtype=torch.int64, device=device)
    idx = torch.where(idx < 0, idx + sizes, idx)
    if idx.numel() and device.type == "cpu" and bool(((idx < 0) | (idx >= sizes)).any()):
        raise IndexError(f"index out of range for dimensions {dims}")
    strides = [math.prod(dims[j + 1:]) for j in range(len(dims))]
    return (idx * torch.tensor(strides, dtype=torch.int64, device=device)).sum(-1)


@register("GatherND", since=11)
def gather_nd(ctx, data, indices):
    b = int(ctx.attr("batch_dims", 0))
    k = indices.shape[-1]
    batch = tuple(data.shape[:b])
    if tuple(indices.shape[:b]) != batch:
        raise ValueError(f"GatherND: batch dimensions {tuple(indices.shape[:b])} != {batch}")
    n_batch = math.prod(batch)
    slice_dims = tuple(data.shape[b + k:])
    rows = data.reshape(n_batch, math.prod(data.shape[b:b + k]), math.prod(slice_dims))
    lin = _linear_nd(indices, tuple(data.shape[b:b + k]), data.device).reshape(n_batch, -1)
    batch_ix = torch.arange(n_batch, device=data.device).unsqueeze(1)
    out = rows[batch_ix, lin]  # [n_batch, M, R]
    return out.reshape([*batch, *indices.shape[b:-1], *slice_dims])


_INDEX_REDUCE = {"mul": "prod", "max": "amax", "min": "amin"}


@register("ScatterND", since=11)
def scatter_nd(ctx, data, indices, updates):
    reduction = ctx.attr("reduction", "none")
    k = indices.shape[-1]
    lead = tuple(data.shape[:k])
    rows = data.reshape(math.prod(lead), math.prod(data.shape[k:]))
    lin = _linear_nd(indices, lead, data.device).reshape(-1)
    upd = updates.to(data.device).reshape(lin.numel(), rows.shape[1])
    if reduction == "none":
        out = rows.index_copy(0, lin, upd)
    elif reduction == "add":
        out = rows.index_add(0, lin, upd)
    elif reduction in _INDEX_REDUCE:
        target = lin.unsqueeze(1).expand(-1, rows.shape[1])
        out = rows.scatter_reduce(0, target, upd, _INDEX_REDUCE[reduction], include_self=True)
    else:
        raise ValueError(f"ScatterND: unknown reduction {reduction!r}")
    return out.reshape(data.shape)


_SCATTER_REDUCE = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


@register("ScatterElements", since=11)
def scatter_elements(ctx, data, indices, updates):
    axis = _axis(ctx.attr("axis", 0), data.dim())
    idx = _indices(indices, data.shape[axis], data.device)
    upd = updates.to(data.device)
    reduction = ctx.attr("reduction", "none")
    if reduction == "none":
        return data.scatter(axis, idx, upd)
    if reduction not in _SCATTER_REDUCE:
        raise ValueError(f"ScatterElements: unknown reduction {reduction!r}")
    return data.scatter_reduce(axis, idx, upd, _SCATTER_REDUCE[reduction], include_self=True)


register("Scatter", since=9)(scatter_elements)


# -- broadcasting and creation -----------------------------------------------------------

@register("Expand", since=8)
def expand(ctx, x, shape_):
    target = torch.broadcast_shapes(tuple(x.shape), tuple(tensor_ints(shape_)))
    return x.expand(target)


@register("Tile", since=6)
def tile(ctx, x, repeats):
    reps = tensor_ints(repeats)
    if len(reps) != x.dim():
        raise ValueError(f"Tile: {len(reps)} repeats for a rank-{x.dim()} input")
    return x.repeat(*reps) if reps else x.clone()


@register("ConstantOfShape", since=9)
def constant_of_shape(ctx, shape_):
    value = ctx.attr("value", None)
    fill = to_torch(np.zeros(1, np.float32) if value is None else np.asarray(value)).reshape(-1)
    device = _run_device(ctx, shape_.device)
    return torch.full(tensor_ints(shape_), fill[0].item(), dtype=fill.dtype, device=device)


@register("Range", since=11)
def range_(ctx, start, limit, delta):
    dtype = start.dtype
    first, last, step = (t.reshape(()).item() for t in (start, limit, delta))
    if step == 0:
        raise ValueError("Range: delta 0")
    device = _run_device(ctx, start.device)
    if not dtype.is_floating_point:
        n = max(0, -(-(last - first) // step))
        return first + torch.arange(n, dtype=dtype, device=device) * step
    # onnxruntime: n = ceil((double(limit) - double(start)) / double(delta)) (checked against
    # it on 7216 float32 and float64 cases, where the difference taken in the dtype was off in
    # 196), then value = start; value += delta accumulated in the dtype. numpy's cumsum
    # accumulates the same way (torch's CPU cumsum accumulates in double).
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    n = max(0, math.ceil((float(last) - float(first)) / step))
    terms = np.full(n, step, dtype=np_dtype)
    if n:
        terms[0] = first
    return torch.from_numpy(np.cumsum(terms, dtype=np_dtype)).to(device)


@register("Identity", since=1)
def identity(ctx, x):
    return x


@register("OneHot", since=9)
def one_hot(ctx, indices, depth, values):
    depth_n = int(depth.reshape(-1)[0].item())
    device = values.device
    idx = indices.to(device)
    if idx.is_floating_point():
        idx = idx.trunc()
    idx = idx.to(torch.int64)
    idx = torch.where(idx < 0, idx + depth_n, idx)
    hot = idx.unsqueeze(-1) == torch.arange(depth_n, device=device)
    axis = _axis(ctx.attr("axis", -1), indices.dim() + 1)
    hot = hot.movedim(-1, axis)
    off, on = values.reshape(-1)[0], values.reshape(-1)[1]
    return torch.where(hot, on, off)


@register("NonZero", since=9)
def non_zero(ctx, x):
    if x.dim() == 0:  # onnxruntime treats a scalar as a one-element vector
        x = x.reshape(1)
    return torch.nonzero(x).transpose(0, 1).contiguous()


@register("Trilu", since=14)
def trilu(ctx, x, k=None):
    diagonal = tensor_ints(k)[0] if k is not None else 0
    return torch.triu(x, diagonal) if ctx.attr("upper", 1) else torch.tril(x, diagonal)


@register("EyeLike", since=9)
def eye_like(ctx, x):
    elem_type = ctx.attr("dtype", None)
    dtype = x.dtype if elem_type is None else torch_dtype(elem_type)
    n, m = x.shape
    k = int(ctx.attr("k", 0))
    rows = torch.arange(n, device=x.device).unsqueeze(1)
    cols = torch.arange(m, device=x.device).unsqueeze(0)
    return (cols - rows == k).to(dtype)


@register("Compress", since=9)
def compress(ctx, x, condition):
    axis = ctx.attr("axis", None)
    if axis is None:
        x, axis = x.reshape(-1), 0
    else:
        axis = _axis(axis, x.dim())
    keep = condition.to(x.device).reshape(-1)[: x.shape[axis]].to(torch.bool)
    return x.index_select(axis, torch.nonzero(keep).reshape(-1))


@register("ArrayFeatureExtractor", since=1, domain="ai.onnx.ml")
def array_feature_extractor(ctx, x, indices):
    """x[..., indices] (indices flattened); a 1-D x gives [1, n], as onnxruntime does. skl2onnx
    maps a classifier's argmax to its class labels so."""
    idx = indices.to(device=x.device, dtype=torch.int64).reshape(-1)
    size = x.shape[-1]
    if idx.numel() and x.device.type == "cpu" and bool(((idx < 0) | (idx >= size)).any()):
        raise IndexError(f"ArrayFeatureExtractor index out of range for a last axis of {size}")
    out = x.index_select(x.dim() - 1, idx)
    return out.reshape(1, -1) if x.dim() == 1 else out
