"""Keras models exported by tf2onnx (tests/data/tf2onnx, made by tools/export_keras.py with
TensorFlow 2.21, Keras 3.15.1 / tf-keras 2.21 and tf2onnx 1.17.0, one through TFLite; random
weights).

tf2onnx writes Keras's LayerNormalization as ``x * inv + (beta - mean * inv)`` with means as
GlobalAveragePool (rank 3) or ReduceMean over positive axes, moves a channels-last one to
channels-first with a Reshape of its mean, and puts Reshapes between a Dense layer's MatMul
and its bias Add. The trainable form must match onnxruntime on all of it, tune every
LayerNorm's gamma and beta and every bias, and write them back.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from fcpts_onnx import sparsify
from fcpts_onnx.discovery import discover
from fcpts_onnx.learner.options import LearnOptions
from fcpts_onnx.torchform import OnnxModule

DATA = Path(__file__).parent / "data" / "tf2onnx"
# file -> (input shape after the batch axis, fusions, normalisation values (LayerNorms' gamma and
# beta; the stem's BatchNorm, which tf2onnx writes as Mul and Add), biases of Dense/Conv)
MODELS = {
    "keras_transformer_opset17.onnx": ((16, 32), {"layer_norm": 4, "gelu_tanh": 2}, 4 * 2 * 32, 2 * (4 * 32 + 128 + 32) + 10),
    "keras_convnext_opset13.onnx": ((32, 32, 3), {"layer_norm": 3, "gelu_tanh": 2}, 3 * 2 * 32 + 2 * 32,
                                    32 + 2 * (32 + 128 + 32) + 10),
    "tf_keras_transformer_opset15.onnx": ((16, 32), {"layer_norm": 4}, 4 * 2 * 32, 2 * (4 * 32 + 128 + 32) + 10),
    "tflite_transformer_opset15.onnx": ((16, 32), {"layer_norm": 4}, 4 * 2 * 32, 2 * (4 * 32 + 128 + 32) + 10),
}

# every Dense, attention projection and convolution weight
PRUNABLE = {"keras_transformer_opset17.onnx": 2 * (4 * 32 * 32 + 2 * 32 * 128) + 32 * 10,
            "keras_convnext_opset13.onnx": 4 * 4 * 3 * 32 + 2 * (7 * 7 * 32 + 2 * 32 * 128) + 32 * 10}
PRUNABLE["tf_keras_transformer_opset15.onnx"] = PRUNABLE["keras_transformer_opset17.onnx"]
PRUNABLE["tflite_transformer_opset15.onnx"] = PRUNABLE["keras_transformer_opset17.onnx"]


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_keras_exports_run_exactly_with_norms_and_biases_tuned(name):
    shape, fusions, norm_values, bias_values = MODELS[name]
    model = onnx.load(str(DATA / name))
    module = OnnxModule(model, prunable=discover(model).weights)
    assert dict(module.fusions) == fusions
    by_role = {role: sum(p.numel() for p in module.parameters_by_role(role).values()) for role in ("norm", "bias")}
    assert by_role == {"norm": norm_values, "bias": bias_values}
    rng = np.random.default_rng(0)
    for batch in (2, 5):  # the batch axis is dynamic
        x = rng.normal(size=(batch, *shape)).astype(np.float32)
        ours = module.run({model.graph.input[0].name: torch.from_numpy(x)})[model.graph.output[0].name]
        reference = _ort(DATA / name, x)
        np.testing.assert_allclose(ours.detach().numpy(), reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())
    assert sum(p.numel() for p in module.parameters_by_role("weight").values()) == PRUNABLE[name]
    ours.square().sum().backward()
    for role in ("weight", "norm", "bias"):
        for key, p in module.parameters_by_role(role).items():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, (role, key)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_keras_exports_sparsify_end_to_end_with_tuned_norms_written_back(name, tmp_path):
    shape = MODELS[name][0]
    source = DATA / name
    before = hashlib.sha256(source.read_bytes()).hexdigest()
    calib = {onnx.load(str(source)).graph.input[0].name: np.random.default_rng(1).normal(size=(96, *shape)).astype(np.float32)}
    out = tmp_path / "sparse.onnx"
    report = sparsify(source, out, calib, sparsity=0.6, method="fcpts", reconstruct=True,
                      learn=LearnOptions(iters=12, seed=0), report_path=False)
    assert hashlib.sha256(source.read_bytes()).hexdigest() == before
    assert report.zero_params == report.required_zeros
    original = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(source)).graph.initializer}
    written = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer}
    module = OnnxModule(onnx.load(str(source)), prunable=discover(onnx.load(str(source))).weights)
    for role in ("norm", "bias"):
        names = {s.name for s in module.sources.values() if s.role == role}
        assert names, role
        moved = [n for n in names if not np.array_equal(written[n], original[n])]
        assert len(moved) == len(names), (role, sorted(names - set(moved)))
    x = next(iter(calib.values()))[:4]
    assert np.isfinite(_ort(out, x)).all()


def test_macs_of_a_dense_layer_on_a_flattened_sequence_count_every_token():
    # tf2onnx's Dense on [N, T, C] multiplies [N * T, C] by W, its rows from Shape ops: counting
    # that unknown first axis as the batch made the MACs T (16) times too small
    from fcpts_onnx.inspection import inspect_model

    layers = {layer["name"]: layer for layer in inspect_model(DATA / "keras_transformer_opset17.onnx")["layers"]}
    dense = [layer for name, layer in layers.items() if "/dense_" in name and "dense_4" not in name]
    assert len(dense) == 4
    assert all(layer["macs"] == 16 * layer["params"] for layer in dense)
    head = next(layer for name, layer in layers.items() if "dense_4" in name)
    assert head["macs"] == head["params"]  # after the mean over tokens: one row


def test_tf_keras_attention_output_weights_behind_a_computed_reshape_are_pruned_per_output_channel(tmp_path):
    # tf.keras's attention output projection is a [1, 1, 32, 4, 8] constant (heads x head_dim
    # -> width) that a Reshape, its shape computed by Shape/Gather/Concat nodes, turns into the
    # Gemm's [32, 32] B (transB): found through that Reshape, counted and pruned like the rest
    from fcpts_onnx.discovery import discover

    source = DATA / "tf_keras_transformer_opset15.onnx"
    model = onnx.load(str(source))
    behind = [w for w in discover(model).weights if "Reshape" in w.where]
    assert len(behind) == 2
    for w in behind:
        assert w.shape == (1, 1, 32, 4, 8) and w.consumers[0].view_shape(w.shape) == (32, 32)
        assert w.matrix_shape == (32, 32)
    from fcpts_onnx.inspection import inspect_model

    macs = {layer["name"]: layer["macs"] for layer in inspect_model(source)["layers"]}
    assert all(macs[w.name] == 16 * 32 * 32 for w in behind)
    calib = {"input_1": np.random.default_rng(2).normal(size=(64, 16, 32)).astype(np.float32)}
    out = tmp_path / "sparse.onnx"
    report = sparsify(source, out, calib, sparsity=0.97, method="fcpts", reconstruct=True,
                      learn=LearnOptions(iters=6, seed=0), report_path=False)
    assert report.zero_params == report.required_zeros
    written = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer}
    for w in behind:
        # each of the 32 outputs (the Gemm's B rows: the stored axis of 32) keeps a weight
        read = written[w.name].reshape(32, 32)
        assert (np.abs(read).max(axis=1) > 0).all(), w.name
