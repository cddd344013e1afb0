"""Shape and indexing operators against onnxruntime, property-based, at the opsets where the
specification changed (Squeeze/Unsqueeze 11 vs 13, Split 11/13/18, Slice 9/10/13...)."""

from __future__ import annotations

import io
import math

import numpy as np
import onnx
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from fcpts_onnx.torchform import OnnxModule

from .harness import check_node, run_both, single_node_model

SETTINGS = settings(max_examples=25, deadline=None)
INT64_MAX, INT64_MIN = 2**63 - 1, -(2**63)
INT32_MAX, INT32_MIN = 2**31 - 1, -(2**31)

seeds = st.integers(0, 2**31 - 1)
shapes = st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple)


def node(op: str, inputs, outputs=("y",), **attrs) -> onnx.NodeProto:
    return helper.make_node(op, list(inputs), list(outputs), **attrs)


def rand(shape, seed: int, dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(-20, 20, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def i64(values) -> np.ndarray:
    return np.array(values, dtype=np.int64)


@st.composite
def shape_axis(draw, min_rank=1, max_rank=4, max_dim=4):
    shape = tuple(draw(st.lists(st.integers(1, max_dim), min_size=min_rank, max_size=max_rank)))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    return shape, axis


# -- Shape, Size, Reshape, Flatten, Transpose --------------------------------------------

@SETTINGS
@given(shape=st.lists(st.integers(0, 4), min_size=0, max_size=4).map(tuple),
       start=st.none() | st.integers(-6, 6), end=st.none() | st.integers(-6, 6))
def test_shape_and_size(shape, start, end):
    x = rand(shape, 0)
    check_node(node("Shape", ["x"]), {"x": x}, opset=13)
    attrs = {k: v for k, v in (("start", start), ("end", end)) if v is not None}
    check_node(node("Shape", ["x"], **attrs), {"x": x}, opset=15)
    check_node(node("Size", ["x"]), {"x": x}, opset=13)


def test_shape_output_is_cpu_int64():
    model = single_node_model(node("Shape", ["x"]), {"x": rand((2, 3), 0)})
    out = OnnxModule(model).run({"x": torch.zeros(2, 3)})["y"]
    assert out.dtype == torch.int64 and out.device.type == "cpu" and out.tolist() == [2, 3]


@st.composite
def reshape_case(draw):
    shape = list(draw(st.lists(st.integers(1, 4), min_size=1, max_size=4)))
    dims = draw(st.permutations(shape))
    target = []
    for d in dims:  # merge some neighbours, keep others
        if target and draw(st.booleans()):
            target[-1] *= d
        else:
            target.append(d)
    for _ in range(draw(st.integers(0, 2))):
        target.insert(draw(st.integers(0, len(target))), 1)
    if draw(st.booleans()):
        target[draw(st.integers(0, len(target) - 1))] = -1
    for i in range(min(len(shape), len(target))):  # 0 copies the input dimension
        if target[i] == shape[i] and draw(st.booleans()):
            target[i] = 0
    return tuple(shape), target


@SETTINGS
@given(case=reshape_case(), seed=seeds, opset=st.sampled_from([5, 13, 14]))
def test_reshape(case, seed, opset):
    shape, target = case
    check_node(node("Reshape", ["x", "s"]), {"x": rand(shape, seed)}, opset=opset, initializers={"s": i64(target)})


def test_reshape_allowzero():
    x = np.zeros((0, 3), np.float32)
    check_node(node("Reshape", ["x", "s"], allowzero=1), {"x": x}, opset=14, initializers={"s": i64([3, 0])})
    check_node(node("Reshape", ["x", "s"], allowzero=0), {"x": x}, opset=14, initializers={"s": i64([-1, 0])})
    check_node(node("Reshape", ["x", "s"], allowzero=1), {"x": rand((2, 3), 0)}, opset=14,
               initializers={"s": i64([3, -1])})


@SETTINGS
@given(shape=st.lists(st.integers(1, 4), min_size=0, max_size=4).map(tuple), data=st.data(), seed=seeds)
def test_flatten(shape, data, seed):
    rank = len(shape)
    x = rand(shape, seed)
    check_node(node("Flatten", ["x"], axis=data.draw(st.integers(-rank, rank))), {"x": x}, opset=13)
    check_node(node("Flatten", ["x"], axis=data.draw(st.integers(0, rank))), {"x": x}, opset=9)
    if rank >= 1:  # the default axis is 1
        check_node(node("Flatten", ["x"]), {"x": x}, opset=9)


@SETTINGS
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=5).map(tuple), data=st.data(), seed=seeds)
def test_transpose(shape, data, seed):
    perm = data.draw(st.none() | st.permutations(range(len(shape))))
    attrs = {} if perm is None else {"perm": list(perm)}
    check_node(node("Transpose", ["x"], **attrs), {"x": rand(shape, seed)}, opset=13)


