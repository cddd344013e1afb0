"""uniform: every layer gets the target sparsity (up to rounding and bounds)."""

from __future__ import annotations

import numpy as np

from .problem import AllocationProblem, solve_monotone
from .registry import register


@register("uniform")
def uniform(problem: AllocationProblem) -> np.ndarray:
    # s * N_l per layer; s moves off the target only where bounds bite (existing zeros, caps).
    return solve_monotone(lambda s: s * problem.sizes.astype(np.float64), 0.0, 1.0, problem)
