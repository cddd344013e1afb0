"""Checks on written models, as pure functions returning data keyed by tensor name.

- ``check_model_file``: onnx.checker on the file (external data included).
- ``run_onnxruntime``: outputs of a model file on calibration inputs.
- ``count_zeros_in_file``: sparsity re-counted from the bytes on disk.
- ``fidelity``: how close sparse outputs are to dense ones.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from .calibration import BatchLayout, CalibrationSet
from .discovery import PrunableWeight
from .errors import UnsupportedModelError, VerificationError
from .sparse_storage import stored_values


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def check_model_file(path: str | os.PathLike) -> None:
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise VerificationError(f"written model fails onnx.checker: {_first_line(exc)}") from None


def make_session(path: str | os.PathLike, *, what: str, threads: int | None = None):
    """An onnxruntime CPU session, with a one-line error naming ``what`` failed to load."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    ort.set_default_logger_severity(4)  # run-time errors are reported by us, in one line
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types, not exported stably
        if what == "input model":
            raise UnsupportedModelError(f"onnxruntime cannot load the input model: {_first_line(exc)}; the tool "
                                        "needs a model onnxruntime runs: fix or re-export it") from None
        raise VerificationError(f"onnxruntime cannot load the {what}: {_first_line(exc)}") from None


def run_onnxruntime(path: str | os.PathLike, calibration: CalibrationSet, batch_size: int,
                    *, what: str, run_hint: str = "") -> dict[str, np.ndarray]:
    """All outputs of the model on every calibration sample, samples first (each output
    concatenated along the axis that holds its samples: ``calibration.layout``).

    ``run_hint`` ends the error when the model loads but fails on these inputs."""
    session = make_session(path, what=what)
    names = [o.name for o in session.get_outputs()]
    layout = calibration.layout
    static = [i.shape[axis] for i in session.get_inputs()
              if (axis := layout.inputs.get(i.name, 0)) is not None and len(i.shape) > axis
              and isinstance(i.shape[axis], int)]
    step = static[0] if static else batch_size
    collected: dict[str, list[np.ndarray]] = {n: [] for n in names}
    import onnxruntime as ort

    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # a failing run is reported by us, in one line
    for feed in calibration.batches(step):
        try:
            outputs = session.run(names, feed, quiet)
        except Exception as exc:
            error = UnsupportedModelError if what == "input model" else VerificationError
            raise error(f"onnxruntime failed to run the {what} on the calibration inputs: {_first_line(exc)}"
                        f"{run_hint}") from None
        for name, value in zip(names, outputs):
            collected[name].append(layout.output_first(name, np.asarray(value)))
    return {n: np.concatenate(v, axis=0) if v[0].ndim else v[-1] for n, v in collected.items()}


def output_batch_axes(path: str | os.PathLike, calibration: CalibrationSet, fixed_batch: int | None,
                      run_hint: str = "") -> BatchLayout:
    """``calibration.layout`` with each output's sample axis, for graphs whose inputs do not all
    keep their samples first: the axis that grows from one batch to two, measured by
    onnxruntime (a graph fixed at batch B: the output's axis of size B, read on one batch)."""
    session = make_session(path, what="input model")
    names = [o.name for o in session.get_outputs()]
    one = fixed_batch or 1
    runs = []
    for n in ((one, 2 * one) if not fixed_batch and calibration.n_samples >= 2 else (one,)):
        try:
            runs.append([np.shape(v) for v in session.run(names, calibration.take(slice(0, n)).feed())])
        except Exception as exc:
            raise UnsupportedModelError(
                f"onnxruntime failed to run the input model on {n} calibration sample(s): {_first_line(exc)}"
                f"{run_hint}") from None
    axes = {}
    for k, name in enumerate(names):
        if not runs[0][k]:
            continue  # a scalar: not per sample (run_onnxruntime keeps the last batch's)
        if len(runs) == 2:
            grew = [a for a, (x, y) in enumerate(zip(runs[0][k], runs[1][k])) if x != y]
            if len(grew) != 1 or runs[1][k][grew[0]] != 2 * runs[0][k][grew[0]]:
                raise UnsupportedModelError(
                    f"output {name!r} has shape {list(runs[0][k])} for one sample and {list(runs[1][k])} for two: no "
                    "one axis holds its samples, so its fidelity cannot be measured per sample; export it with a "
                    "batch axis")
            axis = grew[0]
        else:  # one batch of the fixed size: its axis of that size (any axis of size 1 serves batch 1)
            sized = [a for a, d in enumerate(runs[0][k]) if d == one]
            if not sized:
                raise UnsupportedModelError(
                    f"output {name!r} has shape {list(runs[0][k])} at the graph's fixed batch {one}: no axis holds "
                    "its samples; export it with a batch axis")
            axis = sized[0]
        if axis:
            axes[name] = axis
    return BatchLayout(inputs=calibration.layout.inputs, outputs=axes)


def count_zeros_in_file(path: str | os.PathLike, weights: list[PrunableWeight]) -> dict[str, tuple[int, int]]:
    """(zeros, size) per weight, read back from the written file."""
    model = onnx.load_model(str(path), load_external_data=True)
    counts = {}
    for w in weights:
        try:
            values = stored_values(model, w)  # dense or sparse_initializer / sparse_value storage
        except KeyError:
            raise VerificationError(f"written model has no weight {w.name!r}; this is a bug") from None
        if values.shape != w.shape:
            raise VerificationError(f"written weight {w.name!r} has shape {values.shape}, expected {w.shape}")
        counts[w.name] = (int(np.count_nonzero(values.reshape(-1) == 0)), int(values.size))
    return counts


