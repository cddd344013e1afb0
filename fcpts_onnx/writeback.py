"""Writing new weight values into the original tensors, and nothing else.

The output graph is the input graph: same names, dtypes, node order, opsets, inputs and
outputs. Only the values of the pruned tensors change, plus a few metadata_props entries
that record what was done.
"""

from __future__ import annotations

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


def apply_weights(model: onnx.ModelProto, weights: list[PrunableWeight],
                  new_values: dict[str, np.ndarray], metadata: dict[str, str]) -> onnx.ModelProto:
    """A copy of ``model`` with the given weights' values replaced; ``model`` is not touched."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for weight in weights:
        if weight.name in new_values:
            set_tensor_values(weight.tensor(out), new_values[weight.name])
    set_metadata(out, metadata)
    return out
