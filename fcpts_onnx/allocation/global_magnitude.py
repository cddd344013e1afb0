"""global: one magnitude threshold over all prunable weights."""

from __future__ import annotations

import numpy as np

from .problem import AllocationProblem, smallest_scores
from .registry import register


@register("global")
def global_magnitude(problem: AllocationProblem) -> np.ndarray:
    return smallest_scores(problem.magnitudes, problem)
