"""com.microsoft contrib operators of the trainable form against onnxruntime's own kernels."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import helper

from fcpts_onnx.discovery import discover
from fcpts_onnx.torchform import OnnxModule

from .harness import ORT_VERSION, check_node, single_node_model
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


# -- transformer fusions (onnxruntime.transformers.optimizer) --------------------------------

@pytest.mark.parametrize("skip_shape", [(2, 5, 8), (1, 5, 8), (5, 8)])
@pytest.mark.parametrize("with_beta,with_bias", [(True, True), (True, False), (False, True), (False, False)])
def test_skip_layer_normalization(skip_shape, with_beta, with_bias):
    inits = {"gamma": rand(2, 8)}
    if with_beta:
        inits["beta"] = rand(3, 8)
    if with_bias:
        inits["bias"] = rand(4, 8)
    node = helper.make_node("SkipLayerNormalization", ["x", "skip", "gamma", "beta" if with_beta else "",
                                                       "bias" if with_bias else ""],
                            ["y", "mean", "inv_std", "sum"], domain=MS, epsilon=1e-5)
    check_node(node, {"x": rand(0, 2, 5, 8), "skip": rand(1, *skip_shape)}, initializers=inits, **TOL)


@pytest.mark.parametrize("with_bias", [True, False])
def test_skip_simplified_layer_normalization(with_bias):
    inits = {"gamma": rand(2, 8)} | ({"bias": rand(3, 8)} if with_bias else {})
    node = helper.make_node("SkipSimplifiedLayerNormalization",
                            ["x", "skip", "gamma", "bias" if with_bias else ""], ["y", "", "inv_std", "sum"],
                            domain=MS, epsilon=1e-6)
    check_node(node, {"x": rand(0, 2, 5, 8), "skip": rand(1, 2, 5, 8)}, initializers=inits, **TOL)


@pytest.mark.parametrize("axis", [-1, 1])
def test_simplified_layer_normalization(axis):
    # onnxruntime registers it in the default domain, not com.microsoft
    scale = rand(1, 8) if axis == -1 else rand(1, 5, 8)
    node = helper.make_node("SimplifiedLayerNormalization", ["x", "scale"], ["y", "inv_std"], axis=axis, epsilon=1e-5)
    check_node(node, {"x": rand(0, 2, 5, 8)}, initializers={"scale": scale}, **TOL)


@pytest.mark.parametrize("segments", [True, False])
@pytest.mark.parametrize("mask", [True, False])
@pytest.mark.parametrize("positions", [True, False])
def test_embed_layer_normalization(segments, mask, positions):
    rng = np.random.default_rng(0)
    feeds = {"ids": rng.integers(0, 20, (2, 5)).astype(np.int32)}
    inits = {"words": rand(1, 20, 8), "pos": rand(2, 10, 8), "gamma": rand(4, 8), "beta": rand(5, 8)}
    if segments:
        feeds["segments"] = rng.integers(0, 2, (2, 5)).astype(np.int32)
        inits["segment_table"] = rand(3, 2, 8)
    if mask:
        feeds["mask"] = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.int32)
    inputs = ["ids", "segments" if segments else "", "words", "pos", "segment_table" if segments else "",
              "gamma", "beta", "mask" if mask else ""]
    if positions:
        inputs.append("position_ids")
        feeds["position_ids"] = np.array([[3, 4, 5, 6, 7]], np.int32)
    node = helper.make_node("EmbedLayerNormalization", inputs, ["y", "mask_index", "sum"], domain=MS, epsilon=1e-12)
    check_node(node, feeds, initializers=inits, **TOL)


def _mask(kind: str, rng, batch: int, seq: int) -> np.ndarray | None:
    """A com.microsoft Attention mask_index of the given layout (right padding, as exporters write)."""
    lengths = rng.integers(1, seq + 1, batch)
    if kind == "none":
        return None
    if kind == "end":  # [batch]: keys from end[b] on are masked
        return lengths.astype(np.int32)
    if kind == "end_start":  # [2 * batch]: and keys before start[b]
        return np.concatenate([lengths, rng.integers(0, 1 + lengths // 2)]).astype(np.int32)
    if kind == "raw":  # [batch, seq], with a row that masks every key
        raw = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int32)
        raw[-1] = 0
        return raw
    return (rng.random((batch, seq, seq)) > 0.3).astype(np.int32)  # [batch, seq, seq]


@SETTINGS
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 3), seq=st.integers(1, 6), heads=st.sampled_from([1, 2, 4]),
       mask=st.sampled_from(["none", "end", "end_start", "raw", "per_query"]), causal=st.booleans(),
       v_size=st.sampled_from([None, 4]), with_bias=st.booleans(), attention_bias=st.booleans(),
       scale=st.sampled_from([None, 0.3]))
def test_contrib_attention(seed, batch, seq, heads, mask, causal, v_size, with_bias, attention_bias, scale):
    # onnxruntime 1.30.0 (an H200 machine's image) crashes the process on this node without a
    # bias input; 1.32.0 runs it
    assume(with_bias or ORT_VERSION >= (1, 32))
    rng = np.random.default_rng(seed)
    hidden, d_in = 8, 6
    sizes = [hidden, hidden, v_size * heads if v_size else hidden]
    inits = {"w": rand(seed, d_in, sum(sizes))}
    if with_bias:
        inits["b"] = rand(seed + 1, sum(sizes))
    feeds = {"x": rand(seed + 2, batch, seq, d_in)}
    inputs = ["x", "w", "b" if with_bias else ""]
    mask_index = _mask(mask, rng, batch, seq)
    inputs.append("" if mask_index is None else "mask")
    if mask_index is not None:
        feeds["mask"] = mask_index
    if attention_bias:
        inputs += ["", "attention_bias"]
        feeds["attention_bias"] = rand(seed + 3, batch, heads, seq, seq)
    attrs = {"num_heads": heads, "unidirectional": int(causal)}
    if v_size:
        attrs["qkv_hidden_sizes"] = sizes
    if scale:
        attrs["scale"] = scale
    node = helper.make_node("Attention", [*inputs], ["y"], domain=MS, **attrs)
    check_node(node, feeds, initializers=inits, **TOL)


@pytest.mark.parametrize("mask", ["none", "end", "raw"])
@pytest.mark.parametrize("with_bias,attention_bias,causal", [(False, False, False), (True, True, False),
                                                              (True, False, True)])
def test_multi_head_attention(mask, with_bias, attention_bias, causal):
    rng = np.random.default_rng(0)
    batch, q_len, heads, hidden = 2, 4, 2, 8
    kv_len = q_len if causal else 6
    feeds = {"q": rand(0, batch, q_len, hidden), "k": rand(1, batch, kv_len, hidden), "v": rand(2, batch, kv_len, hidden)}
    inits = {"bias": rand(3, 3 * hidden)} if with_bias else {}
    mask_index = None if mask == "none" else _mask(mask, rng, batch, kv_len)
    inputs = ["q", "k", "v", "bias" if with_bias else "", "" if mask_index is None else "mask"]
    if mask_index is not None:
        feeds["mask"] = mask_index
    if attention_bias:
        inputs.append("attention_bias")
        feeds["attention_bias"] = rand(4, 1, heads, q_len, kv_len)
    node = helper.make_node("MultiHeadAttention", inputs, ["y"], domain=MS, num_heads=heads, unidirectional=int(causal))
    check_node(node, feeds, initializers=inits, **TOL)


def test_contrib_attention_weight_is_prunable_and_refusals_are_named():
    x = rand(0, 2, 3, 4)
    node = helper.make_node("Attention", ["x", "w", "b"], ["y"], domain=MS, num_heads=2)
    model = single_node_model(node, {"x": x}, initializers={"w": rand(1, 4, 12), "b": rand(2, 12)})
    weights = discover(model).weights
    assert [(w.name, w.op_type) for w in weights] == [("w", "Attention")]
    module = OnnxModule(model, weights)
    module.run({"x": torch.from_numpy(x)})["y"].sum().backward()
    roles = {module.sources[k].role for k in module.sources if module.parameter(k).grad.abs().sum() > 0}
    assert roles == {"weight", "bias"}

    past = helper.make_node("Attention", ["x", "w", "b", "", "past"], ["y"], domain=MS, num_heads=2)
    feeds = {"x": x, "past": rand(3, 2, 2, 2, 1, 2)}
    module = OnnxModule(single_node_model(past, feeds, initializers={"w": rand(1, 4, 12), "b": rand(2, 12)}))
    assert_refused(module, {k: torch.from_numpy(v) for k, v in feeds.items()}, "a past key/value cache")
    four_d = helper.make_node("Attention", ["x", "w", "b", "mask"], ["y"], domain=MS, num_heads=2)
    feeds = {"x": x, "mask": np.ones((2, 1, 3, 3), np.int32)}
    module = OnnxModule(single_node_model(four_d, feeds, initializers={"w": rand(1, 4, 12), "b": rand(2, 12)}))
    assert_refused(module, {k: torch.from_numpy(v) for k, v in feeds.items()}, r"a mask_index of shape \[2, 1, 3, 3\]")
