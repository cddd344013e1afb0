"""Writing new weight values into the original tensors, and nothing else.

The output graph is the input graph: same names, dtypes, node order, opsets, inputs and
outputs. Only the values of the pruned tensors change, plus a few metadata_props entries
that record what was done.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import numpy as np
import onnx

from .discovery import PrunableWeight

METADATA_PREFIX = "fcpts_onnx."

# TensorProto fields that can hold values; cleared so raw_data is the only copy.
_VALUE_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def set_tensor_values(tensor: onnx.TensorProto, values: np.ndarray) -> None:
    """Replace a tensor's values in place, keeping its name, dims, dtype and other fields."""
    np_dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    if tuple(values.shape) != tuple(tensor.dims):
        raise AssertionError(f"{tensor.name}: new shape {values.shape} != {tuple(tensor.dims)}")
    for field in _VALUE_FIELDS:
        tensor.ClearField(field)
    # ONNX raw_data is little-endian whatever the host.
    tensor.raw_data = np.ascontiguousarray(values.astype(np_dtype.newbyteorder("<"))).tobytes()


def set_metadata(model: onnx.ModelProto, entries: dict[str, str]) -> None:
    """Add or update metadata_props entries, leaving every other entry as it was."""
    existing = {p.key: p for p in model.metadata_props}
    for key, value in entries.items():
        full = METADATA_PREFIX + key
        if full in existing:
            existing[full].value = value
        else:
            model.metadata_props.add(key=full, value=value)


class Locator(Protocol):
    """Anything that finds its TensorProto in a model (PrunableWeight, TensorSource)."""

    name: str

    def tensor(self, model: onnx.ModelProto) -> onnx.TensorProto: ...


def cast_keeping_nonzeros(values: np.ndarray, dtype: np.dtype, keep: np.ndarray | None = None) -> np.ndarray:
    """Cast to the stored dtype; kept weights that would round to zero become the smallest
    subnormal of their sign, so the zero count stays exactly what was allocated."""
    dtype = np.dtype(dtype)
    out = values.astype(dtype)
    if keep is not None:
        underflow = keep & (out == 0)
        if underflow.any():
            # bit pattern 1 is the smallest positive subnormal of every IEEE-style float (bf16 too)
            uint = {2: np.uint16, 4: np.uint32, 8: np.uint64}[dtype.itemsize]
            tiny = np.array([1], dtype=uint).view(dtype)[0]
            out[underflow] = np.where(values[underflow] < 0, -tiny, tiny).astype(dtype)
    return out


def apply_updates(model: onnx.ModelProto, updates: Iterable[tuple[Locator, np.ndarray]],
                  metadata: dict[str, str]) -> onnx.ModelProto:
    """A copy of ``model`` with the located tensors' values replaced; ``model`` is not touched."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for locator, values in updates:
        set_tensor_values(locator.tensor(out), values)
    set_metadata(out, metadata)
    return out


def apply_weights(model: onnx.ModelProto, weights: list[PrunableWeight],
                  new_values: dict[str, np.ndarray], metadata: dict[str, str]) -> onnx.ModelProto:
    """A copy of ``model`` with the given weights' values replaced; ``model`` is not touched."""
    return apply_updates(model, [(w, new_values[w.name]) for w in weights if w.name in new_values], metadata)
