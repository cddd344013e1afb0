"""The registry of allocation methods: name -> function returning per-layer zero counts."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import OptionError
from .problem import AllocationProblem

# An allocator receives the problem and returns how many weights to zero in each layer.
# The driver (problem.allocate) checks the result: exact total, within every layer's bounds.
Allocator = Callable[[AllocationProblem], np.ndarray]

ALLOCATORS: dict[str, Allocator] = {}


def register(name: str) -> Callable[[Allocator], Allocator]:
    def wrap(fn: Allocator) -> Allocator:
        if name in ALLOCATORS:
            raise ValueError(f"allocation method {name!r} registered twice")
        ALLOCATORS[name] = fn
        return fn
    return wrap


def get_allocator(name: str) -> Allocator:
    try:
        return ALLOCATORS[name]
    except KeyError:
        raise OptionError(
            f"unknown method {name!r}; choose one of {', '.join(sorted(ALLOCATORS))}"
        ) from None