# -- Concat, Split, Slice ----------------------------------------------------------------

@SETTINGS
@given(case=shape_axis(), sizes=st.lists(st.integers(0, 3), min_size=1, max_size=4), seed=seeds,
       opset=st.sampled_from([4, 11, 13]))
def test_concat(case, sizes, seed, opset):
    shape, axis = case
    assume(any(sizes))
    if opset < 11:
        axis %= len(shape)
    inputs = {}
    for i, n in enumerate(sizes):
        s = list(shape)
        s[axis] = n
        inputs[f"x{i}"] = rand(s, seed + i)
    check_node(node("Concat", list(inputs), axis=axis), inputs, opset=opset)


def _composition(data, total: int, parts: int) -> list[int]:
    cuts = sorted(data.draw(st.lists(st.integers(0, total), min_size=parts - 1, max_size=parts - 1)))
    bounds = [0, *cuts, total]
    return [b - a for a, b in zip(bounds, bounds[1:])]


@SETTINGS
@given(case=shape_axis(max_dim=6), data=st.data(), seed=seeds, opset=st.sampled_from([11, 13, 18]))
def test_split(case, data, seed, opset):
    shape, axis = case
    dim = shape[axis]
    x = rand(shape, seed)
    how = data.draw(st.sampled_from(["sizes", "equal"]))
    if how == "sizes":
        sizes = _composition(data, dim, data.draw(st.integers(1, 4)))
        outs = [f"y{i}" for i in range(len(sizes))]
        if opset < 13:
            check_node(node("Split", ["x"], outs, axis=axis, split=sizes), {"x": x}, opset=opset)
        else:
            check_node(node("Split", ["x", "s"], outs, axis=axis), {"x": x}, opset=opset,
                       initializers={"s": i64(sizes)})
    elif opset < 18:  # as many equal parts as outputs; must divide
        n = data.draw(st.sampled_from([d for d in range(1, dim + 1) if dim % d == 0]))
        check_node(node("Split", ["x"], [f"y{i}" for i in range(n)], axis=axis), {"x": x}, opset=opset)
    else:  # num_outputs: ceil-sized chunks, the last one smaller
        n = data.draw(st.integers(1, dim))
        chunk = -(-dim // n)
        assume(dim - chunk * (n - 1) >= 0)
        check_node(node("Split", ["x"], [f"y{i}" for i in range(n)], axis=axis, num_outputs=n), {"x": x},
                   opset=opset)


def test_split_uneven_num_outputs():
    x = np.arange(10, dtype=np.float32).reshape(5, 2)
    ref = check_node(node("Split", ["x"], ["a", "b", "c"], num_outputs=3), {"x": x}, opset=18)
    assert [r.shape[0] for r in ref.values()] == [2, 2, 1]


SLICE_BOUNDS = st.one_of(
    st.integers(-8, 8),
    st.sampled_from([INT64_MAX, INT64_MIN, INT32_MAX, INT32_MIN, INT32_MAX + 1, -INT32_MAX, 1000, -1000]),
)


@st.composite
def slice_case(draw, negative_axes=True, steps=True):
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=4)))
    rank = len(shape)
    axes = list(draw(st.permutations(range(rank))))[: draw(st.integers(1, rank))]
    if negative_axes:
        axes = [a - rank if draw(st.booleans()) else a for a in axes]
    n = len(axes)
    starts = draw(st.lists(SLICE_BOUNDS, min_size=n, max_size=n))
    ends = draw(st.lists(SLICE_BOUNDS, min_size=n, max_size=n))
    step_values = st.sampled_from([1, 2, 3, -1, -2, -3, 7, -7, INT64_MAX, -INT64_MAX]) if steps else st.just(1)
    stepv = draw(st.lists(step_values, min_size=n, max_size=n))
    return shape, starts, ends, axes, stepv


