"""Which stored constants besides the prunable weights the trainable form tunes, and as what:
biases of linear layers behind views, per-channel affine pairs (written-out BatchNorms)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from fcpts_onnx.discovery import discover
from fcpts_onnx.torchform import OnnxModule

from .harness import assert_close, run_both


def _model(nodes, inits, x_shape, opset=13):
    graph = helper.make_graph(
        nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _roles(model):
    module = OnnxModule(model, prunable=discover(model).weights)
    return module, {s.name: s.role for s in module.sources.values()}


def _check_exact_and_bias_gradients(model, module, x):
    reference, ours = run_both(model, {"x": x})
    assert_close(reference, ours)
    module.run({"x": torch.from_numpy(x)})["y"].square().sum().backward()
    biases = module.parameters_by_role("bias")
    assert biases and all(p.grad is not None and p.grad.abs().sum() > 0 for p in biases.values())


def test_tf2onnx_dense_and_attention_biases_behind_reshapes_are_tuned():
    # tf2onnx: Dense on [N, T, C] is MatMul on [N*T, C], Reshape back, then Add(b[C]); Keras's
    # attention projection adds its [heads, head_dim] bias after a Reshape to heads
    rng = np.random.default_rng(0)
    f32 = np.float32
    inits = {"W1": rng.normal(size=(16, 8)).astype(f32), "b1": rng.normal(size=8).astype(f32),
             "W2": rng.normal(size=(8, 8)).astype(f32), "b2": rng.normal(size=(2, 4)).astype(f32),
             "flat": np.array([-1, 16], np.int64), "seq": np.array([-1, 3, 8], np.int64),
             "heads": np.array([0, 0, 2, 4], np.int64)}
    nodes = [helper.make_node("Reshape", ["x", "flat"], ["x2"]), helper.make_node("MatMul", ["x2", "W1"], ["h"]),
             helper.make_node("Reshape", ["h", "seq"], ["h3"]), helper.make_node("Add", ["h3", "b1"], ["a1"]),
             helper.make_node("MatMul", ["a1", "W2"], ["q"]), helper.make_node("Reshape", ["q", "heads"], ["q4"]),
             helper.make_node("Add", ["b2", "q4"], ["y"])]
    model = _model(nodes, inits, (2, 3, 16))
    module, roles = _roles(model)
    assert roles == {"W1": "weight", "W2": "weight", "b1": "bias", "b2": "bias"}
    _check_exact_and_bias_gradients(model, module, rng.normal(size=(2, 3, 16)).astype(f32))


@pytest.mark.parametrize("trans_b", [0, 1])
def test_a_gemm_bias_behind_a_view_is_counted_by_the_gemms_outputs(trans_b):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(6, 4)).astype(np.float32)
    inits = {"W": w.T.copy() if trans_b else w, "b": rng.normal(size=(1, 1, 4)).astype(np.float32),
             "axes": np.array([1], np.int64)}
    nodes = [helper.make_node("Gemm", ["x", "W"], ["g"], transB=trans_b),
             helper.make_node("Unsqueeze", ["g", "axes"], ["g3"]), helper.make_node("Add", ["g3", "b"], ["y"])]
    model = _model(nodes, inits, (5, 6))
    module, roles = _roles(model)
    assert roles == {"W": "weight", "b": "bias"}
    _check_exact_and_bias_gradients(model, module, rng.normal(size=(5, 6)).astype(np.float32))


def test_a_position_embedding_added_behind_a_view_stays_a_constant():
    # [T, C] has T times more elements than the layer has outputs: not its bias
    rng = np.random.default_rng(2)
    inits = {"W": rng.normal(size=(16, 8)).astype(np.float32), "pos": rng.normal(size=(3, 8)).astype(np.float32),
             "flat": np.array([-1, 16], np.int64), "seq": np.array([-1, 3, 8], np.int64)}
    nodes = [helper.make_node("Reshape", ["x", "flat"], ["x2"]), helper.make_node("MatMul", ["x2", "W"], ["h"]),
             helper.make_node("Reshape", ["h", "seq"], ["h3"]), helper.make_node("Add", ["h3", "pos"], ["y"])]
    model = _model(nodes, inits, (2, 3, 16))
    _, roles = _roles(model)
    assert roles == {"W": "weight"}
    # directly after the MatMul only a bias of at most one axis counts, as before
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "pos"], ["y"])]
    _, roles = _roles(_model(nodes, inits, (2, 3, 16)))
    assert roles == {"W": "weight"}


def _conv_affine_model(pre="relu", scale_shape=(1, 4, 1, 1), shift_shape=(1, 4, 1, 1), second_reader=False):
    """x -> Conv -> ReLU -> Mul(scale) -> Add(shift) -> Conv: tf2onnx's pre-activation BatchNorm.
    ``pre="input"``: the Mul/Add act on the graph input instead (preprocessing)."""
    rng = np.random.default_rng(3)
    f32 = np.float32
    inits = {"W1": rng.normal(size=(4, 3, 3, 3)).astype(f32), "W2": rng.normal(size=(2, 4, 1, 1)).astype(f32),
             "s": rng.uniform(0.5, 1.5, scale_shape).astype(f32), "t": rng.normal(size=shift_shape).astype(f32)}
    if pre == "input":
        inits["W1"] = rng.normal(size=(4, 4, 3, 3)).astype(f32)
        nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 1, 2, 3]),
                 helper.make_node("Mul", ["xt", "s"], ["m"]), helper.make_node("Add", ["m", "t"], ["a"]),
                 helper.make_node("Conv", ["a", "W1"], ["c1"]), helper.make_node("Relu", ["c1"], ["r"]),
                 helper.make_node("Conv", ["r", "W2"], ["y"])]
        return _model(nodes, inits, (2, 4, 8, 8))
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c1"]), helper.make_node("Relu", ["c1"], ["r"]),
             helper.make_node("Mul", ["r", "s"], ["m"]), helper.make_node("Add", ["t", "m"], ["a"]),
             helper.make_node("Conv", ["a", "W2"], ["c2"])]
    if second_reader:  # the scaled value is read twice: not a BatchNorm's own
        nodes += [helper.make_node("Add", ["c2", "m2"], ["y"]),
                  helper.make_node("ReduceMean", ["m"], ["m2"], axes=[1], keepdims=1)]
        nodes[-2], nodes[-1] = nodes[-1], nodes[-2]
    else:
        nodes[-1].output[0] = "y"
    return _model(nodes, inits, (2, 3, 8, 8))


def test_a_written_out_batch_norm_after_an_activation_is_tuned_as_normalisation():
    model = _conv_affine_model()
    module, roles = _roles(model)
    assert roles == {"W1": "weight", "W2": "weight", "s": "norm", "t": "norm"}
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    reference, ours = run_both(model, {"x": x})
    assert_close(reference, ours)
    module.run({"x": torch.from_numpy(x)})["y"].square().sum().backward()
    norms = module.parameters_by_role("norm")
    assert len(norms) == 2 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in norms.values())


@pytest.mark.parametrize("case", ["preprocessing of the input", "scalar scale", "shift of another shape",
                                  "scaled value read twice"])
def test_affine_pairs_that_are_not_a_batch_norm_stay_constants(case):
    model = {
        "preprocessing of the input": lambda: _conv_affine_model(pre="input"),
        "scalar scale": lambda: _conv_affine_model(scale_shape=()),
        "shift of another shape": lambda: _conv_affine_model(shift_shape=(1, 4, 8, 1)),
        "scaled value read twice": lambda: _conv_affine_model(second_reader=True),
    }[case]()
    _, roles = _roles(model)
    assert roles == {"W1": "weight", "W2": "weight"}
