"""ONNX element types and numpy arrays as torch values: half precision computes in float32.

Shared by the module (constants, parameters) and the operators that create data (Shape-
driven ConstantOfShape and the like), so both map dtypes the same way.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch

# Half-precision values are computed in float32: the learner needs float32 gradients.
_COMPUTE_DTYPE = {
    onnx.TensorProto.FLOAT16: torch.float32,
    onnx.TensorProto.BFLOAT16: torch.float32,
}


def torch_dtype(elem_type: int) -> torch.dtype:
    """The torch dtype that computes an ONNX element type (fp16/bf16 -> float32)."""
    if elem_type in _COMPUTE_DTYPE:
        return _COMPUTE_DTYPE[elem_type]
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    return torch.from_numpy(np.zeros(0, dtype=np_dtype)).dtype


def to_torch(array: np.ndarray) -> torch.Tensor:
    """numpy -> torch, half types upcast to float32 (bf16 arrays come from ml_dtypes)."""
    if array.dtype == np.float16 or array.dtype.name == "bfloat16":
        array = array.astype(np.float32)
    return torch.from_numpy(np.array(array, copy=True))