@SETTINGS
@given(case=slice_case(), seed=seeds, give_axes=st.booleans(), give_steps=st.booleans(), int32=st.booleans())
def test_slice_13(case, seed, give_axes, give_steps, int32):
    shape, starts, ends, axes, steps = case
    if not give_axes:  # axes default to 0..n-1
        axes = list(range(len(starts)))
    if not give_steps:
        steps = [1] * len(starts)
    values = [*starts, *ends, *steps]
    dtype = np.int32 if int32 and all(INT32_MIN <= v <= INT32_MAX for v in values) else np.int64
    inits = {"s": np.array(starts, dtype), "e": np.array(ends, dtype)}
    names = ["x", "s", "e"]
    if give_axes or give_steps:
        inits["a"] = np.array(axes, dtype)
        names.append("a")
    if give_steps:
        inits["t"] = np.array(steps, dtype)
        names.append("t")
    check_node(node("Slice", names), {"x": rand(shape, seed)}, opset=13, initializers=inits)


@SETTINGS
@given(case=slice_case(negative_axes=False), seed=seeds)
def test_slice_10_inputs_fed_at_run_time(case, seed):
    shape, starts, ends, axes, steps = case
    feeds = {"x": rand(shape, seed), "s": i64(starts), "e": i64(ends), "a": i64(axes), "t": i64(steps)}
    check_node(node("Slice", ["x", "s", "e", "a", "t"]), feeds, opset=10)


@SETTINGS
@given(case=slice_case(negative_axes=False, steps=False), seed=seeds, give_axes=st.booleans())
def test_slice_9_attributes(case, seed, give_axes):
    shape, starts, ends, axes, _ = case
    attrs = {"starts": starts, "ends": ends}
    if give_axes:
        attrs["axes"] = axes
    check_node(node("Slice", ["x"], **attrs), {"x": rand(shape, seed)}, opset=9)


def test_slice_sentinels_and_empty():
    x = np.arange(5, dtype=np.float32)
    for end in (INT32_MAX, INT64_MAX, INT32_MAX + 1, -100, INT64_MIN):  # INT32_MAX means "to the end"
        check_node(node("Slice", ["x", "s", "e", "a", "t"]), {"x": x}, opset=13,
                   initializers={"s": i64([3]), "e": i64([end]), "a": i64([0]), "t": i64([-1])})
    check_node(node("Slice", ["x", "s", "e"]), {"x": np.zeros((0, 3), np.float32)}, opset=13,
               initializers={"s": i64([0, 1]), "e": i64([5, 3])})


# -- Squeeze, Unsqueeze ------------------------------------------------------------------

@st.composite
def squeeze_case(draw):
    shape = tuple(draw(st.lists(st.sampled_from([1, 1, 2, 3]), min_size=1, max_size=5)))
    ones = [i for i, d in enumerate(shape) if d == 1]
    rank = len(shape)
    if not ones or draw(st.booleans()):
        return shape, None
    axes = draw(st.lists(st.sampled_from(ones), min_size=1, unique=True))
    return shape, [a - rank if draw(st.booleans()) else a for a in axes]


@SETTINGS
@given(case=squeeze_case(), seed=seeds)
def test_squeeze(case, seed):
    shape, axes = case
    x = rand(shape, seed)
    check_node(node("Squeeze", ["x"], **({} if axes is None else {"axes": axes})), {"x": x}, opset=11)
    if axes is None:
        check_node(node("Squeeze", ["x"]), {"x": x}, opset=13)
    else:
        check_node(node("Squeeze", ["x", "a"]), {"x": x}, opset=13, initializers={"a": i64(axes)})


@SETTINGS
@given(shape=st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple), data=st.data(), seed=seeds)
def test_unsqueeze(shape, data, seed):
    k = data.draw(st.integers(1, 3))
    rank = len(shape) + k
    axes = data.draw(st.lists(st.integers(0, rank - 1), min_size=k, max_size=k, unique=True))
    axes = [a - rank if data.draw(st.booleans()) else a for a in axes]
    x = rand(shape, seed)
    check_node(node("Unsqueeze", ["x"], axes=axes), {"x": x}, opset=11)
    check_node(node("Unsqueeze", ["x", "a"]), {"x": x}, opset=13, initializers={"a": i64(axes)})


