"""Deployment benchmarking: what sparsity buys on real runtimes (``fcpts-onnx bench``).

Modules, one job each:

- ``runners``: the runtime registry (onnxruntime CPU/CUDA in process, DeepSparse out of process)
- ``protocol`` / ``deepsparse_worker``: the JSON protocol with the DeepSparse interpreter
- ``inputs``: feeds per batch size, generated or from a calibration file
- ``timing``: warm-up, iteration/time budget, latency statistics
- ``sizes``: file, zip and sparse_initializer sizes
- ``macs``: MACs per layer and on non-zero weights
- ``core``: ``benchmark()`` over models x runtimes x batch sizes
- ``report`` / ``plot``: table, markdown, PNG
"""

from __future__ import annotations

from .core import BenchResult, bench_optimized, benchmark
from .errors import BenchError, WorkerError
from .runners import RUNTIMES, DeepSparseRunner, OnnxRuntimeRunner
from .timing import Budget

__all__ = ["RUNTIMES", "BenchError", "BenchResult", "Budget", "DeepSparseRunner", "OnnxRuntimeRunner",
           "WorkerError", "bench_optimized", "benchmark"]
