"""Neural-network operators: convolution, pooling, normalisation, softmax, padding, resizing.

Every implementation follows onnxruntime's CPU kernels where they and the ONNX spec part
(pool output sizes with ``ceil_mode``, AveragePool divisors, ConvTranspose padding with
``output_shape``, Resize coordinates computed in float32). Asymmetric padding is applied
with ``F.pad`` before a padding-free torch call, so every geometry torch itself refuses
(pads larger than half the kernel, begin != end) is still exact. Float results are
differentiable w.r.t. inputs and weights.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import UnsupportedModelError
from ..registry import register, tensor_ints


class TorchformUnsupportedError(UnsupportedModelError, NotImplementedError):
    """A node uses an attribute combination the trainable form does not implement."""


def _refuse(ctx, what: str) -> TorchformUnsupportedError:
    return TorchformUnsupportedError(
        f"{ctx.node.op_type} node {ctx.name!r} (opset {ctx.opset}): {what} is not supported by the "
        "trainable form; use a data-free method or re-export the model without it"
    )


def _cdiv(a: int, b: int) -> int:
    """C++ integer division (truncates toward zero)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def _torch_pads(begins, ends) -> list[int]:
    """Per-dimension begin/end pads (first spatial dim first) in F.pad's last-dim-first order."""
    out: list[int] = []
    for b, e in zip(reversed(list(begins)), reversed(list(ends))):
        out += [int(b), int(e)]
    return out


def _requested(ctx, index: int) -> bool:
    return len(ctx.node.output) > index and bool(ctx.node.output[index])


def _is_float(t: torch.Tensor) -> bool:
    return t.dtype.is_floating_point


# -- convolution ------------------------------------------------------------------------

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _conv_pads(ctx, in_sizes, kernel, strides, dilations, *, dilate_same: bool):
    """(begins, ends) for Conv/pools, auto_pad resolved the way onnxruntime does it."""
    n = len(in_sizes)
    auto = ctx.attr("auto_pad", "NOTSET") or "NOTSET"
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for i in range(n):
            target = _cdiv(in_sizes[i] + strides[i] - 1, strides[i])
            k = (kernel[i] - 1) * dilations[i] + 1 if dilate_same else kernel[i]
            need = (target - 1) * strides[i] + k - in_sizes[i]
            if dilate_same:  # Conv clamps; pools keep a negative need (onnxruntime then refuses it)
                need = max(need, 0)
            head = _cdiv(need + 1, 2) if auto == "SAME_LOWER" else _cdiv(need, 2)
            begins.append(head)
            ends.append(need - head)
        return begins, ends
    if auto == "VALID":
        return [0] * n, [0] * n
    if auto != "NOTSET":
        raise _refuse(ctx, f"auto_pad={auto!r}")
    pads = ctx.ints("pads") or [0] * (2 * n)
    return pads[:n], pads[n:]


@register("Conv", since=1)
def conv(ctx, x, w, b=None):
    nsp = x.dim() - 2
    if nsp not in _CONV:
        raise _refuse(ctx, f"a {nsp}-D convolution")
    kernel = ctx.ints("kernel_shape") or list(w.shape[2:])
    strides = ctx.ints("strides") or [1] * nsp
    dilations = ctx.ints("dilations") or [1] * nsp
    group = int(ctx.attr("group", 1))
    begins, ends = _conv_pads(ctx, list(x.shape[2:]), kernel, strides, dilations, dilate_same=True)
    if begins == ends and min(begins, default=0) >= 0:
        padding = begins
    else:
        x = F.pad(x, _torch_pads(begins, ends))
        padding = [0] * nsp
    if nsp == 2 and x.device.type == "cpu":
        # oneDNN computes a depthwise convolution's backward pass 3-4x faster on channels-last
        # input (PP-OCRv4 rec: a training step 3.0 -> 2.4 s); the output stays channels-last,
        # so the next convolution gets it without a copy. Values are unchanged up to rounding.
        x = x.contiguous(memory_format=torch.channels_last)
    return _CONV[nsp](x, w, b, strides, padding, dilations, group)


