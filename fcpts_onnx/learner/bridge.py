"""The bridge: each layer's sparsity as a differentiable function of its threshold.

Forward: s_l(t) = fraction of |W_l| <= t, counted exactly. Backward: ds_l/dt = p_l(t), the
density of |W_l| at t from a Gaussian kernel density estimate (Silverman bandwidth) on a
random subsample, as the paper specifies (the reference code uses a 100-bin histogram).
"""

from __future__ import annotations

import math

import torch

KDE_SAMPLES = 4096


def silverman_bandwidth(sample: torch.Tensor) -> torch.Tensor:
    """h = 0.9 * min(std, IQR / 1.34) * n^(-1/5), never zero."""
    n = sample.numel()
    std = sample.std()
    q = torch.quantile(sample, torch.tensor([0.25, 0.75], dtype=sample.dtype, device=sample.device))
    spread = torch.minimum(std, (q[1] - q[0]) / 1.34)
    spread = torch.where(spread > 0, spread, std)
    h = 0.9 * spread * n ** (-0.2)
    return torch.clamp(h, min=float(sample.abs().max()) * 1e-6 + 1e-12)


def kde_density(t: torch.Tensor, sample: torch.Tensor, bandwidth: torch.Tensor) -> torch.Tensor:
    """Gaussian KDE of ``sample`` evaluated at ``t``."""
    z = (t - sample) / bandwidth
    return torch.exp(-0.5 * z * z).sum() / (sample.numel() * bandwidth * math.sqrt(2 * math.pi))


class _LayerSparsity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, magnitudes, sample, bandwidth):
        ctx.save_for_backward(t, sample, bandwidth)
        return (magnitudes <= t).float().mean()

    @staticmethod
    def backward(ctx, grad):
        t, sample, bandwidth = ctx.saved_tensors
        return grad * kde_density(t, sample, bandwidth), None, None, None


def layer_sparsity(t: torch.Tensor, magnitudes: torch.Tensor, sample: torch.Tensor,
                   bandwidth: torch.Tensor) -> torch.Tensor:
    """Exact sparsity of a layer at threshold ``t`` with the KDE density as its gradient."""
    return _LayerSparsity.apply(t, magnitudes, sample, bandwidth)


def kde_index(numel: int, generator: torch.Generator, n: int = KDE_SAMPLES) -> torch.Tensor | None:
    """Positions of a fixed random subsample of a layer (None: use every weight).

    The positions stay fixed; the values are re-read each step, so the estimate follows the
    weights as reconstruction moves them.
    """
    if numel <= n:
        return None
    return torch.randperm(numel, generator=generator)[:n]
