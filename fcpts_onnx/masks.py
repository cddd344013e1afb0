"""From per-layer zero counts to masked weights: zero each layer's k smallest |w|."""

from __future__ import annotations

import numpy as np


def magnitude(values: np.ndarray) -> np.ndarray:
    """|w| flattened as float32 (fp16/bf16 upcast exactly; float64 kept for ranking)."""
    flat = values.reshape(-1)
    dtype = np.float64 if flat.dtype == np.float64 else np.float32
    return np.abs(flat.astype(dtype))


def zero_smallest(values: np.ndarray, n_zeros: int) -> np.ndarray:
    """A copy of ``values`` with its ``n_zeros`` smallest magnitudes set to zero.

    Ties are broken by position (stable sort), so the result is deterministic; existing
    zeros are the smallest magnitudes and are always among those counted.
    """
    out = values.copy().reshape(-1)
    if n_zeros > 0:
        order = np.argsort(magnitude(values), kind="stable")
        out[order[:n_zeros]] = 0
    return out.reshape(values.shape)


def count_zeros(values: np.ndarray) -> int:
    return int(np.count_nonzero(values.reshape(-1) == 0))
