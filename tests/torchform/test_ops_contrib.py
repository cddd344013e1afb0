"""com.microsoft contrib operators of the trainable form against onnxruntime's own kernels."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

from fcpts_onnx.discovery import discover
from fcpts_onnx.torchform import OnnxModule

from .harness import check_node, single_node_model
from .test_ops_nn import assert_refused

ort.set_default_logger_severity(3)
SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOL = {"rtol": 1e-5, "atol": 1e-5}
MS = "com.microsoft"

# (activation, activation_params) as onnxruntime's Conv fusion writes them.
CONV_ACTIVATIONS = [("", []), ("Relu", []), ("Tanh", []), ("Sigmoid", []), ("LeakyRelu", [0.1]),
                    ("Clip", [-0.5, 0.7]), ("HardSigmoid", [0.3, 0.4])]


def rand(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@SETTINGS
@given(seed=st.integers(0, 2**16), act=st.sampled_from(CONV_ACTIVATIONS), with_bias=st.booleans(),
       with_z=st.booleans(), stride=st.integers(1, 2), pad=st.integers(0, 1), group=st.sampled_from([1, 2]))
def test_fused_conv(seed, act, with_bias, with_z, stride, pad, group):
    x, w = rand(seed, 2, 4, 7, 6), rand(seed + 1, 6, 4 // group, 3, 3)
    out_hw = ((7 + 2 * pad - 3) // stride + 1, (6 + 2 * pad - 3) // stride + 1)
    inits = {"w": w}
    inputs = ["x", "w", "b" if with_bias or with_z else ""]
    if with_bias or with_z:
        inits["b"] = rand(seed + 2, 6) if with_bias else np.zeros(6, np.float32)
    feeds = {"x": x}
    if with_z:
        inputs.append("z")
        feeds["z"] = rand(seed + 3, 2, 6, *out_hw)
    attrs = {"activation": act[0]} if act[0] else {}
    if act[1]:
        attrs["activation_params"] = act[1]
    node = helper.make_node("FusedConv", inputs, ["y"], domain=MS, strides=[stride, stride],
                            pads=[pad] * 4, group=group, **attrs)
    check_node(node, feeds, initializers=inits, **TOL)


@SETTINGS
@given(seed=st.integers(0, 2**16), act=st.sampled_from(["Relu", "Tanh", "Sigmoid", "LeakyRelu", "HardSigmoid"]),
       trans_a=st.booleans(), trans_b=st.booleans(), with_c=st.booleans(), alpha=st.sampled_from([1.0, 0.5]),
       beta=st.sampled_from([1.0, 2.0]))
def test_fused_gemm(seed, act, trans_a, trans_b, with_c, alpha, beta):
    a = rand(seed, *((5, 3) if trans_a else (3, 5)))
    b = rand(seed + 1, *((4, 5) if trans_b else (5, 4)))
    # onnxruntime refuses a FusedGemm without an activation ("unknown kernel type").
    attrs = {"activation": act}
    if act == "LeakyRelu":
        attrs["activation_alpha"] = 0.2
    if act == "HardSigmoid":
        attrs.update(activation_alpha=0.3, activation_beta=0.4)
    inits = {"b": b, **({"c": rand(seed + 2, 4)} if with_c else {})}
    node = helper.make_node("FusedGemm", ["a", "b", "c" if with_c else ""], ["y"], domain=MS,
                            transA=int(trans_a), transB=int(trans_b), alpha=alpha, beta=beta, **attrs)
    check_node(node, {"a": a}, initializers=inits, **TOL)


@SETTINGS
@given(seed=st.integers(0, 2**16), trans_a=st.booleans(), trans_b=st.booleans(), tb_a=st.booleans(),
       tb_b=st.booleans(), alpha=st.sampled_from([1.0, 0.125]), rank=st.sampled_from([2, 3, 4]))
def test_fused_matmul(seed, trans_a, trans_b, tb_a, tb_b, alpha, rank):
    batch, m, k, n = (2, 3)[: rank - 2], 4, 5, 6
    # onnxruntime refuses transBatch on rank-2 operands (it needs equal ranks >= 3).
    tb_a, tb_b = tb_a and rank >= 3, tb_b and rank >= 3

    def stored(rows: int, cols: int, trans: bool, trans_batch: bool) -> tuple[int, ...]:
        last2 = (cols, rows) if trans else (rows, cols)
        if trans_batch and rank >= 3:
            return (last2[0], *batch, last2[1])
        return (*batch, *last2)

    a = rand(seed, *stored(m, k, trans_a, tb_a))
    b = rand(seed + 1, *stored(k, n, trans_b, tb_b))
    node = helper.make_node("FusedMatMul", ["a", "b"], ["y"], domain=MS, transA=int(trans_a), transB=int(trans_b),
                            transBatchA=int(tb_a), transBatchB=int(tb_b), alpha=alpha)
    out = check_node(node, {"a": a, "b": b}, **TOL)
    assert out["y"].shape == (*batch, m, n)


def test_fused_matmul_broadcasts_a_2d_weight():
    a, b = rand(0, 2, 3, 4, 5), rand(1, 6, 5)
    node = helper.make_node("FusedMatMul", ["a", "b"], ["y"], domain=MS, transB=1, alpha=0.5)
    check_node(node, {"a": a}, initializers={"b": b}, **TOL)


@pytest.mark.parametrize("op,bias", [("Gelu", False), ("BiasGelu", True), ("FastGelu", False), ("FastGelu", True)])
def test_gelu_family(op, bias):
    x = rand(0, 2, 7, 8) * 3
    inits = {"bias": rand(1, 8)} if bias else {}
    node = helper.make_node(op, ["x", "bias"] if bias else ["x"], ["y"], domain=MS)
    check_node(node, {"x": x}, initializers=inits, **TOL)


@pytest.mark.parametrize("alpha", [None, 1.0, -0.5])
def test_quick_gelu(alpha):
    attrs = {} if alpha is None else {"alpha": alpha}
    check_node(helper.make_node("QuickGelu", ["x"], ["y"], domain=MS, **attrs), {"x": rand(0, 3, 9) * 3}, **TOL)


def test_fused_conv_weights_get_gradients():
    x = rand(0, 1, 2, 5, 5)
    model = single_node_model(helper.make_node("FusedConv", ["x", "w", "b"], ["y"], domain=MS, activation="Relu"),
                              {"x": x}, initializers={"w": rand(1, 3, 2, 3, 3), "b": rand(2, 3)})
    module = OnnxModule(model, discover(model).weights)
    assert [w.op_type for w in discover(model).weights] == ["FusedConv"]
    module.run({"x": torch.from_numpy(x)})["y"].sum().backward()
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("op,activation", [("FusedConv", "Softplus"), ("FusedGemm", "Clip"), ("FusedGemm", "Elu")])
def test_unknown_activation_refused(op, activation):
    if op == "FusedConv":
        node = helper.make_node(op, ["x", "w"], ["y"], domain=MS, activation=activation)
        feeds, inits = {"x": rand(0, 1, 2, 4, 4)}, {"w": rand(1, 3, 2, 3, 3)}
    else:
        node = helper.make_node(op, ["x", "w"], ["y"], domain=MS, activation=activation)
        feeds, inits = {"x": rand(0, 2, 3)}, {"w": rand(1, 3, 4)}
    module = OnnxModule(single_node_model(node, feeds, initializers=inits))
    assert_refused(module, {k: torch.from_numpy(v) for k, v in feeds.items()}, f"activation='{activation}'")
