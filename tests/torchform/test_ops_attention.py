"""Opset-23+ transformer operators of the trainable form against onnxruntime, property-based."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper

from fcpts_onnx.torchform import OnnxModule

from .harness import assert_close, check_node, ort_accepts, run_both, single_node_model
from .test_ops_nn import SETTINGS, TOL, assert_refused, draw_normalized_shape, rand, seeds


@functools.cache
def sliding_window_runs() -> bool:
    """onnxruntime 1.32 runs opset 25's left/right_window_size; 1.30 refuses the attributes."""
    node = helper.make_node("Attention", ["q", "k", "v"], ["y"], left_window_size=1, right_window_size=1)
    q = rand(0, 1, 1, 2, 2)
    return ort_accepts(single_node_model(node, {"q": q, "k": q, "v": q}, opset=25))


def _attention_case(data, seed: int, opset: int):
    """A random Attention node and its feeds: 3-D or 4-D, grouped heads, a past cache, bool or
    float masks of broadcast shapes, causal, softcap, scale, any
    qk_matmul_output mode; opset 24 adds nonpad_kv_seqlen, 25 the sliding window."""
    batch = data.draw(st.integers(1, 2))
    kv_heads = data.draw(st.integers(1, 2))
    q_heads = kv_heads * data.draw(st.integers(1, 3))
    head, v_head = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 5))
    q_len, kv_len = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 6))
    three_d = data.draw(st.booleans())
    use_past = data.draw(st.booleans())
    past = data.draw(st.integers(1, 3)) if use_past else 0
    total = past + kv_len
    attrs = {"qk_matmul_output_mode": data.draw(st.integers(0, 3))}
    if data.draw(st.booleans()):
        attrs["is_causal"] = 1
    if data.draw(st.booleans()):
        attrs["softcap"] = data.draw(st.sampled_from([0.5, 2.0, 30.0]))
    if data.draw(st.booleans()):
        attrs["scale"] = data.draw(st.sampled_from([0.1, 1.0, 2.5]))
    if opset >= 25 and sliding_window_runs() and data.draw(st.booleans()):
        attrs["left_window_size"] = data.draw(st.integers(-1, 3))
        attrs["right_window_size"] = data.draw(st.integers(-1, 3))
    feeds = {}
    if three_d:
        attrs.update(q_num_heads=q_heads, kv_num_heads=kv_heads)
        feeds["q"] = rand(seed, batch, q_len, q_heads * head)
        feeds["k"] = rand(seed + 1, batch, kv_len, kv_heads * head)
        feeds["v"] = rand(seed + 2, batch, kv_len, kv_heads * v_head)
    else:
        feeds["q"] = rand(seed, batch, q_heads, q_len, head)
        feeds["k"] = rand(seed + 1, batch, kv_heads, kv_len, head)
        feeds["v"] = rand(seed + 2, batch, kv_heads, kv_len, v_head)
    names = ["q", "k", "v", "", "", "", ""]
    mask_kind = data.draw(st.sampled_from(["none", "bool", "float"]))
    if mask_kind != "none":
        # (opset 24 allows a shorter last axis, padded with -inf; onnxruntime 1.32 refuses it,
        # so test_attention_short_mask checks it against the equivalent full mask instead)
        full = [batch, q_heads, q_len, total]
        # broadcastable: drop leading dims, or set some to 1
        rank = data.draw(st.integers(2, 4))
        shape = [d if data.draw(st.booleans()) else 1 for d in full[4 - rank:-2]] + full[-2:]
        if mask_kind == "bool":
            feeds["m"] = np.random.default_rng(seed + 3).random(shape) < 0.8
        else:
            feeds["m"] = rand(seed + 3, *shape)
        names[3] = "m"
    if use_past:
        feeds["pk"] = rand(seed + 4, batch, kv_heads, past, head)
        feeds["pv"] = rand(seed + 5, batch, kv_heads, past, v_head)
        names[4], names[5] = "pk", "pv"
    elif opset >= 24 and data.draw(st.booleans()):
        feeds["n"] = np.random.default_rng(seed + 6).integers(1, total + 1, size=batch).astype(np.int64)
        names[6] = "n"
    while not names[-1]:
        names.pop()
    outputs = ["y", "pk_out" if use_past else "", "pv_out" if use_past else "", "qk" if data.draw(st.booleans()) else ""]
    while not outputs[-1]:
        outputs.pop()
    return helper.make_node("Attention", names, outputs, **attrs), feeds


@SETTINGS
@given(data=st.data(), seed=seeds, opset=st.sampled_from([23, 24, 25]))
def test_attention(data, seed, opset):
    node, feeds = _attention_case(data, seed, opset)
    model = single_node_model(node, feeds, opset=opset)
    reference, ours = run_both(model, feeds)
    assert_close(reference, ours, **TOL)


def test_attention_fully_masked_row_is_zero():
    """An all-False mask row gives a zero output row (the specification's errata), not NaN."""
    mask = np.ones((3, 4), dtype=bool)
    mask[1] = False
    node = helper.make_node("Attention", ["q", "k", "v", "m"], ["y"])
    ref = check_node(node, {"q": rand(0, 1, 2, 3, 4), "k": rand(1, 1, 2, 4, 4), "v": rand(2, 1, 2, 4, 5),
                            "m": mask}, opset=23, **TOL)
    assert np.all(ref["y"][:, :, 1] == 0) and np.isfinite(ref["y"]).all()


