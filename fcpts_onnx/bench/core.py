"""``benchmark()``: every model x runtime x batch size, timed, sized and counted.

The first model is the dense reference: each case's speedup is given against that model
on the same runtime, and against that model on onnxruntime (CPU). Outputs of every runtime
are compared with onnxruntime's on the same inputs, so a runtime that computes something
else shows up.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..calibration import static_batch
from ..onnx_io import LoadedModel, load_model
from ..sparse_storage import densify, has_sparse_storage
from .errors import BenchError
from .inputs import InputSource
from .macs import find_weights, macs_summary
from .runners import BASELINE, Case, SkipCase, make_runners
from .sizes import model_sizes
from .timing import Budget, latency_stats

DEFAULT_BATCHES = (1, 16)
OPTIMIZE_BUDGET = Budget(warmup=2, seconds=1.0, min_iterations=3)  # optimize --bench: about a second per case
ORT_NOTE = ("onnxruntime multiplies zero weights like any others (dense kernels): expect about 1.0x from "
            "sparsity alone on onnxruntime; there a sparse model gains size (zip, sparse_initializer), not speed")
DEEPSPARSE_NOTE = ("deepsparse runs pruned Conv/Gemm/MatMul weights with sparse CPU kernels; its speedup grows "
                   "with sparsity and needs AVX2/AVX-512")


@dataclass
class BenchResult:
    """What benchmark() measured; ``to_dict()`` is the JSON written by ``--json``."""

    tool_version: str
    machine: dict
    options: dict
    inputs: dict
    runtimes: list[dict]
    models: list[dict]
    cases: list[dict]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"tool_version": self.tool_version, "machine": self.machine, "options": self.options,
                "inputs": self.inputs, "runtimes": self.runtimes, "models": self.models, "cases": self.cases,
                "notes": self.notes}

    @property
    def failed(self) -> list[dict]:
        return [c for c in self.cases if c["status"] == "failed"]

    def format_table(self) -> str:
        from .report import format_bench

        return format_bench(self.to_dict())

    def format_markdown(self) -> str:
        from .report import format_markdown

        return format_markdown(self.to_dict())


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}


class CpuShare:
    """How much CPU other processes took while we benchmarked (Linux /proc/stat; None elsewhere).

    System busy time (user, nice, system, irq, softirq, steal) minus this process's and its
    waited-for children's CPU time, as a fraction of all cores over the wall time.
    """

    def __init__(self) -> None:
        self.start = self._snapshot()

    @staticmethod
    def _snapshot() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
            tick = os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError):
            return None
        busy = sum(fields[i] for i in (0, 1, 2, 5, 6, 7) if i < len(fields)) / tick
        t = os.times()
        return time.monotonic(), busy, t.user + t.system + t.children_user + t.children_system

    def others(self) -> float | None:
        end = self._snapshot()
        if self.start is None or end is None:
            return None
        wall = end[0] - self.start[0]
        if wall <= 0:
            return None
        other = (end[1] - self.start[1]) - (end[2] - self.start[2])
        return round(min(max(other / (wall * (os.cpu_count() or 1)), 0.0), 1.0), 3)


def _labels(paths: Sequence[Path]) -> list[str]:
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [str(p) for p in paths]


def _check_batches(batch_sizes: Sequence[int]) -> list[int]:
    out = []
    for b in batch_sizes:
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1:
            raise BenchError(f"--batch sizes must be positive integers (got {b!r})")
        if int(b) not in out:
            out.append(int(b))
    if not out:
        raise BenchError("--batch needs at least one batch size, e.g. --batch 1,16")
    return out


def _max_rel_diff(ours: list[np.ndarray], ref: list[np.ndarray]) -> float | None:
    if ours is None or ref is None or len(ours) != len(ref):
        return None
    worst = 0.0
    for a, b in zip(ours, ref):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            return None
        if not (np.issubdtype(a.dtype, np.number) and np.issubdtype(b.dtype, np.number)) or a.size == 0:
            continue
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        scale = max(float(np.max(np.abs(b64))), 1e-12)
        worst = max(worst, float(np.max(np.abs(a64 - b64))) / scale)
    return worst


@dataclass
class _Model:
    label: str
    loaded: LoadedModel
    dense: object  # onnx.ModelProto with dense storage
    source: InputSource
    info: dict


def benchmark(
    models: Sequence[str | os.PathLike],
    *,
    batch_sizes: Sequence[int] = DEFAULT_BATCHES,
    runtimes: Sequence[str] | None = None,
    threads: int | None = None,
    budget: Budget | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    calibration: str | os.PathLike | None = None,
    deepsparse_python: str | os.PathLike | None = None,
    runners: Sequence | None = None,
    progress: Callable[[str], None] | None = None,
) -> BenchResult:
    """Time every model on every runtime at every batch size; size and count them.

    Args:
        models: ONNX files; the first is the dense reference the speedups are taken against.
        batch_sizes: batch sizes to time (items per run).
        runtimes: names from the runner registry (None: onnxruntime, onnxruntime-cuda when a
            GPU provider is present, and deepsparse, which is skipped with a setup hint when absent).
        threads: intra-op threads / cores each runtime may use (None: the runtime's default).
        budget: warm-up runs and an iteration or time budget per case.
        input_shapes: full shapes (batch first) of inputs with dynamic dims, for generated inputs.
        calibration: .npz/.npy whose samples are repeated or cut to each batch size, instead of
            generated inputs.
        deepsparse_python: interpreter of the DeepSparse venv (else $FCPTS_DEEPSPARSE_PYTHON,
            else .venv-deepsparse in the repository).
        runners: runner objects to use instead of ``runtimes`` (tests, custom runtimes).
        progress: called with a one-line message before each case.
    """
    if not models:
        raise BenchError("give at least one model: fcpts-onnx bench DENSE.onnx [SPARSE.onnx ...]")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise BenchError(f"--threads must be a positive integer (got {threads!r})")
    batches = _check_batches(batch_sizes)
    budget = budget or Budget()
    say = progress or (lambda _msg: None)
    paths = [Path(m) for m in models]
    labels = _labels(paths)
    notes: list[str] = []

    entries: list[_Model] = []
    for i, (path, label) in enumerate(zip(paths, labels)):
        loaded = load_model(path)
        dense = densify(loaded.model)
        source = InputSource(dense, shapes=input_shapes, calib=calibration)
        found, why = find_weights(dense)
        if why:
            notes.append(f"{label}: no MAC or sparsity figures ({why})")
        items = static_batch(dense) or 1  # a graph with a fixed batch runs at no other
        info = {
            "label": label, "path": str(path), "role": "dense reference" if i == 0 else "compared",
            "ir_version": loaded.model.ir_version,
            "opset": max((o.version for o in loaded.model.opset_import if o.domain in ("", "ai.onnx")), default=0),
            "storage": "sparse_initializer" if has_sparse_storage(loaded.model) else "dense",
            "sizes": model_sizes(path, loaded.external_data_files, dense, found.weights if found else []),
            "macs": macs_summary(dense, found, source.feed(items), items),
        }
        entries.append(_Model(label, loaded, dense, source, info))

    if runners is None:
        runners = make_runners(runtimes, deepsparse_python=deepsparse_python)
    infos = {r.name: r.probe() for r in runners}
    usable = [r for r in runners if infos[r.name].available]
    for r in runners:
        if not infos[r.name].available:
            notes.append(infos[r.name].note or f"{r.name}: not available")
    if not usable:
        raise BenchError("no runtime to benchmark on: " + "; ".join(i.note or i.name for i in infos.values()))

    cpu_share = CpuShare()
    cases: list[dict] = []
    outputs: dict[tuple[int, str, int], list[np.ndarray] | None] = {}
    with tempfile.TemporaryDirectory(prefix="fcpts-bench-") as tmp:
        workdir = Path(tmp)
        for batch in batches:
            feeds = [e.source.feed(batch) for e in entries]
            for runner in usable:
                for m, entry in enumerate(entries):
                    record = {
                        "model": entry.label, "model_index": m, "runtime": runner.name,
                        "engine": infos[runner.name].engine, "batch_size": batch, "threads": threads,
                        "num_cores": threads, "num_streams": 1, "scenario": "sync",
                        "warmup_iterations": budget.warmup, "status": "ok", "note": None,
                    }
                    refusal = runner.refusal(entry.loaded)
                    if refusal:
                        record.update(status="skipped", note=refusal)
                        cases.append(record)
                        continue
                    say(f"{entry.label}: {runner.name}, batch {batch}")
                    case = Case(entry.loaded, entry.dense, batch, feeds[m], threads, budget, workdir,
                                entry.source.batch_dynamic_shapes(), tag=f"m{m}")
                    try:
                        timing = runner.run(case)
                        stats = latency_stats(timing.latencies_ms, batch)
                    except SkipCase as exc:
                        record.update(status="skipped", note=str(exc))
                        cases.append(record)
                        continue
                    except BenchError as exc:
                        record.update(status="failed", note=str(exc))
                        cases.append(record)
                        continue
                    record.update(engine=timing.engine, num_cores=timing.num_cores if timing.num_cores else threads,
                                  num_streams=timing.num_streams or 1, **stats, **timing.extra)
                    outputs[(m, runner.name, batch)] = timing.outputs
                    cases.append(record)

    _speedups(cases)
    for record in cases:
        if record["status"] != "ok":
            continue
        ref = outputs.get((record["model_index"], BASELINE, record["batch_size"]))
        ours = outputs.get((record["model_index"], record["runtime"], record["batch_size"]))
        record["max_rel_diff_vs_onnxruntime"] = None if record["runtime"] == BASELINE else _max_rel_diff(ours, ref)

    if any(r.name == BASELINE for r in usable):
        notes.insert(0, ORT_NOTE)
    if any(r.name == "deepsparse" for r in usable):
        notes.append(DEEPSPARSE_NOTE)
        partial = sorted({(c["model"], c["fraction_of_supported_ops"]) for c in cases
                          if c.get("fraction_of_supported_ops") not in (None, 1, 1.0)})
        for label, fraction in partial:
            notes.append(f"deepsparse ran {fraction:.0%} of {label}'s ops itself; the rest fell back to its "
                         "bundled onnxruntime")
    machine = machine_info()
    machine["cpu_share_of_other_processes"] = others = cpu_share.others()
    if others is not None and others > 0.05:
        notes.append(f"other processes used {others:.0%} of the CPU while benchmarking: these timings are disturbed; "
                     "rerun on a quiet machine")
    if BASELINE not in {r.name for r in usable}:
        notes.append("onnxruntime was not run: no 'vs onnxruntime dense' figures")
    diffs = [c["max_rel_diff_vs_onnxruntime"] for c in cases if c.get("max_rel_diff_vs_onnxruntime") is not None]
    if diffs and max(diffs) <= 1e-2:
        notes.append(f"outputs of every other runtime agree with onnxruntime's on the same inputs to within "
                     f"{max(diffs):.1e} (max |diff| / max |output|)")
    for c in cases:
        diff = c.get("max_rel_diff_vs_onnxruntime")
        if diff is not None and diff > 1e-2:
            notes.append(f"{c['model']} on {c['runtime']} at batch {c['batch_size']}: outputs differ from "
                         f"onnxruntime's by {diff:.2g} (relative to the largest output)")
    if budget.iterations is None and any(c["status"] == "ok" and c["iterations"] < 10 for c in cases):
        notes.append("some cases ran fewer than 10 timed iterations: p90/p99 are rough; raise --time")

    return BenchResult(
        tool_version=__version__,
        machine=machine,
        options={"batch_sizes": batches, "runtimes": [r.name for r in runners], "threads": threads,
                 **budget.to_dict()},
        inputs={"source": entries[0].source.source, "description": entries[0].source.describe()},
        runtimes=[infos[r.name].to_dict() for r in runners],
        models=[e.info for e in entries],
        cases=cases,
        notes=notes,
    )


def _speedups(cases: list[dict]) -> None:
    """speedup_vs_dense (same runtime) and speedup_vs_onnxruntime_dense, by median latency."""
    dense = {(c["runtime"], c["batch_size"]): c for c in cases if c["model_index"] == 0 and c["status"] == "ok"}
    for c in cases:
        if c["status"] != "ok":
            continue
        same = dense.get((c["runtime"], c["batch_size"]))
        ort = dense.get((BASELINE, c["batch_size"]))
        c["speedup_vs_dense"] = same["median_latency_ms"] / c["median_latency_ms"] if same else None
        c["speedup_vs_onnxruntime_dense"] = ort["median_latency_ms"] / c["median_latency_ms"] if ort else None


def bench_optimized(input_path: str | os.PathLike, output_path: str | os.PathLike, *,
                    input_shapes: Mapping[str, Sequence[int]] | None = None,
                    calibration: str | os.PathLike | None = None,
                    progress: Callable[[str], None] | None = None) -> BenchResult:
    """The short benchmark ``optimize --bench`` runs on its output: dense input vs sparse output,
    onnxruntime (and deepsparse when set up), batch 1 and 16, about a second per case."""
    return benchmark([input_path, output_path], batch_sizes=DEFAULT_BATCHES,
                     budget=OPTIMIZE_BUDGET, input_shapes=input_shapes,
                     calibration=calibration, progress=progress)
