"""onnxruntime contrib operators (domain com.microsoft) that its offline optimizer writes.

A model saved with ``graph_optimization_level = ORT_ENABLE_EXTENDED`` and
``optimized_model_filepath`` carries fused nodes: FusedConv (Conv + activation, optionally
+ a residual Z), FusedGemm (Gemm + activation), FusedMatMul (MatMul with transposes and a
scale) and the Gelu family. Each fused op calls the plain op's implementation and then the
activation, so the two never drift apart; semantics follow onnxruntime's CPU kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import register
from .linalg import gemm
from .nn import _refuse, conv

_DOMAIN = "com.microsoft"


def _activation(ctx, y, name: str, params: list[float]):
    """``y`` through the named activation; ``params`` are its float attributes in order."""
    if name in ("", None):
        return y
    if name == "Relu":
        return torch.relu(y)
    if name == "Tanh":
        return torch.tanh(y)
    if name == "Sigmoid":
        return torch.sigmoid(y)
    if name == "LeakyRelu":
        return F.leaky_relu(y, params[0] if params else 0.01)
    if name == "HardSigmoid":
        alpha, beta = (params + [0.2, 0.5][len(params):])[:2]
        return torch.clamp(alpha * y + beta, 0.0, 1.0)
    if name == "Clip":
        low, high = (params + [float("-inf"), float("inf")][len(params):])[:2]
        return torch.clamp(y, low, high)
    raise _refuse(ctx, f"activation={name!r}")


@register("FusedConv", since=1, domain=_DOMAIN)
def fused_conv(ctx, x, w, b=None, z=None):
    # onnxruntime adds Z (the residual of a fused Conv + Add) after the bias, before the activation.
    y = conv(ctx, x, w, b)
    if z is not None:
        y = y + z
    return _activation(ctx, y, ctx.attr("activation", ""), [float(p) for p in ctx.attr("activation_params", [])])


# FusedGemm copies the activation's attributes with an "activation_" prefix, in the order the
# activation defines them (LeakyRelu alpha; HardSigmoid alpha, beta).
_GEMM_ACTIVATION_PARAMS = {"LeakyRelu": ("alpha",), "HardSigmoid": ("alpha", "beta")}


@register("FusedGemm", since=1, domain=_DOMAIN)
def fused_gemm(ctx, a, b, c=None):
    name = ctx.attr("activation", "")
    params = [float(ctx.attr(f"activation_{p}")) for p in _GEMM_ACTIVATION_PARAMS.get(name, ())
              if ctx.attr(f"activation_{p}") is not None]
    if name == "Clip":
        # Clip's bounds are inputs, not attributes; onnxruntime's Gemm fusion never produces it.
        raise _refuse(ctx, "activation='Clip'")
    return _activation(ctx, gemm(ctx, a, b, c), name, params)


def _logical_operand(t, trans_batch: bool, trans: bool):
    """The [batch..., rows, cols] operand that FusedMatMul multiplies.

    With transBatch the tensor is stored with its first axis holding the rows:
    [rows, batch..., cols] is read as [batch..., rows, cols]; trans then swaps the last two.
    """
    if t.dim() >= 3 and trans_batch:
        t = t.permute(*range(1, t.dim() - 1), 0, t.dim() - 1)
    if t.dim() >= 2 and trans:
        t = t.transpose(-1, -2)
    return t


@register("FusedMatMul", since=1, domain=_DOMAIN)
def fused_matmul(ctx, a, b):
    a = _logical_operand(a, bool(ctx.attr("transBatchA", 0)), bool(ctx.attr("transA", 0)))
    b = _logical_operand(b, bool(ctx.attr("transBatchB", 0)), bool(ctx.attr("transB", 0)))
    y = torch.matmul(a, b)
    alpha = float(ctx.attr("alpha", 1.0))
    return y * alpha if alpha != 1.0 else y


@register("Gelu", since=1, domain=_DOMAIN)
def gelu(ctx, x):
    return F.gelu(x)


@register("BiasGelu", since=1, domain=_DOMAIN)
def bias_gelu(ctx, x, bias):
    return F.gelu(x + bias)


@register("FastGelu", since=1, domain=_DOMAIN)
def fast_gelu(ctx, x, bias=None):
    if bias is not None:
        x = x + bias
    return F.gelu(x, approximate="tanh")


@register("QuickGelu", since=1, domain=_DOMAIN)
def quick_gelu(ctx, x):
    return x * torch.sigmoid(float(ctx.attr("alpha", 1.702)) * x)
