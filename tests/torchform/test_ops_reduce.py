"""Reductions, ArgMax/ArgMin, CumSum and TopK against onnxruntime, property-based, at the
opsets where axes moved from attribute to input (ReduceSum 11 vs 13, the others 17 vs 18)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from fcpts_onnx.torchform import OnnxModule

from .harness import ORT_VERSION, assert_close, check_node, run_both, single_node_model

SETTINGS = settings(max_examples=25, deadline=None)
seeds = st.integers(0, 2**31 - 1)

REDUCE_OPS = ["ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
              "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"]


def node(op: str, inputs, outputs=("y",), **attrs) -> onnx.NodeProto:
    return helper.make_node(op, list(inputs), list(outputs), **attrs)


def i64(values) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def data_for(op: str, shape, seed: int, dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.integer):
        if op == "ReduceProd":  # no overflow (undefined behaviour in onnxruntime's C++)
            return np.asarray(rng.choice([-1, 1], size=shape) * np.where(rng.random(shape) < 0.02, 3, 1)).astype(dtype)
        low = 1 if op == "ReduceLogSum" else -5
        return np.asarray(rng.integers(low, 6, size=shape)).astype(dtype)
    x = np.asarray(rng.standard_normal(shape))
    if op == "ReduceLogSum":
        x = np.abs(x) + 0.1
    elif op == "ReduceProd":
        x = 1 + 0.3 * x  # keeps products of a few hundred factors finite
    return x.astype(dtype)


def input_since(op: str) -> int:
    return 13 if op == "ReduceSum" else 18


@st.composite
def reduce_case(draw):
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=4)))
    rank = len(shape)
    axes = draw(st.none() | st.lists(st.integers(0, rank - 1), min_size=1, max_size=rank, unique=True))
    if axes is not None:
        axes = [a - rank if draw(st.booleans()) else a for a in axes]
    keepdims = draw(st.sampled_from([None, 0, 1]))
    return shape, axes, keepdims


@pytest.mark.parametrize("op", REDUCE_OPS)
@SETTINGS
@given(case=reduce_case(), seed=seeds)
def test_reduce_axes_attribute(op, case, seed):
    shape, axes, keepdims = case
    attrs = {k: v for k, v in (("axes", axes), ("keepdims", keepdims)) if v is not None}
    x = data_for(op, shape, seed)
    opset = input_since(op) - 1  # the last opset with the attribute: ReduceSum 12, the rest 17
    check_node(node(op, ["x"], **attrs), {"x": x}, opset=opset, rtol=1e-5, atol=1e-5)
    if op == "ReduceSum":
        check_node(node(op, ["x"], **attrs), {"x": x}, opset=11, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", REDUCE_OPS)
@SETTINGS
@given(case=reduce_case(), seed=seeds, noop=st.sampled_from([None, 0, 1]), fed=st.booleans())
def test_reduce_axes_input(op, case, seed, noop, fed):
    shape, axes, keepdims = case
    attrs = {k: v for k, v in (("keepdims", keepdims), ("noop_with_empty_axes", noop)) if v is not None}
    x = data_for(op, shape, seed)
    if axes is None:  # absent input: all axes, or the noop
        check_node(node(op, ["x"], **attrs), {"x": x}, opset=input_since(op), rtol=1e-5, atol=1e-5)
        check_node(node(op, ["x", "a"], **attrs), {"x": x}, opset=input_since(op), rtol=1e-5, atol=1e-5,
                   initializers={"a": np.zeros(0, np.int64)})  # empty input: the same
        return
    feeds, inits = ({"x": x, "a": i64(axes)}, None) if fed else ({"x": x}, {"a": i64(axes)})
    check_node(node(op, ["x", "a"], **attrs), feeds, opset=input_since(op), initializers=inits, rtol=1e-5,
               atol=1e-5)


@pytest.mark.parametrize("op", ["ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd",
                                "ReduceL1", "ReduceSumSquare", "ReduceL2", "ReduceLogSum"])
@pytest.mark.parametrize("dtype", [np.int64, np.int32])
@SETTINGS
@given(case=reduce_case(), seed=seeds)
def test_reduce_integers(op, dtype, case, seed):
    shape, axes, keepdims = case
    attrs = {k: v for k, v in (("axes", axes), ("keepdims", keepdims)) if v is not None}
    check_node(node(op, ["x"], **attrs), {"x": data_for(op, shape, seed, dtype)}, opset=12)


@pytest.mark.parametrize("op", REDUCE_OPS)
def test_reduce_noop_applies_the_elementwise_part(op):
    # onnxruntime: noop_with_empty_axes still squares (SumSquare), takes |x| (L1, L2), log (LogSum).
    x = np.array([[-1.5, 2.0, 0.5], [3.0, -0.25, 1.0]], np.float32)
    if op == "ReduceLogSum":
        x = np.abs(x)
    check_node(node(op, ["x"], noop_with_empty_axes=1), {"x": x}, opset=input_since(op))


@pytest.mark.parametrize("op", REDUCE_OPS)
@pytest.mark.parametrize("keepdims", [0, 1])
def test_reduce_over_empty_dimension(op, keepdims):
    # Identities, not errors or nan: Max -inf, Min +inf, Prod 1, Mean 0, LogSum(Exp) -inf.
    x = np.zeros((0, 3), np.float32)
    model = single_node_model(node(op, ["x"], axes=[0], keepdims=keepdims), {"x": x}, opset=12)
    reference, ours = run_both(model, {"x": x})
    assert ours["y"].shape == reference["y"].shape
    np.testing.assert_array_equal(ours["y"], reference["y"])  # equal infinities compare equal here


@pytest.mark.skipif(ORT_VERSION < (1, 32), reason="onnxruntime 1.30 keeps the reduced empty axis (2, 0)")
def test_reduce_max_of_empty_integers():
    x = np.zeros((2, 0), np.int32)
    check_node(node("ReduceMax", ["x"], axes=[1]), {"x": x}, opset=13)
    check_node(node("ReduceMin", ["x"], axes=[-1], keepdims=0), {"x": x}, opset=13)


# -- ArgMax / ArgMin ---------------------------------------------------------------------

@pytest.mark.parametrize("op", ["ArgMax", "ArgMin"])
@SETTINGS
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple), data=st.data(), seed=seeds,
       keepdims=st.sampled_from([None, 0, 1]), last=st.sampled_from([None, 0, 1]),
       ties=st.booleans())
def test_arg_max_min(op, shape, data, seed, keepdims, last, ties):
    rank = len(shape)
    axis = data.draw(st.none() | st.integers(-rank, rank - 1))
    rng = np.random.default_rng(seed)
    x = (rng.integers(0, 3, size=shape) if ties else rng.standard_normal(shape)).astype(np.float32)
    attrs = {k: v for k, v in (("axis", axis), ("keepdims", keepdims), ("select_last_index", last))
             if v is not None}
    check_node(node(op, ["x"], **attrs), {"x": x}, opset=13)
    attrs.pop("select_last_index", None)
    check_node(node(op, ["x"], **attrs), {"x": x}, opset=11)


# -- CumSum ------------------------------------------------------------------------------

@SETTINGS
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple), data=st.data(), seed=seeds,
       exclusive=st.sampled_from([None, 0, 1]), reverse=st.sampled_from([None, 0, 1]),
       dtype=st.sampled_from([np.float32, np.int64, np.int32]), axis_dtype=st.sampled_from([np.int64, np.int32]),
       opset=st.sampled_from([11, 14]))
def test_cumsum(shape, data, seed, exclusive, reverse, dtype, axis_dtype, opset):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    rng = np.random.default_rng(seed)
    x = (rng.integers(-9, 10, size=shape) if np.issubdtype(dtype, np.integer) else rng.standard_normal(shape))
    attrs = {k: v for k, v in (("exclusive", exclusive), ("reverse", reverse)) if v is not None}
    check_node(node("CumSum", ["x", "a"], **attrs), {"x": x.astype(dtype)}, opset=opset, rtol=1e-5, atol=1e-5,
               initializers={"a": np.array(axis, axis_dtype)})


# -- TopK --------------------------------------------------------------------------------

@st.composite
def top_k_case(draw):
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))
    axis = draw(st.none() | st.integers(-len(shape), len(shape) - 1))
    k = draw(st.integers(0, shape[-1 if axis is None else axis]))
    rng = np.random.default_rng(draw(seeds))
    x = (rng.permutation(int(np.prod(shape))).reshape(shape) * 0.5 - 3).astype(np.float32)  # distinct values
    return x, axis, k


@SETTINGS
@given(case=top_k_case(), largest=st.sampled_from([None, 0, 1]))
def test_top_k(case, largest):
    x, axis, k = case
    attrs = {} if axis is None else {"axis": axis}
    if k >= 1:  # TopK-1 rejects k=0
        check_node(node("TopK", ["x"], ["v", "i"], k=k, **attrs), {"x": x}, opset=1)
    check_node(node("TopK", ["x", "k"], ["v", "i"], **attrs), {"x": x}, opset=10, initializers={"k": i64([k])})
    if largest is not None:
        attrs["largest"] = largest
    check_node(node("TopK", ["x", "k"], ["v", "i"], **attrs), {"x": x}, opset=11, initializers={"k": i64([k])})


@SETTINGS
@given(case=top_k_case(), largest=st.sampled_from([0, 1]))
def test_top_k_unsorted_selects_the_same_elements(case, largest):
    x, axis, k = case
    axis = -1 if axis is None else axis
    model = single_node_model(node("TopK", ["x", "k"], ["v", "i"], axis=axis, largest=largest, sorted=0),
                              {"x": x}, opset=11, initializers={"k": i64([k])})
    reference, ours = run_both(model, {"x": x})
    # Order is unspecified when sorted=0: compare after sorting by index along the axis.
    for res in (reference, ours):
        order = np.argsort(res["i"], axis=axis)
        res["v"], res["i"] = np.take_along_axis(res["v"], order, axis), np.take_along_axis(res["i"], order, axis)
    assert_close(reference, ours)


@pytest.mark.parametrize("largest", [0, 1])
def test_top_k_ties_in_index_order(largest):
    x = np.array([[1, 3, 3, 2, 3, 1, 2, 1], [0, 0, 0, 0, 5, 5, 5, 5]], np.float32)
    for k in (1, 3, 5, 8):
        check_node(node("TopK", ["x", "k"], ["v", "i"], largest=largest), {"x": x}, opset=11,
                   initializers={"k": i64([k])})


# -- gradients ---------------------------------------------------------------------------

GRAD_CASES = [
    ("ReduceMean", {"axes": [0, -1], "keepdims": 0}, {}, 13),
    ("ReduceSum", {}, {"a": i64([1])}, 13),
    ("ReduceMax", {"axes": [1]}, {}, 13),
    ("ReduceL2", {"axes": [0]}, {}, 13),
    ("ReduceLogSumExp", {}, {"a": i64([-1])}, 18),
    ("ReduceSumSquare", {"keepdims": 0}, {}, 13),
    ("ReduceProd", {"axes": [1, 2]}, {}, 13),
    ("CumSum", {"exclusive": 1, "reverse": 1}, {"a": i64(1)}, 14),
]


@pytest.mark.parametrize("op,attrs,inits,opset", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_gradients_flow(op, attrs, inits, opset):
    x = np.random.default_rng(0).standard_normal((3, 4, 2)).astype(np.float32)
    model = single_node_model(node(op, ["x", *inits], **attrs), {"x": x}, opset=opset, initializers=inits)
    module = OnnxModule(model).double()
    t = torch.from_numpy(x).double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: module.run({"x": v})["y"], (t,))


def test_top_k_values_gradient():
    x = np.random.default_rng(0).permutation(12).reshape(3, 4).astype(np.float32)
    model = single_node_model(node("TopK", ["x", "k"], ["v", "i"], axis=1), {"x": x}, opset=11,
                              initializers={"k": i64([2])})
    module = OnnxModule(model).double()
    t = torch.from_numpy(x).double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: module.run({"x": v})["v"], (t,))
