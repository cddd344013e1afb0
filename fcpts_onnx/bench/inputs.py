"""Inputs for each batch size: generated from the graph's shapes or cut from a calibration file.

Generated inputs take their dims from the graph; dynamic dims other than the batch come
from ``--shape name=dims`` (the batch dim of those dims is replaced by the batch size).
A calibration file (.npz/.npy, validated like ``optimize --calib``) is repeated or cut to
the batch size. The same arrays feed every runtime, so outputs can be compared.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from ..calibration import (
    CalibrationSet,
    InputSpec,
    generate,
    graph_inputs,
    infer_layout,
    load_calibration,
    static_batch,
)
from ..errors import FcptsError
from .errors import BenchError


class InputSource:
    """Makes the feed of one batch size for a model whose inputs are ``specs``."""

    def __init__(self, model: onnx.ModelProto, *, shapes: Mapping[str, Sequence[int]] | None = None,
                 calib: str | Path | None = None, seed: int = 0):
        self.specs: list[InputSpec] = graph_inputs(model)
        self.shapes = {k: tuple(int(d) for d in v) for k, v in (shapes or {}).items()}
        self.seed = seed
        self.calibration: CalibrationSet | None = None
        if calib is not None and self.shapes:
            raise BenchError("--shape sizes generated inputs; with --calib the data gives the shapes, drop --shape")
        unknown = sorted(set(self.shapes) - {s.name for s in self.specs})
        if unknown:
            names = ", ".join(s.name for s in self.specs)
            raise BenchError(f"--shape names {', '.join(map(repr, unknown))}, not an input of the model "
                             f"(inputs: {names})")
        if calib is not None:
            self.calibration = load_calibration(calib, model)
        else:
            try:
                layout = infer_layout(self.specs)
            except FcptsError as exc:
                raise BenchError(str(exc)) from None
            if not layout.trivial:
                where = ", ".join(f"{k!r} ({'a setting' if v is None else f'axis {v}'})" for k, v in layout.inputs.items())
                raise BenchError(f"inputs {where} do not keep their samples on the first axis, and generated inputs "
                                 "would; give --calib data as the model takes it")
            for spec in self.specs:
                self._generated_shape(spec, 1)  # fail now, before any timing, if a dim is unknown

    @property
    def source(self) -> str:
        return "generated" if self.calibration is None else self.calibration.source

    def _generated_shape(self, spec: InputSpec, batch: int) -> tuple[int, ...]:
        if spec.name in self.shapes:
            given = self.shapes[spec.name]
            if spec.dims is not None and len(given) != len(spec.dims):
                raise BenchError(f"--shape {spec.name}={','.join(map(str, given))} has rank {len(given)} but the "
                                 f"model declares {spec.describe()}")
            return (batch, *given[1:]) if given else ()
        if spec.dims is None:
            raise BenchError(f"input {spec.name!r} has no declared shape; give it with --shape {spec.name}=DIMS "
                             "or give --calib data")
        if not spec.dims:
            return ()
        rest = spec.dims[1:]
        if any(not isinstance(d, int) for d in rest):
            example = ",".join(["1"] + [str(d) if isinstance(d, int) else "N" for d in rest])
            raise BenchError(f"input {spec.describe()} has dynamic dims besides the batch; give its full shape "
                             f"with --shape {spec.name}={example} (the batch dim comes from --batch)")
        return (batch, *rest)

    def feed(self, batch: int) -> dict[str, np.ndarray]:
        """One batch of ``batch`` items for every input."""
        if self.calibration is not None:
            n = self.calibration.n_samples
            index = np.arange(batch) % n  # repeat when the file holds fewer samples, cut when more
            return self.calibration.take(index).feed()  # as the graph takes them, settings included
        shapes = {s.name: self._generated_shape(s, batch) for s in self.specs}
        try:
            return generate(self.specs, seed=self.seed, shapes=shapes).arrays
        except FcptsError as exc:
            raise BenchError(str(exc)) from None

    def describe(self, batch: int | str = "B") -> str:
        if self.calibration is not None:
            arrays = self.calibration.arrays
            parts = [f"{k} [{batch}, {', '.join(map(str, v.shape[1:]))}] {v.dtype}" for k, v in arrays.items()]
            return f"from {self.calibration.source} ({self.calibration.n_samples} samples, repeated or cut " \
                   f"to the batch): " + "; ".join(parts)
        parts = []
        for s in self.specs:
            shape = self._generated_shape(s, 1)
            dims = ", ".join([str(batch)] + [str(d) for d in shape[1:]]) if shape else ""
            parts.append(f"{s.name} [{dims}] {s.dtype}")
        return "generated from the graph's shapes (floats standard normal, integers zero): " + "; ".join(parts)

    def batch_dynamic_shapes(self) -> bool:
        """True when some non-batch dim is dynamic in the graph (runtimes must be told the shapes)."""
        return any(s.dims is None or any(not isinstance(d, int) for d in s.dims[1:]) for s in self.specs)


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size the graph's inputs fix on their batch axes, if any."""
    try:
        return static_batch(model)
    except FcptsError as exc:
        raise BenchError(str(exc)) from None


def batch_free_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose graph inputs and outputs have a symbolic first dim and no intermediate shapes,
    for running a fixed-batch export at another batch size (works when nothing inside fixes it)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    initializers = {t.name for t in out.graph.initializer}
    for vi in list(out.graph.input) + list(out.graph.output):
        if vi.name in initializers or not vi.type.tensor_type.HasField("shape"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            dims[0].dim_param = "batch"
    del out.graph.value_info[:]
    return out