# -- Gather family, Scatter family -------------------------------------------------------

@SETTINGS
@given(case=shape_axis(), ishape=st.lists(st.integers(1, 3), max_size=2).map(tuple), seed=seeds,
       dtype=st.sampled_from([np.int64, np.int32]), opset=st.sampled_from([11, 13]))
def test_gather(case, ishape, seed, dtype, opset):
    shape, axis = case
    dim = shape[axis]
    idx = np.random.default_rng(seed).integers(-dim, dim, size=ishape).astype(dtype)
    check_node(node("Gather", ["x", "i"], axis=axis), {"x": rand(shape, seed)}, opset=opset,
               initializers={"i": idx})


@SETTINGS
@given(case=shape_axis(), data=st.data(), seed=seeds)
def test_gather_elements(case, data, seed):
    shape, axis = case
    ishape = [data.draw(st.integers(1, d)) for d in shape]
    ishape[axis] = data.draw(st.integers(1, 4))
    idx = np.random.default_rng(seed).integers(-shape[axis], shape[axis], size=ishape).astype(np.int64)
    check_node(node("GatherElements", ["x", "i"], axis=axis), {"x": rand(shape, seed)}, opset=13,
               initializers={"i": idx})


@st.composite
def gather_nd_case(draw):
    b = draw(st.integers(0, 2))
    shape = draw(st.lists(st.integers(1, 4), min_size=b + 1, max_size=b + 3))
    k = draw(st.integers(1, len(shape) - b))
    extra = draw(st.lists(st.integers(1, 3), max_size=2))
    rng = np.random.default_rng(draw(seeds))
    cols = [rng.integers(-shape[b + j], shape[b + j], size=(*shape[:b], *extra)) for j in range(k)]
    return tuple(shape), b, np.stack(cols, axis=-1).astype(np.int64)


@SETTINGS
@given(case=gather_nd_case(), seed=seeds)
def test_gather_nd(case, seed):
    shape, b, idx = case
    check_node(node("GatherND", ["x", "i"], batch_dims=b), {"x": rand(shape, seed)}, opset=13,
               initializers={"i": idx})
    if b == 0:
        check_node(node("GatherND", ["x", "i"]), {"x": rand(shape, seed)}, opset=11, initializers={"i": idx})


@st.composite
def scatter_nd_case(draw, unique: bool):
    shape = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    k = draw(st.integers(1, len(shape)))
    lead = shape[:k]
    n_pos = math.prod(lead)
    if unique:
        m = draw(st.integers(1, n_pos))
        flat = draw(st.permutations(range(n_pos)))[:m]
    else:
        flat = draw(st.lists(st.integers(0, n_pos - 1), min_size=1, max_size=6))
    idx = np.stack(np.unravel_index(np.array(flat, dtype=np.int64), lead), axis=-1)
    negate = np.array(draw(st.lists(st.booleans(), min_size=idx.size, max_size=idx.size))).reshape(idx.shape)
    idx = np.where(negate, idx - np.array(lead), idx).astype(np.int64)
    if draw(st.booleans()) and len(flat) % 2 == 0:  # a 2-D index list
        idx = idx.reshape(2, -1, k)
    return tuple(shape), idx


@SETTINGS
@given(case=scatter_nd_case(unique=True), seed=seeds)
def test_scatter_nd(case, seed):
    shape, idx = case
    k = idx.shape[-1]
    updates = rand((*idx.shape[:-1], *shape[k:]), seed + 1)
    check_node(node("ScatterND", ["x", "i", "u"]), {"x": rand(shape, seed)}, opset=13,
               initializers={"i": idx, "u": updates})


@SETTINGS
@given(case=scatter_nd_case(unique=False), seed=seeds, reduction=st.sampled_from(["add", "mul", "max", "min"]))
def test_scatter_nd_reduction(case, seed, reduction):
    shape, idx = case
    k = idx.shape[-1]
    updates = rand((*idx.shape[:-1], *shape[k:]), seed + 1)
    opset = 16 if reduction in ("add", "mul") else 18
    check_node(node("ScatterND", ["x", "i", "u"], reduction=reduction), {"x": rand(shape, seed)}, opset=opset,
               initializers={"i": idx, "u": updates})


