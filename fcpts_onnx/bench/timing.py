"""The timing loop and its statistics, the same for every runtime.

The DeepSparse worker runs a copy of :func:`measure` in its own interpreter (it may import
nothing from fcpts_onnx); the statistics are computed here for every runtime alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import BenchError


@dataclass(frozen=True)
class Budget:
    """How long each case runs: ``warmup`` untimed runs, then ``iterations`` timed runs, or
    timed runs until ``seconds`` have passed (and at least ``min_iterations`` ran)."""

    warmup: int = 3
    iterations: int | None = None
    seconds: float | None = 5.0
    min_iterations: int = 3

    def __post_init__(self) -> None:
        if self.iterations is None and self.seconds is None:
            raise BenchError("give a budget per case: --iterations N or --time SECONDS")
        if self.iterations is not None and (not isinstance(self.iterations, int) or self.iterations < 1):
            raise BenchError(f"--iterations must be a positive integer (got {self.iterations!r})")
        if self.seconds is not None and not self.seconds > 0:
            raise BenchError(f"--time must be a positive number of seconds (got {self.seconds!r})")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise BenchError(f"--warmup must be a non-negative integer (got {self.warmup!r})")

    def describe(self) -> str:
        what = f"{self.iterations} iterations" if self.iterations is not None else f"{self.seconds:g} s"
        return f"{what} per case after {self.warmup} warm-up run(s)"

    def to_dict(self) -> dict:
        return {"warmup_iterations": self.warmup, "iterations": self.iterations, "seconds": self.seconds,
                "min_iterations": self.min_iterations}


def measure(run_once: Callable[[], object], budget: Budget) -> list[float]:
    """Latency of each timed call of ``run_once`` in milliseconds."""
    for _ in range(budget.warmup):
        run_once()
    latencies: list[float] = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        run_once()
        latencies.append((time.perf_counter() - t0) * 1e3)
        if budget.iterations is not None:
            if len(latencies) >= budget.iterations:
                break
        elif time.perf_counter() - start >= budget.seconds and len(latencies) >= budget.min_iterations:
            break
    return latencies


def latency_stats(latencies_ms: Sequence[float], batch_size: int) -> dict[str, float | int]:
    """deepsparse.benchmark-style figures: items/s, iterations, seconds, latency median/p90/p99/mean/std."""
    lat = np.asarray(latencies_ms, dtype=np.float64)
    if lat.size == 0 or not np.all(np.isfinite(lat)) or np.any(lat < 0):
        raise BenchError("the runtime reported no usable latencies")
    seconds = float(lat.sum() / 1e3)
    return {
        "iterations": int(lat.size),
        "seconds_ran": seconds,
        "items_per_sec": batch_size * lat.size / seconds if seconds > 0 else float("inf"),
        "median_latency_ms": float(np.median(lat)),
        "mean_latency_ms": float(lat.mean()),
        "std_latency_ms": float(lat.std()),
        "min_latency_ms": float(lat.min()),
        "p90_latency_ms": float(np.percentile(lat, 90)),
        "p99_latency_ms": float(np.percentile(lat, 99)),
    }
