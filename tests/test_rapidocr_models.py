"""PaddleOCR models shipped in rapidocr-onnxruntime: paddle2onnx exports whose weights sit
in Constant nodes, not initializers. Discovery, optimize and verification must all work."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from fcpts_onnx import inspect_model, sparsify


def _models_dir() -> Path | None:
    spec = importlib.util.find_spec("rapidocr_onnxruntime")  # finds without importing (cv2 not needed)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0]) / "models"


MODELS = _models_dir()
if MODELS is None:
    if os.environ.get("CI"):
        raise RuntimeError("rapidocr-onnxruntime is required in CI: pip install --no-deps rapidocr-onnxruntime==1.4.4")
    pytest.skip("rapidocr-onnxruntime not installed", allow_module_level=True)

# (file, a valid input shape): det needs sides divisible by 32, rec a height of 48.
CASES = [
    ("ch_PP-OCRv4_det_infer.onnx", (2, 3, 64, 96)),
    ("ch_PP-OCRv4_rec_infer.onnx", (2, 3, 48, 160)),
    ("ch_ppocr_mobile_v2.0_cls_infer.onnx", (2, 3, 48, 192)),
]


def _text_like_images(shape, seed=0):
    """Dark strokes on a light background, normalised as PaddleOCR does ((x/255 - 0.5) / 0.5)."""
    rng = np.random.default_rng(seed)
    n, c, h, w = shape
    img = np.full((n, h, w), 230.0)
    for i in range(n):
        for _ in range(12):
            y, x = rng.integers(0, h - 4), rng.integers(0, w - 12)
            img[i, y:y + rng.integers(2, 5), x:x + rng.integers(4, 12)] = rng.uniform(0, 60)
    img = np.repeat(img[:, None], c, axis=1)
    return ((img / 255.0 - 0.5) / 0.5).astype(np.float32)


@pytest.mark.parametrize("name,shape", CASES)
def test_discovers_constant_node_weights(name, shape):
    info = inspect_model(MODELS / name, input_shapes={"x": (1, *shape[1:])})
    assert len(info["layers"]) > 40
    assert {layer["storage"] for layer in info["layers"]} == {"Constant node"}
    assert info["initializer_params"] == 0
    assert info["stored_params"] > info["prunable_params"] > 0  # the Constant nodes hold them
    assert info["macs"] is not None and info["macs"] > 1e6


@pytest.mark.parametrize("name,shape", CASES)
def test_optimize_and_verify(tmp_path, name, shape):
    src = MODELS / name
    before = src.read_bytes()
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=_text_like_images(shape))
    out = tmp_path / name.replace(".onnx", ".sparse.onnx")
    report = sparsify(src, out, calib, sparsity=0.5, method="lamp", report_path=tmp_path / "r.json")
    assert src.read_bytes() == before

    original, written = onnx.load(src), onnx.load(out)
    assert len(written.graph.initializer) == 0  # pruned in place, nothing moved to initializers
    assert [n.op_type for n in written.graph.node] == [n.op_type for n in original.graph.node]
    assert [n.output[:] for n in written.graph.node] == [n.output[:] for n in original.graph.node]
    weight_names = {layer.name for layer in report.layers}
    zeros = total = 0
    for node in written.graph.node:
        if node.op_type == "Constant" and node.output[0] in weight_names:
            values = onnx.numpy_helper.to_array(node.attribute[0].t)
            zeros += int(np.count_nonzero(values == 0))
            total += values.size
    assert total == report.total_params
    assert zeros == report.required_zeros == int(np.floor(0.5 * total + 0.5))

    feed = {"x": _text_like_images(shape, seed=1)}
    dense_out = ort.InferenceSession(str(src)).run(None, feed)[0]
    sparse_out = ort.InferenceSession(str(out)).run(None, feed)[0]
    assert sparse_out.shape == dense_out.shape
    assert np.isfinite(sparse_out).all()
    assert report.fidelity[0]["cosine"] is not None


@pytest.mark.parametrize("name,shape", CASES)
def test_trainable_form_matches_onnxruntime(tmp_path, name, shape):
    from fcpts_onnx.inspection import inspect_parity

    calib = tmp_path / "calib.npz"
    np.savez(calib, x=_text_like_images(shape))
    info = inspect_parity(MODELS / name, calib)
    parity = info["parity"]
    assert parity["passed"], parity
    assert all(o["relative_diff"] <= 1e-4 for o in parity["outputs"])
    # every Constant-node weight became a parameter that writes back to its node
    weights = [p for p in info["trainable_parameters"] if p["role"] == "weight"]
    assert len(weights) > 40 and {p["storage"] for p in weights} == {"constant"}


def test_rec_runs_its_activation_and_norm_chains_fused_with_the_chains_gradients():
    # paddle2onnx spells hardswish as Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6): 28 chains in the
    # recogniser, and LayerNorm node by node in its 5 SVTR norms, each run as one kernel
    # (torchform/fusion.py); the gradient every parameter gets must be the one the node-by-node
    # graph gives
    import torch

    from fcpts_onnx.discovery import discover
    from fcpts_onnx.torchform import OnnxModule

    model = onnx.load(str(MODELS / "ch_PP-OCRv4_rec_infer.onnx"))
    module = OnnxModule(model, prunable=discover(model).weights)
    assert module.fusions == {"hardswish": 28, "layer_norm": 5}
    # the spelled-out norms' scales and shifts are tuned like LayerNormalization's: 10 norm
    # parameters from them beside the 12 of the 6 BatchNormalization nodes
    assert sum(s.role == "norm" for s in module.sources.values()) == 12 + 10
    x = torch.from_numpy(_text_like_images((2, 3, 48, 160)))
    hidden = sorted(module._fused_away)[0]
    grads = []
    for keep in ((), (hidden,)):  # asking for a value inside a chain runs the exact plan
        module.zero_grad()
        out = module.run({"x": x}, keep=keep)
        (out[module.output_names[0]] * torch.linspace(0, 1, out[module.output_names[0]].shape[-1])).sum().backward()
        grads.append({k: p.grad.clone() for k, p in module.named_parameters()})
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-3, atol=1e-6 * grads[1][k].abs().max().item())
