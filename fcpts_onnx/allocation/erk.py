"""erk: Erdos-Renyi-Kernel densities (Evci et al., "Rigging the Lottery", ICML 2020).

density_l = min(1, eps * sum(dims_l) / prod(dims_l)), eps chosen so the global target
holds; layers that would exceed density 1 stay dense and the rest are rescaled.
"""

from __future__ import annotations

import numpy as np

from .problem import AllocationProblem, solve_monotone
from .registry import register


def erk_ratios(shapes: list[tuple[int, ...]]) -> np.ndarray:
    return np.array([sum(s) / float(np.prod(s)) for s in shapes], dtype=np.float64)


def erk_zero_counts(problem: AllocationProblem) -> np.ndarray:
    ratios = erk_ratios(problem.shapes)
    sizes = problem.sizes.astype(np.float64)

    def zeros_at(eps: float) -> np.ndarray:
        return sizes * (1.0 - np.minimum(1.0, eps * ratios))

    # eps = 0 zeroes everything; eps = 1/min(ratio) keeps every layer dense.
    return solve_monotone(zeros_at, 0.0, 1.0 / float(ratios.min()), problem)


register("erk")(erk_zero_counts)
