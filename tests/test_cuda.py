"""The trainable form and the learner on a CUDA device (skipped where torch sees none).

CI has no GPU. These ran on an NVIDIA H200 in the session that wrote them (README, "On a
GPU"); `tools/gpu_check.sh` runs them there with the timings.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import save_model
from onnx import TensorProto, helper, numpy_helper

from fcpts_onnx import sparsify
from fcpts_onnx.inspection import inspect_parity
from fcpts_onnx.learner.options import LearnOptions
from fcpts_onnx.trainable import full_float32

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "models" / "mnist_cnn"
PRUNABLE = 389_920


def _evaluate():
    spec = importlib.util.spec_from_file_location("mnist_eval", ROOT / "tools" / "mnist_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.evaluate


def wide_conv_graph() -> onnx.GraphProto:
    """x[N,256,12,12] -Conv(256x256x3x3, pad 1)-> [N,256,12,12]: 2304 products a sum, where
    TF32's 10 mantissa bits put the error above the parity tolerance."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 256, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 1, 1, 1])
    return helper.make_graph(
        [node], "wide_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 256, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 256, 12, 12])],
        initializer=[numpy_helper.from_array(w, "W")],
    )


def _precision_settings() -> tuple:
    b = torch.backends
    if hasattr(b.cuda.matmul, "fp32_precision"):
        return b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision
    return b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32


def _allow_tf32() -> None:
    b = torch.backends
    if hasattr(b.cuda.matmul, "fp32_precision"):
        b.cuda.matmul.fp32_precision = b.cudnn.conv.fp32_precision = b.cudnn.rnn.fp32_precision = "tf32"
    else:
        b.cuda.matmul.allow_tf32 = b.cudnn.allow_tf32 = True


@pytest.fixture
def caller_allows_tf32():
    """The caller's process has TF32 on (cuDNN's default for convolutions); restored after."""
    saved = _precision_settings()
    _allow_tf32()
    yield _precision_settings()
    b = torch.backends
    if hasattr(b.cuda.matmul, "fp32_precision"):
        b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision = saved
    else:
        b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = saved


def test_parity_on_cuda_is_full_float32_where_the_caller_allows_tf32(tmp_path, caller_allows_tf32):
    path = save_model(wide_conv_graph(), tmp_path / "wide.onnx")
    x = np.random.default_rng(1).standard_normal((4, 256, 12, 12)).astype(np.float32)
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    w = torch.from_numpy(numpy_helper.to_array(onnx.load(path).graph.initializer[0]).copy()).cuda()

    def relative_diff() -> float:
        y = torch.nn.functional.conv2d(torch.from_numpy(x).cuda(), w, padding=1).cpu().numpy()
        return float(np.abs(y - ref).max() / np.abs(ref).max())

    if torch.cuda.get_device_capability() >= (8, 0):  # tensor cores: the model is a real test
        assert relative_diff() > 1e-4, "TF32 did not change this convolution: the test cannot fail"
    with full_float32():
        assert relative_diff() < 1e-5
    assert _precision_settings() == caller_allows_tf32  # the caller's settings come back

    info = inspect_parity(path, {"x": x}, device="cuda")
    assert info["parity"]["passed"], info["parity"]
    assert info["parity"]["device"] == "cuda"
    assert info["parity"]["outputs"][0]["relative_diff"] < 1e-5
    assert _precision_settings() == caller_allows_tf32


def test_bundled_model_parity_on_cuda():
    info = inspect_parity(BUNDLE / "mnist_cnn.onnx", BUNDLE / "calib.npz", device="cuda")
    assert info["parity"]["passed"] and info["parity"]["device"] == "cuda"
    assert info["parity"]["outputs"][0]["relative_diff"] < 1e-5


def test_fcpts_on_cuda_hits_the_target_and_keeps_accuracy(tmp_path, caller_allows_tf32):
    out = tmp_path / "fcpts.onnx"
    report = sparsify(BUNDLE / "mnist_cnn.onnx", out, BUNDLE / "calib.npz", sparsity=0.8, method="fcpts",
                      device="cuda", learn=LearnOptions(iters=60, seed=0), report_path=False)
    zeros = sum(int(np.count_nonzero(numpy_helper.to_array(t) == 0))
                for t in onnx.load(out).graph.initializer if t.name.endswith("weight"))
    assert zeros == report.zero_params == int(np.floor(0.8 * PRUNABLE + 0.5))
    assert report.learning["device"] == "cuda" and report.learning["parity"]["passed"]
    assert _evaluate()(out) > 0.985
    assert report.fidelity[0]["top1_agreement"] > 0.97
    assert _precision_settings() == caller_allows_tf32


def test_a_seed_repeats_on_cuda(tmp_path):
    runs = []
    for i in range(2):
        out = tmp_path / f"run{i}.onnx"
        sparsify(BUNDLE / "mnist_cnn.onnx", out, BUNDLE / "calib.npz", sparsity=0.8, method="fcpts",
                 device="cuda", learn=LearnOptions(iters=30, seed=3), report_path=False)
        runs.append({t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer})
    assert runs[0].keys() == runs[1].keys()
    for name in runs[0]:
        np.testing.assert_array_equal(runs[0][name], runs[1][name], err_msg=name)


def test_learning_on_cuda_stays_within_max_memory(tmp_path):
    """The batch planned under --max-memory on the GPU keeps the GPU's peak under the limit."""
    probe = sparsify(BUNDLE / "mnist_cnn.onnx", tmp_path / "probe.onnx", BUNDLE / "calib.npz", sparsity=0.8,
                     method="lamp", reconstruct=True, device="cuda", learn=LearnOptions(iters=2, seed=0),
                     report_path=False)
    plan = probe.learning["memory"]
    limit = plan["fixed_bytes"] + 24 * plan["per_sample_bytes"]
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    report = sparsify(BUNDLE / "mnist_cnn.onnx", tmp_path / "m.onnx", BUNDLE / "calib.npz", sparsity=0.8,
                      method="fcpts", device="cuda", max_memory=limit, learn=LearnOptions(iters=20, seed=0),
                      report_path=False)
    assert report.learning["memory"]["batch_size"] == 24
    assert report.learning["batch_size"] == 24
    peak = torch.cuda.max_memory_allocated() - base
    assert 0 < peak <= limit, (peak, limit)


def test_a_time_budget_on_cuda_sizes_the_run(tmp_path):
    budget = 20.0
    report = sparsify(BUNDLE / "mnist_cnn.onnx", tmp_path / "m.onnx", BUNDLE / "calib.npz", sparsity=0.8,
                      method="fcpts", device="cuda", learn=LearnOptions(time_budget=budget, seed=0),
                      report_path=False)
    learning = report.learning
    assert learning["time_budget_s"] == budget
    assert learning["steps"] > 0 and learning["seconds"] <= 1.15 * budget
    assert learning["batch_size"] in (16, 32, 64)
    assert report.zero_params == int(np.floor(0.8 * PRUNABLE + 0.5))
