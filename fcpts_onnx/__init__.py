"""fcpts-onnx: post-training sparsity for exported ONNX models.

Public API::

    from fcpts_onnx import sparsify, inspect_model
    report = sparsify("model.onnx", "model.sparse.onnx", "calib.npz", sparsity=0.8, method="global")
"""

from __future__ import annotations

__version__ = "0.1.0"

from .api import sparsify  # noqa: E402
from .calibration import CalibrationSet  # noqa: E402
from .config import SparsifyOptions  # noqa: E402
from .errors import FcptsError  # noqa: E402
from .inspection import inspect_model  # noqa: E402

__all__ = ["CalibrationSet", "FcptsError", "SparsifyOptions", "__version__", "inspect_model", "sparsify"]
