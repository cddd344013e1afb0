"""The runtimes bench can time a model on, by name.

- ``onnxruntime``: the dense baseline, CPUExecutionProvider. It multiplies zeros like any
  other number, so sparsity alone buys about 1.0x there.
- ``onnxruntime-cuda``: CUDAExecutionProvider, when onnxruntime-gpu and a GPU are present.
- ``deepsparse``: Neural Magic's DeepSparse 1.8.0, which has sparse CPU kernels. It needs
  onnx<1.15 and numpy<2, so it runs in its own interpreter (tools/setup_deepsparse.sh) through
  ``deepsparse_worker.py`` and the JSON protocol in :mod:`.protocol`.

A runner says whether it is usable (:meth:`probe`), whether it refuses a model before
trying (:meth:`refusal`), and times one case (:meth:`run`), raising :class:`SkipCase` for a
case it cannot run for a stated reason and :class:`BenchError` when something broke.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from ..onnx_io import LoadedModel
from ..sparse_storage import has_sparse_storage
from .errors import BenchError, WorkerError
from .inputs import batch_free_copy, fixed_batch
from .protocol import WORKER, call_worker
from .timing import Budget, measure

ROOT = Path(__file__).resolve().parents[2]
SETUP_SCRIPT = ROOT / "tools" / "setup_deepsparse.sh"
DEFAULT_VENV = ".venv-deepsparse"
ENV_PYTHON = "FCPTS_DEEPSPARSE_PYTHON"
DEEPSPARSE_MAX_IR = 9
DEEPSPARSE_MAX_OPSET = 17


class SkipCase(BenchError):
    """This runtime cannot run this case, for the reason given (not a failure of the tool)."""


@dataclass
class RuntimeInfo:
    name: str
    available: bool
    engine: str | None = None
    version: str | None = None
    note: str | None = None  # why it is not available / how to set it up
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "available": self.available, "engine": self.engine, "version": self.version,
                "note": self.note, **({"details": self.details} if self.details else {})}


@dataclass
class Case:
    """One model at one batch size, with everything a runner needs."""

    loaded: LoadedModel  # as read from disk (maybe sparse storage, maybe external data)
    model: onnx.ModelProto  # the same model with dense storage, in memory
    batch_size: int
    feed: dict[str, np.ndarray]
    threads: int | None
    budget: Budget
    workdir: Path
    dynamic_shapes: bool  # a non-batch input dim is dynamic: runtimes must be given the shapes
    tag: str = "m"  # unique per model, for files in workdir

    @property
    def path(self) -> Path:
        return self.loaded.path

    def inputs_file(self) -> Path:
        path = self.workdir / f"{self.tag}-inputs-b{self.batch_size}.npz"
        if not path.exists():
            np.savez(path, **self.feed)
        return path

    def private_copy(self) -> Path:
        """A fresh copy of the model (dense storage, external data alongside) in the work folder.

        DeepSparse rewrites the file it is given when it overrides input shapes (its
        ``override_onnx_input_shapes`` saves in place), so it never sees the user's file.
        """
        folder = self.workdir / f"{self.tag}-b{self.batch_size}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        target = folder / self.path.name
        if has_sparse_storage(self.loaded.model):
            onnx.save_model(self.model, str(target))
            return target
        shutil.copyfile(self.path, target)
        for location in self.loaded.external_data_files:
            (folder / location).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.path.parent / location, folder / location)
        return target

    def drop_private_copy(self) -> None:
        shutil.rmtree(self.workdir / f"{self.tag}-b{self.batch_size}", ignore_errors=True)


@dataclass
class Timing:
    latencies_ms: list[float]
    engine: str
    num_cores: int | None
    num_streams: int | None
    outputs: list[np.ndarray] | None = None
    extra: dict = field(default_factory=dict)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


class OnnxRuntimeRunner:
    """onnxruntime with one execution provider; intra-op threads = --threads, one inter-op thread."""

    def __init__(self, name: str = "onnxruntime", provider: str = "CPUExecutionProvider"):
        self.name = name
        self.provider = provider

    def probe(self) -> RuntimeInfo:
        import onnxruntime as ort

        if self.provider not in ort.get_available_providers():
            return RuntimeInfo(self.name, False, note=f"{self.name}: onnxruntime has no {self.provider} here "
                                                       "(needs onnxruntime-gpu and a CUDA GPU)")
        return RuntimeInfo(self.name, True, engine=f"onnxruntime {ort.__version__} {self.provider}",
                           version=ort.__version__)

    def refusal(self, loaded: LoadedModel) -> str | None:
        return None

    def _session(self, path: Path, threads: int | None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 4
        ort.set_default_logger_severity(4)
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        if threads:
            options.intra_op_num_threads = threads
        providers = [self.provider] + (["CPUExecutionProvider"] if self.provider != "CPUExecutionProvider" else [])
        return ort.InferenceSession(str(path), options, providers=providers)

    def run(self, case: Case) -> Timing:
        import onnxruntime as ort

        path = case.path
        fixed = fixed_batch(case.model)
        rebatched = fixed is not None and fixed != case.batch_size
        if rebatched:
            path = case.workdir / f"{case.tag}-anybatch.onnx"
            if not path.exists():
                onnx.save_model(batch_free_copy(case.model), str(path))
        quiet = ort.RunOptions()
        quiet.log_severity_level = 4
        try:
            session = self._session(path, case.threads)
            if self.provider not in session.get_providers():
                raise SkipCase(f"{self.name}: {self.provider} did not load (onnxruntime fell back to CPU)")
            outputs = session.run(None, case.feed, quiet)
        except SkipCase:
            raise
        except Exception as exc:  # onnxruntime's own exception types
            if rebatched:
                raise SkipCase(f"the model's batch is fixed at {fixed} and onnxruntime cannot run it at batch "
                               f"{case.batch_size} ({_first_line(exc)}); re-export with a dynamic batch axis"
                               ) from None
            raise BenchError(f"onnxruntime cannot run {case.path.name}: {_first_line(exc)}") from None
        latencies = measure(lambda: session.run(None, case.feed, quiet), case.budget)
        return Timing(latencies, engine=f"onnxruntime {ort.__version__} {self.provider}",
                      num_cores=case.threads, num_streams=1, outputs=[np.asarray(o) for o in outputs],
                      extra={"graph_optimization_level": "ORT_ENABLE_ALL", "batch_made_dynamic": rebatched})


def _default_deepsparse_python() -> Path:
    candidates = [ROOT / DEFAULT_VENV, Path.cwd() / DEFAULT_VENV]
    for venv in candidates:
        if (venv / "bin" / "python").exists():
            return venv / "bin" / "python"
    return candidates[0] / "bin" / "python"


def setup_hint() -> str:
    script = SETUP_SCRIPT if SETUP_SCRIPT.exists() else Path("tools/setup_deepsparse.sh")
    return f"bash {script}"


class DeepSparseRunner:
    """DeepSparse in its own interpreter, one worker process per case."""

    name = "deepsparse"

    def __init__(self, python: str | os.PathLike | None = None, worker: str | os.PathLike = WORKER,
                 timeout: float | None = None):
        given = python or os.environ.get(ENV_PYTHON)
        self.explicit = given is not None
        self.python = Path(given) if given else _default_deepsparse_python()
        self.worker = Path(worker)
        self.timeout = timeout
        self._info: RuntimeInfo | None = None

    @property
    def command(self) -> list[str]:
        return [str(self.python), str(self.worker)]

    def _not_set_up(self, why: str) -> RuntimeInfo:
        return RuntimeInfo(self.name, False, note=f"deepsparse is not set up ({why}); set it up with: {setup_hint()}")

    def probe(self) -> RuntimeInfo:
        if self._info is not None:
            return self._info
        python = self.python
        if not python.exists() and shutil.which(str(python)) is None:
            where = (f"{python} does not exist" if self.explicit
                     else f"no {DEFAULT_VENV} found and {ENV_PYTHON} is not set")
            self._info = self._not_set_up(where)
            return self._info
        try:
            reply = call_worker(self.command, None, timeout=180, probe=True)
        except WorkerError as exc:
            self._info = self._not_set_up(f"{python}: {exc}")
            return self._info
        version = reply.get("deepsparse_version")
        details = {k: reply[k] for k in ("onnx_version", "numpy_version", "python", "cpu") if k in reply}
        details["interpreter"] = str(python)
        self._info = RuntimeInfo(self.name, True, engine=f"deepsparse {version}", version=version, details=details)
        return self._info

    def refusal(self, loaded: LoadedModel) -> str | None:
        model = loaded.model
        opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
        if model.ir_version > DEEPSPARSE_MAX_IR or opset > DEEPSPARSE_MAX_OPSET:
            return (f"DeepSparse 1.8 reads ONNX IR <= {DEEPSPARSE_MAX_IR} and opset <= {DEEPSPARSE_MAX_OPSET}, "
                    f"this model is IR {model.ir_version} opset {opset} (a torch dynamo export?); re-export with "
                    f"torch.onnx.export(..., dynamo=False, opset_version={DEEPSPARSE_MAX_OPSET})")
        return None

    def run(self, case: Case) -> Timing:
        outputs_file = case.workdir / f"{case.tag}-deepsparse-out-b{case.batch_size}.npz"
        budget = case.budget
        model_copy = case.private_copy()
        request = {
            "model": str(model_copy), "batch_size": case.batch_size, "num_cores": case.threads,
            "inputs": {"npz": str(case.inputs_file())}, "override_input_shapes": case.dynamic_shapes,
            "warmup": budget.warmup, "iterations": budget.iterations, "seconds": budget.seconds,
            "min_iterations": budget.min_iterations, "outputs_npz": str(outputs_file),
        }
        timeout = self.timeout or (900.0 + 3 * (budget.seconds or 0.0) if budget.iterations is None else 3600.0)
        try:
            reply = call_worker(self.command, request, timeout=timeout)
        finally:
            case.drop_private_copy()
        outputs = None
        if outputs_file.exists():
            try:
                with np.load(outputs_file, allow_pickle=False) as data:
                    outputs = [data[f"arr_{i}"] for i in range(len(data.files))]
            except (OSError, ValueError, KeyError):
                outputs = None
        extra = {k: reply[k] for k in ("compile_seconds", "fraction_of_supported_ops", "cpu_avx_type", "scheduler")
                 if k in reply}
        return Timing([float(x) for x in reply["latencies_ms"]], engine=str(reply.get("engine", "deepsparse")),
                      num_cores=reply.get("num_cores"), num_streams=reply.get("num_streams"),
                      outputs=outputs, extra=extra)


RUNTIMES: dict[str, Callable[..., object]] = {
    "onnxruntime": lambda **_: OnnxRuntimeRunner("onnxruntime", "CPUExecutionProvider"),
    "onnxruntime-cuda": lambda **_: OnnxRuntimeRunner("onnxruntime-cuda", "CUDAExecutionProvider"),
    "deepsparse": lambda deepsparse_python=None, **_: DeepSparseRunner(deepsparse_python),
}
BASELINE = "onnxruntime"


def make_runners(names: Sequence[str] | None, *, deepsparse_python: str | os.PathLike | None = None) -> list:
    """Runners for ``names`` (None: onnxruntime, onnxruntime-cuda when a GPU provider is present, deepsparse)."""
    if names is None:
        runners = [RUNTIMES[n](deepsparse_python=deepsparse_python) for n in RUNTIMES]
        return [r for r in runners if r.name != "onnxruntime-cuda" or r.probe().available]
    unknown = [n for n in names if n not in RUNTIMES]
    if unknown:
        raise BenchError(f"--runtime {','.join(unknown)} unknown; choose from {','.join(RUNTIMES)}")
    seen: list[str] = []
    for n in names:
        if n not in seen:
            seen.append(n)
    return [RUNTIMES[n](deepsparse_python=deepsparse_python) for n in seen]