@SETTINGS
@given(case=shape_axis(), data=st.data(), seed=seeds,
       reduction=st.sampled_from(["none", "add", "mul", "max", "min"]))
def test_scatter_elements(case, data, seed, reduction):
    shape, axis = case
    rng = np.random.default_rng(seed)
    ishape = [data.draw(st.integers(1, d)) for d in shape]
    dim = shape[axis]
    if reduction == "none":  # distinct targets along the axis
        ishape[axis] = data.draw(st.integers(1, dim))
        ax = axis % len(shape)
        order = np.argsort(rng.random((*ishape[:ax], dim, *ishape[ax + 1:])), axis=ax)
        idx = np.take(order, np.arange(ishape[ax]), axis=ax)
    else:
        ishape[axis] = data.draw(st.integers(1, 4))
        idx = rng.integers(0, dim, size=ishape)
    idx = np.where(rng.random(idx.shape) < 0.3, idx - dim, idx).astype(np.int64)
    attrs = {} if reduction == "none" else {"reduction": reduction}
    opset = 18 if reduction in ("max", "min") else 16
    inits = {"i": idx, "u": rand(ishape, seed + 1)}
    check_node(node("ScatterElements", ["x", "i", "u"], axis=axis, **attrs), {"x": rand(shape, seed)},
               opset=opset, initializers=inits)
    if reduction == "none":
        check_node(node("ScatterElements", ["x", "i", "u"], axis=axis), {"x": rand(shape, seed)}, opset=11,
                   initializers=inits)
        check_node(node("Scatter", ["x", "i", "u"], axis=axis), {"x": rand(shape, seed)}, opset=9,
                   initializers=inits)


# -- Expand, Tile, creation --------------------------------------------------------------

@st.composite
def expand_case(draw):
    base = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
    r_in = draw(st.integers(0, len(base)))
    r_out = draw(st.integers(0, len(base)))
    assume(max(r_in, r_out) == len(base))
    x_shape = [d if draw(st.booleans()) else 1 for d in base[len(base) - r_in:]]
    target = [d if draw(st.booleans()) else 1 for d in base[len(base) - r_out:]]
    # Where both sides hold 1 the result is 1; make sure the base is reached on one side.
    return tuple(x_shape), target


@SETTINGS
@given(case=expand_case(), seed=seeds)
def test_expand(case, seed):
    shape, target = case
    check_node(node("Expand", ["x", "s"]), {"x": rand(shape, seed)}, opset=13, initializers={"s": i64(target)})


@SETTINGS
@given(shape=shapes, data=st.data(), seed=seeds)
def test_tile(shape, data, seed):
    reps = data.draw(st.lists(st.integers(0, 3), min_size=len(shape), max_size=len(shape)))
    check_node(node("Tile", ["x", "r"]), {"x": rand(shape, seed)}, opset=13, initializers={"r": i64(reps)})


@SETTINGS
@given(shape=st.lists(st.integers(0, 3), max_size=3),
       value=st.sampled_from([None, (np.float32, 2.5), (np.int64, -7), (np.int32, 3), (np.bool_, True),
                              (np.float64, 0.1), (np.float16, 1.5)]))
def test_constant_of_shape(shape, value):
    attrs = {}
    if value is not None:
        dtype, v = value
        attrs["value"] = onnx.numpy_helper.from_array(np.array([v], dtype=dtype), "value")
    check_node(node("ConstantOfShape", ["s"], **attrs), {}, opset=13, initializers={"s": i64(shape)})
    check_node(node("ConstantOfShape", ["s"], **attrs), {"s": i64(shape)}, opset=9)


@SETTINGS
@given(kind=st.sampled_from([np.int64, np.int32, np.float32]), start=st.integers(-20, 20),
       length=st.integers(-3, 40), delta=st.sampled_from([1, 2, 3, -1, -2, 0.1, -0.3, 0.7]))
def test_range(kind, start, length, delta):
    if np.issubdtype(kind, np.integer):
        delta = int(round(delta)) or 1
    limit = start + length * delta
    feeds = {"s": np.array(start, kind), "l": np.array(limit, kind), "d": np.array(delta, kind)}
    check_node(node("Range", ["s", "l", "d"]), feeds, opset=11)


