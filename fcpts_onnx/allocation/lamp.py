"""lamp: layer-adaptive magnitude pruning (Lee et al., ICLR 2021).

Sort a layer's weights ascending by |w|; score(u) = w_u^2 / sum_{v >= u} w_v^2. One global
threshold on the scores. Scores are non-decreasing along the sorted order, so a layer's k
smallest scores are its k smallest weights.
"""

from __future__ import annotations

import numpy as np

from .problem import AllocationProblem, smallest_scores
from .registry import register


def lamp_scores(magnitude: np.ndarray) -> np.ndarray:
    """LAMP scores in ascending-|w| order (the order is all the allocator needs)."""
    squared = np.sort(magnitude.astype(np.float64)) ** 2
    tail = np.cumsum(squared[::-1])[::-1]  # sum over v >= u
    with np.errstate(invalid="ignore", divide="ignore"):
        scores = np.where(tail > 0, squared / tail, 0.0)
    return scores


@register("lamp")
def lamp(problem: AllocationProblem) -> np.ndarray:
    return smallest_scores([lamp_scores(m) for m in problem.magnitudes], problem)