@register("ConvTranspose", since=1)
def conv_transpose(ctx, x, w, b=None):
    nsp = x.dim() - 2
    if nsp not in _CONV_T:
        raise _refuse(ctx, f"a {nsp}-D transposed convolution")
    in_sizes = list(x.shape[2:])
    kernel = ctx.ints("kernel_shape") or list(w.shape[2:])
    strides = ctx.ints("strides") or [1] * nsp
    dilations = ctx.ints("dilations") or [1] * nsp
    adj = ctx.ints("output_padding") or [0] * nsp
    group = int(ctx.attr("group", 1))
    auto = ctx.attr("auto_pad", "NOTSET") or "NOTSET"
    full = [(in_sizes[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 for i in range(nsp)]
    output_shape = ctx.ints("output_shape")
    if output_shape or auto in ("SAME_UPPER", "SAME_LOWER"):
        # onnxruntime: total padding from the target size; SAME_UPPER puts the extra at the end.
        target = output_shape[-nsp:] if output_shape else [in_sizes[i] * strides[i] for i in range(nsp)]
        begins, ends = [], []
        for i in range(nsp):
            total = full[i] + adj[i] - target[i]
            if total < 0 and not output_shape:
                total = head = 0  # SAME never extends: the output is then the full result
            elif total < 0:
                head = 0  # an explicit output_shape past the full result appends zeros
            elif auto == "SAME_UPPER":
                head = total // 2
            else:
                head = total - total // 2
            begins.append(head)
            ends.append(total - head)
    elif auto == "VALID":
        begins, ends = [0] * nsp, [0] * nsp
    elif auto == "NOTSET":
        pads = ctx.ints("pads") or [0] * (2 * nsp)
        begins, ends = pads[:nsp], pads[nsp:]
    else:
        raise _refuse(ctx, f"auto_pad={auto!r}")
    y = _CONV_T[nsp](x, w, None, strides, 0, 0, group, dilations)
    # Output padding appends zeros at the end; pads crop (negative totals extend with zeros).
    y = F.pad(y, _torch_pads([-p for p in begins], [adj[i] - ends[i] for i in range(nsp)]))
    if b is not None:
        y = y + b.reshape(1, -1, *([1] * nsp))
    return y


# -- pooling ----------------------------------------------------------------------------


class _PoolGeometry:
    """Pads and output sizes of a pooling node, as onnxruntime computes them."""

    def __init__(self, ctx, x, *, ceil_ok: bool, dilation_ok: bool):
        kernel = ctx.ints("kernel_shape")
        if not kernel:
            raise _refuse(ctx, "a pooling node without kernel_shape")
        nsp = len(kernel)
        if x.dim() != nsp + 2:
            raise _refuse(ctx, f"kernel_shape of rank {nsp} on a rank-{x.dim()} input")
        if nsp not in _CONV:
            raise _refuse(ctx, f"{nsp}-D pooling")
        in_sizes = list(x.shape[2:])
        self.kernel = kernel
        self.strides = ctx.ints("strides") or [1] * nsp
        self.dilations = (ctx.ints("dilations") if dilation_ok else None) or [1] * nsp
        ceil = bool(ctx.attr("ceil_mode", 0)) if ceil_ok else False
        self.begins, self.ends = _conv_pads(ctx, in_sizes, kernel, self.strides, self.dilations, dilate_same=False)
        self.outs, self.ext_ends = [], []
        for i in range(nsp):
            keff = (kernel[i] - 1) * self.dilations[i] + 1
            span = in_sizes[i] + self.begins[i] + self.ends[i] - keff
            if ceil:
                out = math.ceil(span / self.strides[i]) + 1
                # The last window must start inside the input or the begin padding.
                if (out - 1) * self.strides[i] >= in_sizes[i] + self.begins[i]:
                    out -= 1
            else:
                out = math.floor(span / self.strides[i]) + 1
            self.outs.append(out)
            # End padding that makes every output window fit (ceil_mode's extra region).
            needed = (out - 1) * self.strides[i] + keff - in_sizes[i] - self.begins[i]
            self.ext_ends.append(max(self.ends[i], needed))
        self.in_sizes = in_sizes
        self.nsp = nsp

    def pad(self, x, value=0.0):
        return F.pad(x, _torch_pads(self.begins, self.ext_ends), value=value)

    def crop(self, y):
        return y[(slice(None), slice(None), *[slice(0, o) for o in self.outs])]

    def window_sum(self, padded):
        """Sum over each window of an already padded [N, C, ...] tensor."""
        if all(d == 1 for d in self.dilations) and padded.is_floating_point():
            # A pooling kernel's backward pass is 4x faster on the CPU than that of a
            # convolution with a ones kernel (PP-OCRv4 rec's pool: 19 -> 5 ms); the sums are the same.
            if self.nsp == 1:
                y = F.avg_pool2d(padded.unsqueeze(-2), (1, *self.kernel), (1, *self.strides),
                                 divisor_override=1).squeeze(-2)
            else:
                y = _AVG_POOL[self.nsp](padded, self.kernel, self.strides, divisor_override=1)
            return self.crop(y)
        n, c = padded.shape[:2]
        flat = padded.reshape(n * c, 1, *padded.shape[2:])
        ones = torch.ones((1, 1, *self.kernel), dtype=padded.dtype, device=padded.device)
        y = _CONV[self.nsp](flat, ones, None, self.strides, 0, self.dilations)
        y = y.reshape(n, c, *y.shape[2:])
        return self.crop(y)

    def region_mask(self, dtype, device, include_pad: bool):
        """1 where a window position counts toward AveragePool's divisor, over the padded grid."""
        mask = torch.ones((1, 1, *self.in_sizes), dtype=dtype, device=device)
        if include_pad:
            mask = F.pad(mask, _torch_pads(self.begins, self.ends), value=1.0)
            extra = [self.ext_ends[i] - self.ends[i] for i in range(self.nsp)]
            return F.pad(mask, _torch_pads([0] * self.nsp, extra), value=0.0)
        return F.pad(mask, _torch_pads(self.begins, self.ext_ends), value=0.0)


_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {2: F.avg_pool2d, 3: F.avg_pool3d}


@register("MaxPool", since=1)
def max_pool(ctx, x):
    g = _PoolGeometry(ctx, x, ceil_ok=ctx.opset >= 10, dilation_ok=ctx.opset >= 10)
    want_indices = _requested(ctx, 1)
    work = x if _is_float(x) else x.double()
    low = torch.finfo(x.dtype).min if _is_float(x) else torch.iinfo(x.dtype).min
    padded = g.pad(work, value=float(low))
    result = _MAXPOOL[g.nsp](padded, g.kernel, g.strides, 0, g.dilations, ceil_mode=False,
                             return_indices=want_indices)
    if not want_indices:
        y = g.crop(result)
        return y if y.dtype == x.dtype else y.to(x.dtype)
    y, idx = result
    y, idx = g.crop(y), g.crop(idx)
    # torch: flat index into the padded spatial grid -> onnxruntime: flat index into the whole
    # input tensor (N, C included), row-major, or column-major over the spatial dims when
    # storage_order=1.
    padded_sizes = list(padded.shape[2:])
    coords = []
    rest = idx
    for size in reversed(padded_sizes):
        coords.append(rest % size)
        rest = rest // size
    coords = coords[::-1]
    coords = [c - g.begins[i] for i, c in enumerate(coords)]
    order = range(g.nsp)
    if int(ctx.attr("storage_order", 0)) == 1:
        order = reversed(range(g.nsp))
    flat = torch.zeros_like(idx)
    for i in order:
        flat = flat * g.in_sizes[i] + coords[i]
    n, c = x.shape[:2]
    plane = math.prod(g.in_sizes)
    base = torch.arange(n * c, dtype=idx.dtype, device=idx.device).reshape(n, c, *([1] * g.nsp)) * plane
    y = y if y.dtype == x.dtype else y.to(x.dtype)
    return y, flat + base


@register("AveragePool", since=1)
def average_pool(ctx, x):
    g = _PoolGeometry(ctx, x, ceil_ok=ctx.opset >= 10, dilation_ok=ctx.opset >= 19)
    include = bool(ctx.attr("count_include_pad", 0)) if ctx.opset >= 7 else False
    sums = g.window_sum(g.pad(x))
    counts = g.window_sum(g.region_mask(x.dtype, x.device, include))
    return sums / counts


@register("LpPool", since=1)
def lp_pool(ctx, x):
    p = ctx.attr("p", 2.0 if ctx.opset < 2 else 2)
    g = _PoolGeometry(ctx, x, ceil_ok=ctx.opset >= 18, dilation_ok=ctx.opset >= 18)
    sums = g.window_sum(g.pad(x.abs() ** float(p)))
    return sums ** (1.0 / float(p))


@register("GlobalAveragePool", since=1)
def global_average_pool(ctx, x):
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True) if x.dim() > 2 else x


@register("GlobalMaxPool", since=1)
def global_max_pool(ctx, x):
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True) if x.dim() > 2 else x