def test_range_float_accumulates_like_onnxruntime():
    feeds = {"s": np.array(0.1, np.float32), "l": np.array(30.0, np.float32), "d": np.array(0.1, np.float32)}
    check_node(node("Range", ["s", "l", "d"]), feeds, opset=11, rtol=0, atol=0)


def test_identity():
    check_node(node("Identity", ["x"]), {"x": rand((2, 3), 0)}, opset=13)
    check_node(node("Identity", ["x"]), {"x": rand((4,), 0, np.int64)}, opset=1)


# (indices, values, depth) dtypes onnxruntime has OneHot kernels for.
ONE_HOT_KINDS = [(np.int64, np.int64, np.int64), (np.int64, np.int32, np.float32), (np.int64, np.float32, np.int64),
                 (np.int32, np.float32, np.float32), (np.float32, np.int64, np.int64),
                 (np.float32, np.float32, np.float32)]


@SETTINGS
@given(ishape=st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple), depth=st.integers(1, 5),
       data=st.data(), seed=seeds, kinds=st.sampled_from(ONE_HOT_KINDS))
def test_one_hot(ishape, depth, data, seed, kinds):
    idx_kind, value_kind, depth_kind = kinds
    axis = data.draw(st.integers(-len(ishape) - 1, len(ishape)))
    idx = np.random.default_rng(seed).integers(-depth - 1, depth + 2, size=ishape).astype(idx_kind)
    inits = {"d": np.array(depth, depth_kind), "v": np.array([2, 5], value_kind)}
    check_node(node("OneHot", ["i", "d", "v"], axis=axis), {"i": idx}, opset=11, initializers=inits)


@SETTINGS
@given(shape=st.lists(st.integers(0, 4), max_size=3).map(tuple), seed=seeds,
       dtype=st.sampled_from([np.float32, np.int64, np.bool_]))
def test_non_zero(shape, seed, dtype):
    rng = np.random.default_rng(seed)
    x = np.asarray(rng.integers(0, 3, size=shape) * (rng.random(shape) < 0.5)).astype(dtype)
    check_node(node("NonZero", ["x"]), {"x": x}, opset=13)


@SETTINGS
@given(shape=st.lists(st.integers(1, 5), min_size=2, max_size=4).map(tuple), k=st.none() | st.integers(-6, 6),
       upper=st.sampled_from([None, 0, 1]), seed=seeds, dtype=st.sampled_from([np.float32, np.int64]))
def test_trilu(shape, k, upper, seed, dtype):
    attrs = {} if upper is None else {"upper": upper}
    if k is None:
        check_node(node("Trilu", ["x"], **attrs), {"x": rand(shape, seed, dtype)}, opset=14)
    else:
        check_node(node("Trilu", ["x", "k"], **attrs), {"x": rand(shape, seed, dtype)}, opset=14,
                   initializers={"k": np.array(k, np.int64)})


@SETTINGS
@given(n=st.integers(1, 5), m=st.integers(1, 5), k=st.integers(-6, 6),
       dtype=st.sampled_from([None, TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32, TensorProto.DOUBLE]),
       in_dtype=st.sampled_from([np.float32, np.int32]))
def test_eye_like(n, m, k, dtype, in_dtype):
    attrs = {"k": k} if dtype is None else {"k": k, "dtype": dtype}
    check_node(node("EyeLike", ["x"], **attrs), {"x": rand((n, m), 0, in_dtype)}, opset=9)


@SETTINGS
@given(shape=shapes, data=st.data(), seed=seeds)
def test_compress(shape, data, seed):
    x = rand(shape, seed)
    axis = data.draw(st.none() | st.integers(-len(shape), len(shape) - 1))
    length = x.size if axis is None else shape[axis]
    cond = np.array(data.draw(st.lists(st.booleans(), min_size=1, max_size=length)), dtype=bool)
    attrs = {} if axis is None else {"axis": axis}
    check_node(node("Compress", ["x", "c"], **attrs), {"x": x}, opset=11, initializers={"c": cond})


# -- shape data flow: x.view(x.size(0), -1) ----------------------------------------------