def test_attention_gradients_are_finite_with_masked_rows():
    """The learner backpropagates through attention: a fully masked row must not put NaN in
    the gradients of the query, key and value projections."""
    mask = np.ones((3, 4), dtype=bool)
    mask[0] = False
    node = helper.make_node("Attention", ["q", "k", "v", "m"], ["y"], is_causal=1)
    feeds = {"q": rand(0, 1, 2, 3, 4), "k": rand(1, 1, 2, 4, 4), "v": rand(2, 1, 2, 4, 5), "m": mask}
    module = OnnxModule(single_node_model(node, feeds, opset=23))
    tensors = {k: torch.from_numpy(v).requires_grad_(v.dtype == np.float32) for k, v in feeds.items()}
    module.run(tensors)["y"].square().sum().backward()
    for name in ("q", "k", "v"):
        assert torch.isfinite(tensors[name].grad).all(), name


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_attention_short_mask(kind):
    """Opset 24: a mask shorter than the keys is padded with -inf (False), so it equals the full
    mask with those keys masked. onnxruntime refuses short masks, hence this self-check."""
    full = np.random.default_rng(0).random((3, 5)) < 0.7
    full[:, 3:] = False
    full[:, 0] = True
    short = full[:, :3]
    if kind == "float":
        full, short = np.where(full, 0.5, -np.inf).astype(np.float32), rand(3, 3, 3)
        full[:, :3] = short
    feeds = {"q": rand(0, 1, 2, 3, 4), "k": rand(1, 1, 2, 5, 4), "v": rand(2, 1, 2, 5, 6)}
    node = helper.make_node("Attention", ["q", "k", "v", "m"], ["y"])

    def run(mask):
        module = OnnxModule(single_node_model(node, {**feeds, "m": mask}, opset=24))
        return module.run({k: torch.from_numpy(v) for k, v in {**feeds, "m": mask}.items()})["y"].numpy()

    np.testing.assert_allclose(run(short), run(full), rtol=1e-6, atol=1e-7)


def test_attention_refuses_3d_without_heads():
    node = helper.make_node("Attention", ["q", "k", "v"], ["y"])
    feeds = {"q": rand(0, 1, 3, 8), "k": rand(1, 1, 3, 8), "v": rand(2, 1, 3, 8)}
    module = OnnxModule(single_node_model(node, feeds, opset=23))
    assert_refused(module, {k: torch.from_numpy(v) for k, v in feeds.items()}, "q_num_heads")


@SETTINGS
@given(data=st.data(), seed=seeds)
def test_rms_normalization(data, seed):
    shape, axis, norm_shape = draw_normalized_shape(data)
    # the scale may broadcast over the normalised axes
    scale_shape = [d if data.draw(st.booleans()) else 1 for d in norm_shape]
    scale_shape = scale_shape[data.draw(st.integers(0, len(scale_shape) - 1)):]
    node = helper.make_node("RMSNormalization", ["x", "s"], ["y"], axis=axis,
                            epsilon=data.draw(st.sampled_from([1e-5, 1e-2])))
    check_node(node, {"x": rand(seed, *shape)}, opset=23, initializers={"s": rand(seed + 1, *scale_shape)}, **TOL)


def test_rms_normalization_double_stash():
    node = helper.make_node("RMSNormalization", ["x", "s"], ["y"], stash_type=TensorProto.DOUBLE)
    feeds = {"x": rand(0, 2, 3, 4).astype(np.float64)}
    check_node(node, feeds, opset=23, initializers={"s": rand(1, 4).astype(np.float64)}, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(data=st.data(), seed=seeds)
def test_rotary_embedding(data, seed):
    batch, seq = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 5))
    heads, half = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4))
    head = 2 * half + 2 * data.draw(st.integers(0, 2))  # even, maybe wider than the rotated part
    rotary = data.draw(st.sampled_from([0, 2 * half])) if head != 2 * half else 0
    rot_half = (rotary or head) // 2
    attrs = {"interleaved": int(data.draw(st.booleans()))}
    if rotary:
        attrs["rotary_embedding_dim"] = rotary
    three_d = data.draw(st.booleans())
    if three_d:
        attrs["num_heads"] = heads
        feeds = {"x": rand(seed, batch, seq, heads * head)}
    else:
        feeds = {"x": rand(seed, batch, heads, seq, head)}
    if data.draw(st.booleans()):
        max_pos = seq + data.draw(st.integers(0, 3))
        feeds["cos"], feeds["sin"] = rand(seed + 1, max_pos, rot_half), rand(seed + 2, max_pos, rot_half)
        feeds["pos"] = np.random.default_rng(seed + 3).integers(0, max_pos, size=(batch, seq)).astype(np.int64)
        names = ["x", "cos", "sin", "pos"]
    else:
        feeds["cos"], feeds["sin"] = rand(seed + 1, batch, seq, rot_half), rand(seed + 2, batch, seq, rot_half)
        names = ["x", "cos", "sin"]
    check_node(helper.make_node("RotaryEmbedding", names, ["y"], **attrs), feeds, opset=23, **TOL)
