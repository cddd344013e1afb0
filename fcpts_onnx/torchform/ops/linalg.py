"""Matrix products: MatMul, Gemm, Einsum."""

from __future__ import annotations

import torch

from ..registry import register


@register("MatMul", since=1)
def matmul(ctx, a, b):
    return torch.matmul(a, b)


@register("Gemm", since=1)
def gemm(ctx, a, b, c=None):
    # Y = alpha * A' B' + beta * C, A' = A^T if transA, B' = B^T if transB.
    if ctx.attr("transA", 0):
        a = a.transpose(0, 1)
    if ctx.attr("transB", 0):
        b = b.transpose(0, 1)
    alpha, beta = ctx.attr("alpha", 1.0), ctx.attr("beta", 1.0)
    y = torch.matmul(a, b)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return y


@register("Einsum", since=12)
def einsum(ctx, *inputs):
    return torch.einsum(ctx.attr("equation").replace(" ", ""), *inputs)