def _flatten_pattern(opset: int):
    if opset >= 13:
        unsqueeze = node("Unsqueeze", ["g", "zero_axes"], ["u"])
    else:
        unsqueeze = node("Unsqueeze", ["g"], ["u"], axes=[0])
    extra = [node("Shape", ["x"], ["s"]), node("Gather", ["s", "zero"], ["g"], axis=0), unsqueeze,
             node("Concat", ["u", "minus_one"], ["c"], axis=0)]
    inits = {"zero": np.array(0, np.int64), "minus_one": i64([-1]), "zero_axes": i64([0])}
    if opset < 13:
        del inits["zero_axes"]
    return node("Reshape", ["x", "c"]), extra, inits


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("shape", [(2, 3, 4), (1, 5), (3, 2, 1, 2)])
def test_flatten_pattern_shape_flow(opset, shape):
    reshape, extra, inits = _flatten_pattern(opset)
    ref = check_node(reshape, {"x": rand(shape, 0)}, opset=opset, initializers=inits, extra_nodes=extra)
    assert ref["y"].shape == (shape[0], math.prod(shape[1:]))


def test_flatten_pattern_gradient():
    reshape, extra, inits = _flatten_pattern(13)
    model = single_node_model(reshape, {"x": rand((2, 3, 4), 0)}, opset=13, initializers=inits, extra_nodes=extra)
    module = OnnxModule(model)
    x = torch.randn(2, 3, 4, requires_grad=True)
    weight = torch.randn(2, 12)
    (module.run({"x": x})["y"] * weight).sum().backward()
    torch.testing.assert_close(x.grad, weight.reshape(2, 3, 4))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter is deprecated
def test_flatten_pattern_exported_by_torch():
    class View(torch.nn.Module):
        def forward(self, x):
            return x.view(x.size(0), -1)

    buffer = io.BytesIO()
    try:
        torch.onnx.export(View(), (torch.randn(2, 3, 4),), buffer, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}}, opset_version=13, dynamo=False)
    except Exception as exc:  # pragma: no cover - depends on the installed exporter
        pytest.skip(f"torch.onnx.export (TorchScript) unavailable: {exc}")
    model = onnx.load_from_string(buffer.getvalue())
    ops = [n.op_type for n in model.graph.node]
    assert {"Shape", "Gather", "Unsqueeze", "Concat", "Reshape"} <= set(ops)
    for batch in (2, 5):
        feeds = {"x": rand((batch, 3, 4), batch)}
        reference, ours = run_both(model, feeds)
        np.testing.assert_array_equal(ours["y"], reference["y"])


# -- gradients ---------------------------------------------------------------------------

GRAD_CASES = [
    ("Gather", (3, 4), {"axis": 1}, {"i": i64([[0, -1], [2, 2]])}, 13),
    ("GatherElements", (3, 4), {"axis": 0}, {"i": i64([[0, 2, 1, -1]])}, 13),
    ("GatherND", (3, 4, 2), {"batch_dims": 1}, {"i": i64([[1], [0], [3]])}, 13),
    ("Slice", (5, 4), {}, {"s": i64([4, 0]), "e": i64([INT64_MIN, 4]), "a": i64([0, 1]), "t": i64([-2, 3])}, 13),
    ("Reshape", (2, 6), {}, {"s": i64([0, 3, -1])}, 14),
    ("Expand", (3, 1), {}, {"s": i64([2, 1, 4])}, 13),
    ("Tile", (2, 3), {}, {"r": i64([2, 2])}, 13),
    ("Transpose", (2, 3, 4), {"perm": [2, 0, 1]}, {}, 13),
    ("Squeeze", (3, 1, 2), {}, {"a": i64([1])}, 13),
    ("Unsqueeze", (3, 2), {}, {"a": i64([-1, 0])}, 13),
    ("Flatten", (2, 3, 4), {"axis": -1}, {}, 13),
    ("ScatterND", (4, 3), {"reduction": "add"}, {"i": i64([[1], [1], [3]]), "u": np.ones((3, 3), np.float32)}, 16),
    ("ScatterElements", (3, 3), {"axis": 1}, {"i": i64([[2], [0], [1]]), "u": np.ones((3, 1), np.float32)}, 13),
    ("Trilu", (3, 4), {"upper": 0}, {}, 14),
    ("Compress", (3, 4), {"axis": 1}, {"c": np.array([True, False, True])}, 11),
]


