"""Allocation methods: how many weights each layer loses under one global target."""

from __future__ import annotations

import numpy as np

from . import erk, global_magnitude, lamp, uniform  # noqa: F401  (registers the methods)
from .problem import AllocationProblem, check_feasible, validate_counts
from .registry import ALLOCATORS, get_allocator, register

__all__ = ["ALLOCATORS", "AllocationProblem", "allocate", "get_allocator", "register"]


def allocate(method: str, problem: AllocationProblem) -> np.ndarray:
    """Per-layer zero counts from ``method``, checked to hit round(S * N) exactly."""
    allocator = get_allocator(method)
    check_feasible(problem)
    return validate_counts(allocator(problem), problem, method)