@dataclass
class OutputFidelity:
    """Agreement of one output between the dense and the sparse model."""

    name: str
    shape: list[int]
    nmse: float | None  # sum((s - d)^2) / sum(d^2)
    cosine: float | None  # mean over samples of cos(s, d); over the samples when each has one value
    max_abs_diff: float | None
    top1_agreement: float | None  # classifiers: share of samples (or positions) whose argmax matches
    kl: float | None  # classifiers: mean KL(softmax(d) || softmax(s)), or of the probabilities
    exact_match: float | None  # non-float outputs: share of equal elements
    samples: int | None = None  # how many samples were compared (the output's first axis)
    # 95% Wilson interval of top1_agreement over the samples: 51 held-out samples that all
    # agree say "at least 93%", not "100%"
    top1_interval: list[float] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def looks_like_logits(array: np.ndarray) -> bool:
    """[batch, classes] float scores: a classifier's output."""
    return np.issubdtype(array.dtype, np.floating) and array.ndim == 2 and array.shape[1] >= 2


def looks_like_probabilities(array: np.ndarray) -> bool:
    """Float output whose last axis is a distribution (a softmax at the end: OCR, segmentation)."""
    if not np.issubdtype(array.dtype, np.floating) or array.ndim < 2 or array.shape[-1] < 2 or not array.size:
        return False
    if array.min() < 0 or array.max() > 1 + 1e-4:
        return False
    return bool(np.allclose(array.sum(axis=-1), 1.0, atol=1e-3))


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def fidelity(dense: dict[str, np.ndarray], sparse: dict[str, np.ndarray],
             class_axis: int | None = None) -> list[OutputFidelity]:
    """NMSE, cosine and max |diff| of every float output; top-1 agreement and KL where it holds
    class scores: softmax outputs along their last axis, 2-D logits along axis 1, or every
    output with ``class_axis`` along it (per position on the other axes)."""
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite outputs give NaN numbers, noted elsewhere
        return _fidelity(dense, sparse, class_axis)


def wilson_interval(share: float, n: int, z: float = 1.96) -> list[float]:
    """The Wilson score interval of a share observed over ``n`` samples.

    ``share`` may be a mean of per-sample fractions (agreement per time step or per pixel):
    a fraction in [0, 1] has variance at most share * (1 - share), so counting samples, not
    positions, keeps the interval conservative where positions within a sample agree together.
    """
    if n <= 0:
        return [0.0, 1.0]
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(max(share * (1 - share), 0.0) / n + z * z / (4 * n * n))
    return [round(max(0.0, centre - half), 6), round(min(1.0, centre + half), 6)]


def _class_scores(d: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, mean KL) along the last axis, per position; softmax applied unless the
    values already are distributions."""
    d64, s64 = d.astype(np.float64), s.astype(np.float64)
    top1 = float(np.mean(d.argmax(axis=-1) == s.argmax(axis=-1)))
    if looks_like_probabilities(d):
        log_p, log_q = np.log(np.clip(d64, 1e-12, None)), np.log(np.clip(s64, 1e-12, None))
        return top1, float(np.mean(np.sum(d64 * (log_p - log_q), axis=-1)))
    log_p, log_q = _log_softmax(d64), _log_softmax(s64)
    return top1, float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)))


def _fidelity(dense: dict[str, np.ndarray], sparse: dict[str, np.ndarray],
              class_axis: int | None = None) -> list[OutputFidelity]:
    results = []
    for name, d in dense.items():
        s = sparse[name]
        if not np.issubdtype(d.dtype, np.floating):
            results.append(OutputFidelity(name, list(d.shape), None, None, None, None, None,
                                          float(np.mean(d == s)) if d.size else 1.0, int(d.shape[0]) if d.ndim else 1))
            continue
        d64, s64 = d.astype(np.float64), s.astype(np.float64)
        energy = float(np.sum(d64 ** 2))
        err = float(np.sum((s64 - d64) ** 2))
        nmse = err / energy if energy > 0 else err / max(d.size, 1)
        flat_d = d64.reshape(d.shape[0], -1) if d.ndim else d64.reshape(1, -1)
        if flat_d.shape[1] == 1:
            # One value per sample (a score, a speech probability): the cosine of one number
            # with another is only its sign, so take it over the samples instead.
            flat_d = flat_d.reshape(1, -1)
        flat_s = s64.reshape(flat_d.shape)
        norms = np.linalg.norm(flat_d, axis=1) * np.linalg.norm(flat_s, axis=1)
        cos = np.where(norms > 0, np.sum(flat_d * flat_s, axis=1) / np.where(norms > 0, norms, 1), 1.0)
        top1 = kl = None
        if class_axis is not None and d.ndim >= 2 and -d.ndim <= class_axis < d.ndim and d.shape[class_axis] >= 2:
            top1, kl = _class_scores(np.moveaxis(d, class_axis, -1), np.moveaxis(s, class_axis, -1))
        elif looks_like_probabilities(d):
            # per position along the last axis (e.g. every time step of a CTC recogniser)
            top1, kl = _class_scores(d, s)
        elif looks_like_logits(d):  # 2-D: axis 1 is the last
            top1, kl = _class_scores(d, s)
        samples = int(d.shape[0]) if d.ndim else 1
        results.append(OutputFidelity(
            name, list(d.shape), nmse, float(np.mean(cos)), float(np.max(np.abs(s64 - d64))) if d.size else 0.0,
            top1, kl, None, samples, None if top1 is None else wilson_interval(top1, samples),
        ))
    return results