@register("GlobalLpPool", since=1)
def global_lp_pool(ctx, x):
    p = float(ctx.attr("p", 2.0 if ctx.opset < 2 else 2))
    dims = tuple(range(2, x.dim()))
    return (x.abs() ** p).sum(dim=dims, keepdim=True) ** (1.0 / p)


# -- normalisation ----------------------------------------------------------------------


def _channel_view(t, x):
    """Per-channel [C] (or spatial=0 [C, D...]) parameter broadcast against [N, C, D...]."""
    if t.dim() <= 1 and t.numel() == x.shape[1]:
        return t.reshape(1, -1, *([1] * (x.dim() - 2)))
    return t.reshape(1, *x.shape[1:]) if t.numel() == math.prod(x.shape[1:]) else t


@register("BatchNormalization", since=1)
def batch_normalization(ctx, x, scale, bias, mean, var):
    if ctx.opset >= 14 and int(ctx.attr("training_mode", 0)):
        raise _refuse(ctx, "training_mode=1 (batch statistics)")
    if any(_requested(ctx, i) for i in range(1, len(ctx.node.output))):
        # onnxruntime computes batch statistics when the training outputs are requested.
        raise _refuse(ctx, "the training-mode outputs (running/saved mean and variance)")
    if ctx.opset < 7 and int(ctx.attr("is_test", 0)) == 0:
        raise _refuse(ctx, "is_test=0 (training mode)")
    eps = float(ctx.attr("epsilon", 1e-5))
    inv_std = torch.rsqrt(var + eps)
    new_scale = scale * inv_std
    new_bias = bias - mean * new_scale
    return x * _channel_view(new_scale, x) + _channel_view(new_bias, x)


