"""Shared fixtures: tiny valid ONNX models written with onnx.helper (opset 17, IR 8)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import settings
from onnx import TensorProto, helper, numpy_helper

# CI must not fail on a draw that no earlier run made: by default every property test replays
# the same examples. HYPOTHESIS_PROFILE=explore draws fresh ones (how the Mod and Range
# mismatches with onnxruntime were found); a failure it finds becomes a fixed test.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

OPSET = 17
IR_VERSION = 8


def save_model(graph: onnx.GraphProto, path: Path, opsets: tuple = ()) -> Path:
    """Write ``graph`` as a checked model file (opset 17, IR 8) and return its path."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), *opsets])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    return path


def matmul_conv_graph(seed: int = 0, zero_fraction: float = 0.0) -> onnx.GraphProto:
    """x[N,3,6,6] -Conv(W1[4,3,3,3])-> [N,4,4,4] -Flatten-> [N,64] -MatMul(W2[64,5])-> y[N,5].

    ``zero_fraction`` of each weight is set to exact zeros (already-sparse weights).
    """
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((64, 5)).astype(np.float32)
    for w in (w1, w2):
        flat = w.reshape(-1)
        flat[rng.permutation(flat.size)[: int(round(zero_fraction * flat.size))]] = 0
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c"], name="conv"),
        helper.make_node("Flatten", ["c"], ["f"], name="flatten", axis=1),
        helper.make_node("MatMul", ["f", "W2"], ["y"], name="fc"),
    ]
    return helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        initializer=[numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")],
    )


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    """A valid Conv + MatMul model file (input x float32 [N,3,6,6], 108 + 320 prunable weights)."""
    folder = tmp_path / "in"
    folder.mkdir()
    return save_model(matmul_conv_graph(), folder / "model.onnx")