@pytest.mark.parametrize("op,shape,attrs,inits,opset", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_gradients_flow(op, shape, attrs, inits, opset):
    names = ["x", *inits]
    model = single_node_model(node(op, names, **attrs), {"x": rand(shape, 0)}, opset=opset, initializers=inits)
    module = OnnxModule(model).double()
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: module.run({"x": t})["y"], (x,))


def test_gradients_flow_through_concat_and_split():
    inputs = {"a": rand((2, 3), 0), "b": rand((2, 2), 1)}
    concat = node("Concat", ["a", "b"], ["c"], axis=-1)
    split = node("Split", ["c", "s"], ["y0", "y1"], axis=1)
    model = single_node_model(split, inputs, opset=13, initializers={"s": i64([4, 1])}, extra_nodes=[concat])
    module = OnnxModule(model).double()
    a = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, t: tuple(module.run({"a": s, "b": t}).values()), (a, b))


# -- devices -----------------------------------------------------------------------------

def test_created_data_goes_to_the_run_device():
    # ConstantOfShape/Range follow ctx.device (set by OnnxModule.run from its inputs), not the
    # CPU-resident shape tensor they are computed from. "meta" stands in for an accelerator.
    from fcpts_onnx.torchform.ops import shape as shape_ops
    from fcpts_onnx.torchform.registry import NodeContext

    ctx = NodeContext.of(node("ConstantOfShape", ["s"]), 13)
    ctx.device = torch.device("meta")
    out = shape_ops.constant_of_shape(ctx, torch.tensor([2, 3]))
    assert out.device.type == "meta" and tuple(out.shape) == (2, 3) and out.dtype == torch.float32
    ctx = NodeContext.of(node("Range", ["a", "b", "c"]), 13)
    ctx.device = torch.device("meta")
    for dtype in (torch.int64, torch.float32):
        out = shape_ops.range_(ctx, torch.tensor(0, dtype=dtype), torch.tensor(5, dtype=dtype),
                               torch.tensor(2, dtype=dtype))
        assert out.device.type == "meta" and tuple(out.shape) == (3,) and out.dtype == dtype


def test_run_sets_the_device_and_shapes_stay_on_cpu():
    model = single_node_model(node("ConstantOfShape", ["s"]), {"x": rand((2,), 0)}, opset=13,
                              extra_nodes=[node("Shape", ["x"], ["s"])])
    module = OnnxModule(model)
    out = module.run({"x": torch.zeros(2)})["y"]
    assert out.device.type == "cpu" and out.tolist() == [0.0, 0.0]
    assert all(step.ctx.device == torch.device("cpu") for step in module._steps)


@pytest.mark.parametrize("kind", [np.float32, np.float64])
@pytest.mark.parametrize("start, length, delta", [(1, 27, -0.3), (-20, 22, 0.7), (-20, 32, 0.7), (-19, 17, 0.7)])
def test_range_count_where_float_rounding_decides(kind, start, length, delta):
    """Found by hypothesis in CI: onnxruntime counts ceil((double(limit) - double(start)) / delta)."""
    limit = start + length * delta
    feeds = {"s": np.array(start, kind), "l": np.array(limit, kind), "d": np.array(delta, kind)}
    check_node(node("Range", ["s", "l", "d"]), feeds, opset=11)


@SETTINGS
@given(shape=shapes, data=st.data(), seed=seeds, dtype=st.sampled_from([np.float32, np.int64]))
def test_array_feature_extractor(shape, data, seed, dtype):
    # ai.onnx.ml: x[..., indices], indices flattened; a 1-D x gives [1, n] (skl2onnx's labels)
    x = rand(shape, seed) if dtype == np.float32 else np.arange(math.prod(shape), dtype=np.int64).reshape(shape)
    size = shape[-1]
    picks = data.draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=5))
    index_shape = data.draw(st.sampled_from([(len(picks),), (1, len(picks))]))
    indices = np.array(picks, np.int64).reshape(index_shape)
    check_node(helper.make_node("ArrayFeatureExtractor", ["x", "i"], ["y"], domain="ai.onnx.ml"), {"x": x},
               initializers={"i": indices})