@register("InstanceNormalization", since=1)
def instance_normalization(ctx, x, scale, bias):
    eps = float(ctx.attr("epsilon", 1e-5))
    dims = tuple(range(2, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    centred = x - mean
    var = (centred * centred).mean(dim=dims, keepdim=True)
    return centred * torch.rsqrt(var + eps) * _channel_view(scale, x) + _channel_view(bias, x)


@register("LayerNormalization", since=17)
def layer_normalization(ctx, x, scale, bias=None):
    axis = int(ctx.attr("axis", -1))
    axis = axis + x.dim() if axis < 0 else axis
    eps = float(ctx.attr("epsilon", 1e-5))
    dims = tuple(range(axis, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    centred = x - mean
    var = (centred * centred).mean(dim=dims, keepdim=True)
    inv_std = torch.rsqrt(var + eps)
    y = centred * inv_std * scale
    if bias is not None:
        y = y + bias
    return y, mean, inv_std


@register("LpNormalization", since=1)
def lp_normalization(ctx, x):
    p = int(ctx.attr("p", 2))
    if p not in (1, 2):
        raise _refuse(ctx, f"p={p}")
    axis = int(ctx.attr("axis", -1))
    norm = x.abs().sum(dim=axis, keepdim=True) if p == 1 else torch.sqrt((x * x).sum(dim=axis, keepdim=True))
    # an all-zero slice stays zero (the specification's rule), without a NaN in the gradient
    safe = torch.where(norm == 0, torch.ones_like(norm), norm)
    return torch.where(norm == 0, torch.zeros_like(x), x / safe)


@register("MeanVarianceNormalization", since=9)
def mean_variance_normalization(ctx, x):
    axes = tuple(int(a) for a in ctx.attr("axes", [0, 2, 3]))
    centred = x - x.mean(dim=axes, keepdim=True)
    # onnxruntime's kernel takes the variance of the centred values (two passes), not the
    # function body's E[x^2] - E[x]^2, which cancels badly over few elements
    return centred / torch.sqrt((centred * centred).mean(dim=axes, keepdim=True))


@register("GroupNormalization", since=18)
def group_normalization(ctx, x, scale, bias):
    groups = int(ctx.attr("num_groups"))
    eps = float(ctx.attr("epsilon", 1e-5))
    n, c = x.shape[:2]
    grouped = x.reshape(n, groups, -1)
    # The ONNX function body onnxruntime runs: Var = E[x^2] - E[x]^2 (one pass, as written).
    mean = grouped.mean(dim=2, keepdim=True)
    var = (grouped * grouped).mean(dim=2, keepdim=True) - mean * mean
    normed = (grouped - mean) / torch.sqrt(var + eps)
    if ctx.opset < 21:
        # Opset 18: scale and bias hold one value per group.
        y = normed * scale.reshape(1, groups, 1) + bias.reshape(1, groups, 1)
        return y.reshape(x.shape)
    # Opset 21: one value per channel.
    return normed.reshape(x.shape) * _channel_view(scale, x) + _channel_view(bias, x)


@register("LRN", since=1)
def lrn(ctx, x):
    size = int(ctx.attr("size"))
    alpha = float(ctx.attr("alpha", 1e-4))
    beta = float(ctx.attr("beta", 0.75))
    bias = float(ctx.attr("bias", 1.0))
    c = x.shape[1]
    sq = x * x
    before, after = (size - 1) // 2, (size - 1) - (size - 1) // 2
    pad = [0, 0] * (x.dim() - 2) + [before, after]
    padded = F.pad(sq, pad)
    square_sum = sum(padded[:, i:i + c] for i in range(size))
    return x / (bias + (alpha / size) * square_sum) ** beta


@register("Dropout", since=1)
def dropout(ctx, x, ratio=None, training_mode=None):
    if ctx.opset < 7 and int(ctx.attr("is_test", 0)) == 0:
        raise _refuse(ctx, "is_test=0 (training mode)")
    if training_mode is not None and bool(training_mode.reshape(-1)[0]):
        r = float(ratio.reshape(-1)[0]) if ratio is not None else 0.5
        if r != 0.0:
            raise _refuse(ctx, "training_mode=True (random dropout)")
    if not _requested(ctx, 1):
        return x
    # onnxruntime's inference masks: opset 7-9 zeros of x's type, 10-11 all False, 12+ all True.
    if ctx.opset >= 12:
        mask = torch.ones(x.shape, dtype=torch.bool, device=x.device)
    elif ctx.opset >= 10:
        mask = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    else:
        mask = torch.zeros_like(x)
    return x, mask


# -- softmax family -----------------------------------------------------------------------


def _softmax_family(ctx, x, fn):
    if ctx.opset < 13:
        axis = int(ctx.attr("axis", 1))
        axis = axis + x.dim() if axis < 0 else axis
        rows = math.prod(x.shape[:axis])
        return fn(x.reshape(rows, -1), 1).reshape(x.shape)
    return fn(x, int(ctx.attr("axis", -1)))


def _hardmax(x, dim):
    idx = x.argmax(dim=dim, keepdim=True)
    return torch.zeros_like(x).scatter(dim, idx, 1.0)


@register("Softmax", since=1)
def softmax(ctx, x):
    return _softmax_family(ctx, x, lambda t, d: torch.softmax(t, d))


@register("LogSoftmax", since=1)
def log_softmax(ctx, x):
    return _softmax_family(ctx, x, lambda t, d: torch.log_softmax(t, d))


@register("Hardmax", since=1)
def hardmax(ctx, x):
    return _softmax_family(ctx, x, _hardmax)


# -- padding --------------------------------------------------------------------------------


def _pad_index(n: int, begin: int, end: int, mode: str) -> torch.Tensor:
    i = torch.arange(-begin, n + end)
    if mode == "edge":
        return i.clamp(0, n - 1)
    if mode == "wrap":
        return i.remainder(n)
    # reflect (mirror without repeating the edge)
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    m = i.remainder(period)
    return torch.where(m < n, m, period - m)


def _pad(ctx, x, pads, value, mode, axes=None):
    r = x.dim()
    axes = list(range(r)) if axes is None else [a + r if a < 0 else a for a in axes]
    k = len(axes)
    if len(pads) != 2 * k:
        raise _refuse(ctx, f"{len(pads)} pads for {k} axes")
    begins, ends = [0] * r, [0] * r
    for j, a in enumerate(axes):
        begins[a], ends[a] = pads[j], pads[k + j]
    if mode == "constant":
        if x.dtype == torch.bool:
            return F.pad(x.to(torch.uint8), _torch_pads(begins, ends), value=int(bool(value))).bool()
        return F.pad(x, _torch_pads(begins, ends), value=value)
    if mode not in ("reflect", "edge", "wrap"):
        raise _refuse(ctx, f"mode={mode!r}")
    # Negative pads crop first, as onnxruntime does; then the positive ones are gathered.
    for a in range(r):
        if begins[a] < 0 or ends[a] < 0:
            start = max(-begins[a], 0)
            stop = x.shape[a] - max(-ends[a], 0)
            x = x.narrow(a, start, stop - start)
    for a in range(r):
        b, e = max(begins[a], 0), max(ends[a], 0)
        if b or e:
            if x.shape[a] == 0:
                raise _refuse(ctx, f"{mode} padding of an empty axis")
            x = x.index_select(a, _pad_index(x.shape[a], b, e, mode).to(x.device))
    return x


@register("Pad", since=1)
def pad_v1(ctx, x):
    pads = ctx.ints("pads") if "pads" in ctx.attrs else ctx.ints("paddings")
    value = float(ctx.attr("value", 0.0))
    if not _is_float(x):
        value = int(value)
    return _pad(ctx, x, pads, value, ctx.attr("mode", "constant"))


@register("Pad", since=11)
def pad_v11(ctx, x, pads, constant_value=None, axes=None):
    value = 0
    if constant_value is not None and constant_value.numel():
        value = constant_value.reshape(-1)[0].item()
    if _is_float(x):
        value = float(value)
    elif x.dtype != torch.bool:
        value = int(value)
    ax = tensor_ints(axes) if axes is not None and ctx.opset >= 18 else None
    return _pad(ctx, x, tensor_ints(pads), value, ctx.attr("mode", "constant"), ax)


# -- resize -----------------------------------------------------------------------------------

_F32 = np.float32


def _original_coords(mode: str, out_len: int, in_len: int, scale: float, roi_start: float,
                     roi_end: float) -> np.ndarray:
    """onnxruntime's resized -> original coordinate mapping, in its float32 arithmetic."""
    x = np.arange(out_len, dtype=_F32)
    s = _F32(scale)
    l_in, l_out = _F32(in_len), _F32(out_len)
    half, one = _F32(0.5), _F32(1.0)
    with np.errstate(all="ignore"):
        if mode == "asymmetric":
            return x / s
        if mode == "half_pixel":
            return (x + half) / s - half
        if mode == "pytorch_half_pixel":
            return (x + half) / s - half if out_len > 1 else np.zeros(out_len, _F32)
        if mode == "tf_half_pixel_for_nn":
            return (x + half) / s
        if mode == "align_corners":
            return np.zeros(out_len, _F32) if out_len == 1 else x * (l_in - one) / (l_out - one)
        if mode == "tf_crop_and_resize":
            rs, re = _F32(roi_start), _F32(roi_end)
            if out_len > 1:
                return rs * (l_in - one) + (x * (re - rs) * (l_in - one)) / (l_out - one)
            return np.full(out_len, half * (rs + re) * (l_in - one), dtype=_F32)
        if mode == "half_pixel_symmetric":
            output_width = s * l_in
            adjustment = l_out / output_width
            center = l_in / _F32(2)
            offset = center * (one - adjustment)
            orig = float(offset) + (x.astype(np.float64) + 0.5) / float(s) - 0.5
            return orig.astype(_F32)
    raise ValueError(mode)


def _round_half_away(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.float64)
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def _nearest_index(mode: str, orig: np.ndarray, downsample: bool) -> np.ndarray:
    if mode == "simple":
        return np.ceil(orig) if downsample else np.trunc(orig)
    if mode == "floor":
        return np.floor(orig)
    if mode == "ceil":
        return np.ceil(orig)
    if mode in ("round_prefer_floor", "round_prefer_ceil"):
        # onnxruntime (>= 1.2x) treats a fraction within 1e-6 of one half as a tie, so float32
        # noise in the coordinate (14.499999 for 14.5) does not flip the rounding.
        low = np.floor(orig)
        tie = np.abs((orig - low) - _F32(0.5)) <= _F32(1e-6)
        pick = low if mode == "round_prefer_floor" else np.ceil(orig)
        return np.where(tie, pick, _round_half_away(orig))
    raise ValueError(mode)


def _cubic_coeffs(s: np.ndarray, a: float) -> np.ndarray:
    a = _F32(a)
    s = np.abs(s.astype(_F32))
    one, two = _F32(1), _F32(2)
    c0 = ((a * (s + one) - _F32(5) * a) * (s + one) + _F32(8) * a) * (s + one) - _F32(4) * a
    c1 = ((a + two) * s - (a + _F32(3))) * s * s + one
    c2 = ((a + two) * (one - s) - (a + _F32(3))) * (one - s) * (one - s) + one
    c3 = ((a * (two - s) - _F32(5) * a) * (two - s) + _F32(8) * a) * (two - s) - _F32(4) * a
    return np.stack([c0, c1, c2, c3], axis=1).astype(_F32)


def _aa_filter(kind: str, t: np.ndarray, a: float) -> np.ndarray:
    t = np.abs(t.astype(_F32))
    if kind == "linear":
        return np.where(t < 1, _F32(1) - t, _F32(0)).astype(_F32)
    a = _F32(a)
    near = ((a + _F32(2)) * t - (a + _F32(3))) * t * t + _F32(1)
    far = (((t - _F32(5)) * t + _F32(8)) * t - _F32(4)) * a
    return np.where(t < 1, near, np.where(t < 2, far, _F32(0))).astype(_F32)


def _antialias_weights(kind: str, n_in: int, orig: np.ndarray, rscale: float, exclude_outside: bool,
                       cubic_a: float):
    """onnxruntime's anti-aliasing filter (Pillow-style) along one axis: (idx, weights) [out, K].

    Window [floor(c - support + 0.5), floor(c + support + 0.5)) around c = orig + 0.5, with the
    support widened by 1/scale when shrinking; out-of-range taps are clamped to the edge, or
    dropped with exclude_outside; weights renormalised to sum 1.
    """
    n_out = orig.shape[0]
    scale = _F32(1) / _F32(rscale)
    half_support = _F32(1.0 if kind == "linear" else 2.0)
    support = half_support * scale if scale >= 1 else half_support
    inv_scale = _F32(1) / scale if scale >= 1 else _F32(1)
    centre = orig + _F32(0.5)
    lo = np.floor((centre - support).astype(np.float64) + 0.5).astype(np.int64)
    hi = np.floor((centre + support).astype(np.float64) + 0.5).astype(np.int64)
    if exclude_outside:
        lo, hi = np.maximum(lo, 0), np.minimum(hi, n_in)
    k = int(max(1, (hi - lo).max()))
    pos = lo[:, None] + np.arange(k)[None, :]
    valid = pos < hi[:, None]
    w = _aa_filter(kind, (pos.astype(_F32) - centre[:, None] + _F32(0.5)) * inv_scale, cubic_a)
    w = np.where(valid, w, _F32(0)).astype(_F32)
    total = np.zeros(n_out, _F32)
    for j in range(k):  # sequential float32 sum, like the kernel
        total = (total + w[:, j]).astype(_F32)
    norm = (total != 0) & (total != 1)
    w = np.where(norm[:, None], w / np.where(norm, total, _F32(1))[:, None], w).astype(_F32)
    return np.clip(pos, 0, n_in - 1), w


def _gather_axis(x, axis, idx: np.ndarray, weights: np.ndarray | None):
    """y[.., o, ..] = sum_k weights[o, k] * x[.., idx[o, k], ..] along ``axis``."""
    out, k = idx.shape
    g = x.index_select(axis, torch.from_numpy(np.ascontiguousarray(idx.reshape(-1), dtype=np.int64)).to(x.device))
    if weights is None:
        return g
    shape = list(x.shape)
    shape[axis:axis + 1] = [out, k]
    g = g.reshape(shape)
    w = torch.from_numpy(np.ascontiguousarray(weights)).to(device=x.device, dtype=x.dtype)
    w = w.reshape(out, k, *([1] * (x.dim() - axis - 1)))
    return (g * w).sum(dim=axis + 1)


def _resize(ctx, x, roi, scales, sizes, *, legacy: bool, scales_list=None):
    r = x.dim()
    mode = ctx.attr("mode", "nearest")
    if mode == "bilinear":
        mode = "linear"
    if mode not in ("nearest", "linear", "cubic"):
        raise _refuse(ctx, f"mode={mode!r}")
    if legacy:
        coord, nearest_mode = "asymmetric", "simple"
    else:
        coord = ctx.attr("coordinate_transformation_mode", "half_pixel")
        nearest_mode = ctx.attr("nearest_mode", "round_prefer_floor")
    antialias = ctx.opset >= 18 and bool(int(ctx.attr("antialias", 0)))
    if antialias and mode == "nearest":
        raise _refuse(ctx, "antialias=1 with nearest mode")
    exclude_outside = bool(ctx.attr("exclude_outside", 0))
    cubic_a = float(ctx.attr("cubic_coeff_a", -0.75))
    extrapolation = float(ctx.attr("extrapolation_value", 0.0))
    axes = ctx.ints("axes") if ctx.opset >= 18 else None
    axes = list(range(r)) if not axes else [a + r if a < 0 else a for a in axes]
    in_shape = [int(d) for d in x.shape]
    out_shape = list(in_shape)
    scale_of = [1.0] * r
    if scales_list is None and scales is not None and scales.numel() > 0:
        scales_list = [float(v) for v in scales.reshape(-1).tolist()]
    if scales_list:
        if len(scales_list) != len(axes):
            raise _refuse(ctx, f"{len(scales_list)} scales for {len(axes)} axes")
        for a, s in zip(axes, scales_list):
            scale_of[a] = float(_F32(s))
            out_shape[a] = int(_F32(s) * _F32(in_shape[a]))
    elif sizes is not None and sizes.numel() > 0:
        sz = tensor_ints(sizes)
        if len(sz) != len(axes):
            raise _refuse(ctx, f"{len(sz)} sizes for {len(axes)} axes")
        for a, s in zip(axes, sz):
            out_shape[a] = s
            scale_of[a] = 1.0 if in_shape[a] == 0 else float(_F32(s) / _F32(in_shape[a]))
        policy = ctx.attr("keep_aspect_ratio_policy", "stretch") if ctx.opset >= 18 else "stretch"
        if policy != "stretch":
            pick = min if policy == "not_larger" else max
            chosen = float(pick(_F32(scale_of[a]) for a in axes))
            for a in axes:
                scale_of[a] = chosen
                out_shape[a] = int(_round_half_away(np.array(_F32(chosen) * _F32(in_shape[a]))))
    else:
        raise _refuse(ctx, "a Resize without scales or sizes")
    if out_shape == in_shape:
        return x
    if 0 in out_shape:
        return x.new_zeros(out_shape)
    if mode != "nearest" and not _is_float(x):
        raise _refuse(ctx, f"{mode} resizing of {x.dtype} data")
    roi_start, roi_end = [0.0] * r, [1.0] * r
    if coord == "tf_crop_and_resize" and roi is not None and roi.numel() > 0:
        vals = [float(v) for v in roi.reshape(-1).float().tolist()]
        k = len(vals) // 2
        roi_axes = axes if k == len(axes) else list(range(r))
        for j, a in enumerate(roi_axes):
            roi_start[a], roi_end[a] = vals[j], vals[k + j]
    extrapolate = coord == "tf_crop_and_resize"
    filtered = set()
    if antialias:
        # The axes onnxruntime's anti-aliasing kernels filter (even at scale 1).
        if r in (2, 3):
            filtered = set(range(r))
        elif r == 4:
            filtered = {2, 3} if scale_of[1] == 1.0 else {1, 2}
        elif r == 5:
            filtered = {2, 3, 4}
        if any(scale_of[a] != 1.0 for a in range(r) if a not in filtered):
            raise _refuse(ctx, f"antialiased {mode} resizing of axes onnxruntime does not filter")
        if extrapolate and r == 4 and filtered == {1, 2}:
            # onnxruntime's NHWC anti-aliasing kernel indexes its extrapolation mask wrongly.
            raise _refuse(ctx, "antialias with tf_crop_and_resize on an NHWC-layout (scales [1, h, w, 1]) input")
    outside = None  # bool mask of outputs that take the extrapolation value
    y = x
    for a in range(r):
        n_in, n_out, s = in_shape[a], out_shape[a], scale_of[a]
        if s == 1.0 and (mode != "nearest" or r > 1) and a not in filtered:
            if n_out != n_in:
                raise _refuse(ctx, "a scale of 1 with a different output size")
            continue
        if a in filtered and s == 1.0:
            orig = np.arange(n_out, dtype=_F32)
        else:
            orig = _original_coords(coord, n_out, n_in, s, roi_start[a], roi_end[a])
        if a in filtered:
            idx, w = _antialias_weights(mode, n_in, orig, s, exclude_outside, cubic_a)
        if extrapolate:
            oob = (orig < 0) | (orig > _F32(n_in - 1))
            if oob.any():
                shape = [1] * r
                shape[a] = n_out
                m = torch.from_numpy(oob).reshape(shape).to(x.device)
                outside = m if outside is None else (outside | m)
        if a in filtered:
            y = _gather_axis(y, a, idx, w)
        elif mode == "nearest":
            idx = np.clip(_nearest_index(nearest_mode, orig, s < 1), 0, n_in - 1).astype(np.int64)
            y = _gather_axis(y, a, idx.reshape(-1, 1), None)
        elif mode == "linear":
            c = np.clip(orig, _F32(0), _F32(n_in - 1)).astype(_F32)
            x1 = np.minimum(c.astype(np.int64), n_in - 1)
            x2 = np.minimum(x1 + 1, n_in - 1)
            d1 = np.abs(c - x1.astype(_F32))
            d2 = np.abs(c - x2.astype(_F32))
            same = x1 == x2
            d1[same] = 0.5
            d2[same] = 0.5
            y = _gather_axis(y, a, np.stack([x1, x2], 1), np.stack([d2, d1], 1))
        else:
            base = np.floor(orig).astype(np.int64)
            coeffs = _cubic_coeffs(orig - base.astype(_F32), cubic_a)
            raw = base[:, None] + np.arange(-1, 3)[None, :]
            if exclude_outside:
                coeffs = np.where((raw < 0) | (raw >= n_in), _F32(0), coeffs).astype(_F32)
                total = coeffs[:, 0] + coeffs[:, 1] + coeffs[:, 2] + coeffs[:, 3]
                coeffs = (coeffs / total[:, None]).astype(_F32)
            y = _gather_axis(y, a, np.clip(raw, 0, n_in - 1), coeffs)
    if outside is not None:
        y = torch.where(outside, torch.tensor(extrapolation, dtype=y.dtype, device=y.device), y)
    return y


@register("Resize", since=10)
def resize_v10(ctx, x, scales):
    return _resize(ctx, x, None, scales, None, legacy=True)


@register("Resize", since=11)
def resize_v11(ctx, x, roi=None, scales=None, sizes=None):
    return _resize(ctx, x, roi, scales, sizes, legacy=False)


@register("Upsample", since=7)
def upsample_v7(ctx, x):
    return _resize(ctx, x, None, None, None, legacy=True, scales_list=[float(s) for s in ctx.attr("scales")])


@register("Upsample", since=9)
def upsample_v9(ctx, x, scales):
    return _resize(ctx, x, None, scales, None, legacy=True)


# -- depth <-> space ----------------------------------------------------------------------------


@register("DepthToSpace", since=1)
def depth_to_space(ctx, x):
    bs = int(ctx.attr("blocksize"))
    n, c, h, w = x.shape
    mode = ctx.attr("mode", "DCR") if ctx.opset >= 11 else "DCR"
    if mode == "DCR":
        y = x.reshape(n, bs, bs, c // (bs * bs), h, w).permute(0, 3, 4, 1, 5, 2)
    elif mode == "CRD":
        y = x.reshape(n, c // (bs * bs), bs, bs, h, w).permute(0, 1, 4, 2, 5, 3)
    else:
        raise _refuse(ctx, f"mode={mode!r}")
    return y.reshape(n, c // (bs * bs), h * bs, w * bs)


@register("SpaceToDepth", since=1)
def space_to_depth(ctx, x):
    bs = int(ctx.attr("blocksize"))
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // bs, bs, w // bs, bs).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * bs * bs, h // bs, w // bs)
