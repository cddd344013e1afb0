"""nn operators of the trainable form against onnxruntime, property-based over shapes and attributes."""

from __future__ import annotations

import os
import re

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import helper

from fcpts_onnx.errors import UnsupportedModelError
from fcpts_onnx.torchform import OnnxModule

from .harness import check_node, single_node_model

ort.set_default_logger_severity(3)
# FCPTS_NN_EXAMPLES raises the example count for a deeper local search.
SETTINGS = settings(max_examples=int(os.environ.get("FCPTS_NN_EXAMPLES", "20")), deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOL = {"rtol": 1e-5, "atol": 1e-5}


def assert_refused(module: OnnxModule, feeds, match: str) -> None:
    """The run fails with the trainable form's clear refusal (possibly wrapped by the executor)."""
    with pytest.raises(Exception) as info:
        module.run(feeds)
    chain, err = [], info.value
    while err is not None:
        chain.append(err)
        err = err.__cause__
    refusals = [e for e in chain if isinstance(e, NotImplementedError) and isinstance(e, UnsupportedModelError)]
    assert refusals, f"not a refusal: {info.value!r}"
    assert re.search(match, str(refusals[0])), str(refusals[0])


def rand(seed: int, *shape: int, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


seeds = st.integers(0, 2**31 - 1)


# -- convolution ----------------------------------------------------------------------------


@SETTINGS
@given(data=st.data(), seed=seeds)
def test_conv(data, seed):
    nsp = data.draw(st.integers(1, 3), label="nsp")
    depthwise = data.draw(st.booleans(), label="depthwise")
    group = data.draw(st.integers(1, 3), label="group")
    cin_g = 1 if depthwise else data.draw(st.integers(1, 3))
    cout_g = data.draw(st.integers(1, 2))
    kernel = [data.draw(st.integers(1, 3)) for _ in range(nsp)]
    strides = [data.draw(st.integers(1, 3)) for _ in range(nsp)]
    pad_mode = data.draw(st.sampled_from(["explicit", "SAME_UPPER", "SAME_LOWER", "VALID", "none"]))
    # onnxruntime refuses dilations with auto_pad SAME_*.
    dilations = [1 if pad_mode.startswith("SAME") else data.draw(st.integers(1, 2)) for _ in range(nsp)]
    pads = [data.draw(st.integers(0, 2)) for _ in range(2 * nsp)]
    keff = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    low = [keff[i] - (pads[i] + pads[nsp + i] if pad_mode == "explicit" else 0) for i in range(nsp)]
    sizes = [data.draw(st.integers(max(1, lo), max(1, lo) + 4)) for lo in low]
    n = data.draw(st.integers(1, 2))
    x = rand(seed, n, cin_g * group, *sizes)
    w = rand(seed + 1, cout_g * group, cin_g, *kernel)
    b = rand(seed + 2, cout_g * group)
    attrs = {"strides": strides, "dilations": dilations, "group": group}
    if data.draw(st.booleans()):
        attrs["kernel_shape"] = kernel
    if pad_mode == "explicit":
        attrs["pads"] = pads
    elif pad_mode != "none":
        attrs["auto_pad"] = pad_mode
    with_bias = data.draw(st.booleans())
    node = helper.make_node("Conv", ["x", "w", "b"] if with_bias else ["x", "w"], ["y"], **attrs)
    inits = {"w": w, "b": b} if with_bias else {"w": w}
    check_node(node, {"x": x}, opset=data.draw(st.sampled_from([7, 11, 17])), initializers=inits, **TOL)


@SETTINGS
@given(data=st.data(), seed=seeds)
def test_conv_transpose(data, seed):
    nsp = data.draw(st.integers(1, 3), label="nsp")
    group = data.draw(st.integers(1, 2))
    cin_g, cout_g = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    kernel = [data.draw(st.integers(1, 3)) for _ in range(nsp)]
    strides = [data.draw(st.integers(1, 3)) for _ in range(nsp)]
    dilations = [data.draw(st.integers(1, 2)) for _ in range(nsp)]
    sizes = [data.draw(st.integers(1, 4)) for _ in range(nsp)]
    adj = [data.draw(st.integers(0, s - 1)) for s in strides]  # onnxruntime: output_padding < stride
    full = [(sizes[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 for i in range(nsp)]
    mode = data.draw(st.sampled_from(["pads", "output_shape", "SAME_UPPER", "SAME_LOWER", "VALID", "none"]))
    attrs = {"strides": strides, "dilations": dilations, "group": group}
    if data.draw(st.booleans()):
        attrs["output_padding"] = adj
    else:
        adj = [0] * nsp
    if mode == "pads":
        begins = [data.draw(st.integers(0, (full[i] + adj[i] - 1) // 2)) for i in range(nsp)]
        ends = [data.draw(st.integers(0, (full[i] + adj[i] - 1) // 2)) for i in range(nsp)]
        attrs["pads"] = begins + ends
    elif mode == "output_shape":
        attrs["output_shape"] = [data.draw(st.integers(max(1, full[i] + adj[i] - 3), full[i] + adj[i]))
                                 for i in range(nsp)]
    elif mode != "none":
        attrs["auto_pad"] = mode
    x = rand(seed, data.draw(st.integers(1, 2)), cin_g * group, *sizes)
    w = rand(seed + 1, cin_g * group, cout_g, *kernel)
    b = rand(seed + 2, cout_g * group)
    node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], **attrs)
    check_node(node, {"x": x}, opset=data.draw(st.sampled_from([11, 17])), initializers={"w": w, "b": b}, **TOL)


# -- pooling ----------------------------------------------------------------------------------


def _pool_case(data, *, dilations: bool, same_ok: bool = True):
    nsp = data.draw(st.integers(1, 3), label="nsp")
    kernel = [data.draw(st.integers(1, 3)) for _ in range(nsp)]
    strides = [data.draw(st.integers(1, 3)) for _ in range(nsp)]
    dil = [data.draw(st.integers(1, 2)) if dilations else 1 for _ in range(nsp)]
    modes = ["explicit", "none", "VALID"] + (["SAME_UPPER", "SAME_LOWER"] if same_ok else [])
    pad_mode = data.draw(st.sampled_from(modes), label="pad_mode")
    if pad_mode.startswith("SAME"):  # onnxruntime refuses the negative pads a stride > kernel gives
        strides = [min(s, k) for s, k in zip(strides, kernel)]
    pads = [data.draw(st.integers(0, k - 1)) for k in kernel] + [data.draw(st.integers(0, k - 1)) for k in kernel]
    keff = [(k - 1) * d + 1 for k, d in zip(kernel, dil)]
    sizes = [data.draw(st.integers(e, e + 5)) for e in keff]
    attrs = {"kernel_shape": kernel, "strides": strides}
    if dilations:
        attrs["dilations"] = dil
    if pad_mode == "explicit":
        attrs["pads"] = pads
    elif pad_mode != "none":
        attrs["auto_pad"] = pad_mode
    return nsp, sizes, attrs


@SETTINGS
@given(data=st.data(), seed=seeds)
def test_max_pool(data, seed):
    opset = data.draw(st.sampled_from([8, 10, 12, 22]), label="opset")
    nsp, sizes, attrs = _pool_case(data, dilations=opset >= 10)
    if opset >= 10:
        attrs["ceil_mode"] = data.draw(st.integers(0, 1))
    outputs = ["y"]
    if data.draw(st.booleans(), label="indices"):
        outputs.append("i")
        attrs["storage_order"] = data.draw(st.integers(0, 1))
    x = rand(seed, data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3)), *sizes)
    check_node(helper.make_node("MaxPool", ["x"], outputs, **attrs), {"x": x}, opset=opset, **TOL)


def test_max_pool_int8():
    x = np.random.default_rng(0).integers(-128, 127, (1, 2, 5, 5)).astype(np.int8)
    node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], pads=[1, 0, 0, 1], ceil_mode=1, strides=[2, 2])
    check_node(node, {"x": x}, opset=12)


@SETTINGS
@given(data=st.data(), seed=seeds)
def test_average_pool(data, seed):
    opset = data.draw(st.sampled_from([7, 10, 11, 19]), label="opset")
    nsp, sizes, attrs = _pool_case(data, dilations=opset >= 19)
    attrs["count_include_pad"] = data.draw(st.integers(0, 1))
    if opset >= 10:
        attrs["ceil_mode"] = data.draw(st.integers(0, 1))
    x = rand(seed, data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3)), *sizes)
    check_node(helper.make_node("AveragePool", ["x"], ["y"], **attrs), {"x": x}, opset=opset, **TOL)


@SETTINGS
@given(data=st.data(), seed=seeds)
def test_lp_pool(data, seed):
    opset = data.draw(st.sampled_from([11, 18]), label="opset")
    nsp, sizes, attrs = _pool_case(data, dilations=opset >= 18)
    attrs["p"] = data.draw(st.integers(1, 3))
    if opset >= 18:
        attrs["ceil_mode"] = data.draw(st.integers(0, 1))
    x = rand(seed, 1, 2, *sizes)
    check_node(helper.make_node("LpPool", ["x"], ["y"], **attrs), {"x": x}, opset=opset, **TOL)


@SETTINGS
@given(op=st.sampled_from(["GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"]),
       shape=st.lists(st.integers(1, 5), min_size=3, max_size=5), seed=seeds)
def test_global_pools(op, shape, seed):
    check_node(helper.make_node(op, ["x"], ["y"]), {"x": rand(seed, *shape)}, opset=17, **TOL)


# -- normalisation ----------------------------------------------------------------------------


@SETTINGS
@given(opset=st.sampled_from([7, 9, 14, 15]), shape=st.lists(st.integers(1, 4), min_size=2, max_size=5),
       eps=st.sampled_from([1e-5, 1e-3]), seed=seeds)
def test_batch_normalization(opset, shape, eps, seed):
    c = shape[1]
    inits = {"s": rand(seed + 1, c), "b": rand(seed + 2, c), "m": rand(seed + 3, c),
             "v": np.abs(rand(seed + 4, c)) + 0.1}
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], epsilon=eps)
    check_node(node, {"x": rand(seed, *shape)}, opset=opset, initializers=inits, **TOL)


def test_batch_normalization_non_spatial():
    """Opset 7-8 spatial=0: one statistic per (channel, position)."""
    inits = {"s": rand(1, 3, 4), "b": rand(2, 3, 4), "m": rand(3, 3, 4), "v": np.abs(rand(4, 3, 4)) + 0.1}
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], spatial=0)
    check_node(node, {"x": rand(0, 2, 3, 4)}, opset=7, initializers=inits, **TOL)


def test_batch_normalization_training_mode_refused():
    model = single_node_model(
        helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], training_mode=1),
        {"x": rand(0, 2, 3, 4)}, opset=15,
        initializers={k: np.ones(3, np.float32) for k in "sbmv"})
    assert_refused(OnnxModule(model), {"x": torch.zeros(2, 3, 4)}, "training_mode")


@SETTINGS
@given(shape=st.lists(st.integers(1, 5), min_size=3, max_size=5), seed=seeds)
def test_instance_normalization(shape, seed):
    c = shape[1]
    node = helper.make_node("InstanceNormalization", ["x", "s", "b"], ["y"], epsilon=1e-4)
    check_node(node, {"x": rand(seed, *shape)}, opset=6, initializers={"s": rand(1, c), "b": rand(2, c)}, **TOL)


def draw_normalized_shape(data) -> tuple[list[int], int, list[int]]:
    """A random input shape, a normalisation axis (maybe negative), and the normalised dims."""
    shape = data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=4))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    return shape, axis, shape[axis:]


@SETTINGS
@given(data=st.data(), seed=seeds)
def test_layer_normalization(data, seed):
    shape, axis, norm_shape = draw_normalized_shape(data)
    outputs = ["y", "mean" if data.draw(st.booleans()) else "", "inv" if data.draw(st.booleans()) else ""]
    while not outputs[-1]:
        outputs.pop()
    with_bias = data.draw(st.booleans())
    inits = {"s": rand(seed + 1, *norm_shape)}
    if with_bias:
        inits["b"] = rand(seed + 2, *norm_shape)
    node = helper.make_node("LayerNormalization", ["x", "s", "b"] if with_bias else ["x", "s"], outputs,
                            axis=axis, epsilon=data.draw(st.sampled_from([1e-5, 1e-3])))
    check_node(node, {"x": rand(seed, *shape)}, opset=17, initializers=inits, **TOL)


@SETTINGS
@given(data=st.data(), seed=seeds)
def test_group_normalization(data, seed):
    opset = data.draw(st.sampled_from([18, 21]))
    groups = data.draw(st.integers(1, 3))
    c = groups * data.draw(st.integers(1, 3))
    shape = [data.draw(st.integers(1, 2)), c, *data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=2))]
    k = groups if opset < 21 else c
    node = helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=groups, epsilon=1e-5)
    check_node(node, {"x": rand(seed, *shape)}, opset=opset,
               initializers={"s": rand(seed + 1, k), "b": rand(seed + 2, k)}, **TOL)


@SETTINGS
@given(data=st.data(), seed=seeds)
def test_lp_normalization(data, seed):
    shape = data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=4))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = rand(seed, *shape)
    if data.draw(st.booleans()):  # an all-zero slice along the axis normalises to zero
        np.moveaxis(x, axis, -1)[(0,) * (len(shape) - 1)] = 0  # a view: writes into x
    node = helper.make_node("LpNormalization", ["x"], ["y"], p=data.draw(st.sampled_from([1, 2])), axis=axis)
    check_node(node, {"x": x}, opset=data.draw(st.sampled_from([1, 22])), **TOL)


@SETTINGS
@given(data=st.data(), seed=seeds)
def test_mean_variance_normalization(data, seed):
    shape = data.draw(st.lists(st.integers(2, 4), min_size=4, max_size=4))
    axes = data.draw(st.lists(st.integers(0, 3), min_size=1, max_size=4, unique=True))
    node = helper.make_node("MeanVarianceNormalization", ["x"], ["y"], axes=sorted(axes))
    check_node(node, {"x": rand(seed, *shape)}, opset=data.draw(st.sampled_from([9, 13])), **TOL)


@SETTINGS
@given(size=st.sampled_from([1, 3, 5, 7]), c=st.integers(1, 7), seed=seeds,
       alpha=st.sampled_from([1e-4, 0.5]), beta=st.sampled_from([0.75, 1.0]), bias=st.sampled_from([1.0, 2.0]))
def test_lrn(size, c, seed, alpha, beta, bias):
    node = helper.make_node("LRN", ["x"], ["y"], size=size, alpha=alpha, beta=beta, bias=bias)
    check_node(node, {"x": rand(seed, 2, c, 3, 4)}, opset=13, **TOL)


@pytest.mark.parametrize("opset", [7, 10, 12, 13, 22])
@pytest.mark.parametrize("with_mask", [False, True])
def test_dropout_is_identity(opset, with_mask):
    node = helper.make_node("Dropout", ["x"], ["y", "mask"] if with_mask else ["y"])
    check_node(node, {"x": rand(0, 2, 3, 4)}, opset=opset)


def test_dropout_inputs_inference():
    node = helper.make_node("Dropout", ["x", "r", "t"], ["y", "mask"])
    check_node(node, {"x": rand(0, 2, 3)}, opset=13,
               initializers={"r": np.array(0.3, np.float32), "t": np.array(False)})


def test_dropout_training_refused():
    model = single_node_model(helper.make_node("Dropout", ["x", "r", "t"], ["y"]), {"x": rand(0, 2, 3)}, opset=13,
                              initializers={"r": np.array(0.3, np.float32), "t": np.array(True)})
    assert_refused(OnnxModule(model), {"x": torch.zeros(2, 3)}, "training_mode")


# -- softmax family ---------------------------------------------------------------------------


@SETTINGS
@given(data=st.data(), seed=seeds)
def test_softmax_family(data, seed):
    op = data.draw(st.sampled_from(["Softmax", "LogSoftmax", "Hardmax"]))
    opset = data.draw(st.sampled_from([1, 11, 13]))
    shape = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
    attrs = {}
    if data.draw(st.booleans()) or (opset < 13 and len(shape) < 2):
        attrs["axis"] = data.draw(st.integers(-len(shape), len(shape) - 1))
    check_node(helper.make_node(op, ["x"], ["y"], **attrs), {"x": rand(seed, *shape)}, opset=opset, **TOL)


# -- pad ------------------------------------------------------------------------------------------


@SETTINGS
@given(data=st.data(), seed=seeds)
def test_pad(data, seed):
    opset = data.draw(st.sampled_from([2, 11, 13, 18, 19, 21]), label="opset")
    modes = ["constant", "reflect", "edge"] + (["wrap"] if opset >= 19 else [])
    mode = data.draw(st.sampled_from(modes), label="mode")
    shape = data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=4), label="shape")
    r = len(shape)
    axes = list(range(r))
    if opset >= 18 and data.draw(st.booleans(), label="use_axes"):
        axes = data.draw(st.lists(st.integers(-r, r - 1), min_size=1, max_size=r,
                                  unique_by=lambda a: a % r), label="axes")
    pads_b, pads_e = [], []
    for a in axes:
        n = shape[a]
        if mode == "reflect":
            lo, hi = (0, n - 1) if n > 1 else (0, 0)
        elif mode == "constant":
            lo, hi = -(n // 2), 3
        elif mode == "wrap":
            lo, hi = -(n // 2), n
        else:
            lo, hi = 0, 3
        b = data.draw(st.integers(lo, hi))
        e = data.draw(st.integers(lo, hi))
        if b + e <= -n:
            b = e = 0
        pads_b.append(b)
        pads_e.append(e)
    pads = pads_b + pads_e
    dtype = data.draw(st.sampled_from([np.float32, np.int64] if opset >= 11 else [np.float32]), label="dtype")
    x = rand(seed, *shape) if dtype == np.float32 else np.random.default_rng(seed).integers(-9, 9, shape)
    value = data.draw(st.sampled_from([0.0, 1.5, -2.0]))
    if dtype == np.int64:
        value = float(int(value))
    if opset < 11:
        node = helper.make_node("Pad", ["x"], ["y"], mode=mode, pads=pads, value=value)
        check_node(node, {"x": x}, opset=opset, **TOL)
        return
    inits = {"pads": np.array(pads, np.int64)}
    inputs = ["x", "pads"]
    if mode == "constant" or data.draw(st.booleans()):
        inits["cv"] = np.array(value, dtype=x.dtype)
        inputs.append("cv")
    if axes != list(range(r)):
        inits["axes"] = np.array(axes, np.int64)
        if len(inputs) == 2:
            inputs.append("")
        inputs.append("axes")
    check_node(helper.make_node("Pad", inputs, ["y"], mode=mode), {"x": x}, opset=opset, initializers=inits, **TOL)


# -- resize ---------------------------------------------------------------------------------------

COORD_MODES = ["half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "tf_crop_and_resize"]
NEAREST_MODES = ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]
SCALES = [0.5, 0.6, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 1.0 / 3.0, 0.3]


@SETTINGS
@given(data=st.data(), seed=seeds)
def test_resize(data, seed):
    opset = data.draw(st.sampled_from([11, 13, 18, 19]), label="opset")
    mode = data.draw(st.sampled_from(["nearest", "linear", "cubic"]), label="mode")
    coords = COORD_MODES + (["half_pixel_symmetric"] if opset >= 19 else [])
    coord = data.draw(st.sampled_from(coords), label="coord")
    # onnxruntime: linear is bi/trilinear (outer two scales 1), cubic is bicubic on 2-D/4-D.
    if mode == "nearest":
        r = data.draw(st.integers(1, 5), label="rank")
        resized = list(range(r))
    elif mode == "linear":
        r = data.draw(st.sampled_from([2, 3, 4, 5]), label="rank")
        resized = list(range(r)) if r <= 3 else list(range(2, r))
    else:
        r = data.draw(st.sampled_from([2, 4]), label="rank")
        resized = list(range(r)) if r == 2 else [2, 3]
    shape = [data.draw(st.integers(1, 3)) if i not in resized else data.draw(st.integers(1, 6)) for i in range(r)]
    attrs = {"mode": mode, "coordinate_transformation_mode": coord}
    if mode == "nearest":
        attrs["nearest_mode"] = data.draw(st.sampled_from(NEAREST_MODES), label="nearest_mode")
    if mode == "cubic":
        attrs["cubic_coeff_a"] = data.draw(st.sampled_from([-0.75, -0.5]))
        attrs["exclude_outside"] = data.draw(st.integers(0, 1))
    use_sizes = data.draw(st.booleans(), label="sizes")
    axes = list(range(r))
    if opset >= 18 and data.draw(st.booleans(), label="axes"):
        axes = sorted(resized)
        attrs["axes"] = axes
    inits = {}
    if use_sizes:
        sizes = [data.draw(st.integers(1, 9)) if a in resized else shape[a] for a in axes]
        inits["sizes"] = np.array(sizes, np.int64)
        # The policy rescales every listed axis: only nearest may then touch N and C.
        if opset >= 18 and (mode == "nearest" or axes == resized) and data.draw(st.booleans()):
            attrs["keep_aspect_ratio_policy"] = data.draw(st.sampled_from(["not_larger", "not_smaller"]))
    else:
        scales = [data.draw(st.sampled_from(SCALES)) if a in resized else 1.0 for a in axes]
        inits["scales"] = np.array(scales, np.float32)
    if coord == "tf_crop_and_resize":
        starts = [data.draw(st.sampled_from([0.0, 0.1, 0.25, -0.2])) for _ in axes]
        ends = [data.draw(st.sampled_from([1.0, 0.8, 0.6, 1.2])) for _ in axes]
        inits["roi"] = np.array(starts + ends, np.float32)
        attrs["extrapolation_value"] = data.draw(st.sampled_from([0.0, -7.0]))
    inputs = ["x", "roi" if "roi" in inits else "", "scales" if "scales" in inits else ""]
    if use_sizes:
        inputs.append("sizes")
    if opset < 13:
        if "roi" not in inits:
            inits["roi"] = np.zeros(0, np.float32)
            inputs[1] = "roi"
        if "scales" not in inits:
            inits["scales"] = np.zeros(0, np.float32)
            inputs[2] = "scales"
    x = rand(seed, *shape)
    check_node(helper.make_node("Resize", inputs, ["y"], **attrs), {"x": x}, opset=opset, initializers=inits, **TOL)


@SETTINGS
@given(data=st.data())
def test_resize_nearest_ties(data):
    """Long axes: float32 coordinates land within 1e-6 of .5, which onnxruntime rounds as ties."""
    coord = data.draw(st.sampled_from(COORD_MODES + ["half_pixel_symmetric"]), label="coord")
    n_in, n_out = data.draw(st.integers(1, 40), label="n_in"), data.draw(st.integers(1, 40), label="n_out")
    attrs = {"mode": "nearest", "coordinate_transformation_mode": coord,
             "nearest_mode": data.draw(st.sampled_from(NEAREST_MODES), label="nearest_mode")}
    inits = {"roi": np.array([0, data.draw(st.sampled_from([0.0, 0.1, -0.2])), 1,
                              data.draw(st.sampled_from([1.0, 0.9, 1.2]))], np.float32)}
    if data.draw(st.booleans(), label="sizes"):
        inits["scales"] = np.zeros(0, np.float32)
        inits["sizes"] = np.array([1, n_out], np.int64)
        inputs = ["x", "roi", "scales", "sizes"]
    else:
        inits["scales"] = np.array([1, n_out / n_in], np.float32)
        inputs = ["x", "roi", "scales"]
    x = np.arange(n_in, dtype=np.float32).reshape(1, n_in)
    check_node(helper.make_node("Resize", inputs, ["y"], **attrs), {"x": x}, opset=19, initializers=inits)


@SETTINGS
@given(data=st.data(), seed=seeds)
def test_resize_legacy(data, seed):
    """Resize-10 and Upsample-7/9: asymmetric coordinates, nearest rounds down (up when shrinking)."""
    op, opset = data.draw(st.sampled_from([("Resize", 10), ("Upsample", 7), ("Upsample", 9)]))
    mode = data.draw(st.sampled_from(["nearest", "linear"]))
    r = 4 if mode == "linear" else data.draw(st.integers(1, 4))
    shape = [data.draw(st.integers(1, 5)) for _ in range(r)]
    pool = SCALES if op == "Resize" else [s for s in SCALES if s >= 1]
    scales = [data.draw(st.sampled_from(pool)) if (mode == "nearest" or i >= 2) else 1.0 for i in range(r)]
    x = rand(seed, *shape)
    if op == "Upsample" and opset == 7:
        node = helper.make_node("Upsample", ["x"], ["y"], mode=mode, scales=scales)
        check_node(node, {"x": x}, opset=opset, **TOL)
    else:
        node = helper.make_node(op, ["x", "scales"], ["y"], mode=mode)
        check_node(node, {"x": x}, opset=opset, initializers={"scales": np.array(scales, np.float32)}, **TOL)


def test_resize_nearest_integer_data():
    x = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(1, 2, 3, 4)
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="nearest")
    check_node(node, {"x": x}, opset=13, initializers={"scales": np.array([1, 1, 1.7, 0.6], np.float32)})


@SETTINGS
@given(data=st.data(), seed=seeds)
def test_resize_antialias(data, seed):
    """Opset 18+ antialias: onnxruntime's Pillow-style filter on the bi/trilinear and bicubic axes."""
    opset = data.draw(st.sampled_from([18, 19]), label="opset")
    mode = data.draw(st.sampled_from(["linear", "cubic"]), label="mode")
    coord = data.draw(st.sampled_from(COORD_MODES + (["half_pixel_symmetric"] if opset >= 19 else [])), label="coord")
    r = data.draw(st.sampled_from([2, 3, 4, 5] if mode == "linear" else [2, 4]), label="rank")
    nhwc = r == 4 and data.draw(st.booleans(), label="nhwc")
    resized = list(range(r)) if r <= 3 else ([1, 2] if nhwc else list(range(2, r)))
    shape = [data.draw(st.integers(1, 8)) if i in resized else data.draw(st.integers(1, 2)) for i in range(r)]
    attrs = {"mode": mode, "coordinate_transformation_mode": coord, "antialias": 1,
             "exclude_outside": data.draw(st.integers(0, 1))}
    if mode == "cubic":
        attrs["cubic_coeff_a"] = data.draw(st.sampled_from([-0.75, -0.5]))
    inits = {}
    if data.draw(st.booleans(), label="sizes"):
        inits["sizes"] = np.array([data.draw(st.integers(1, 9)) if a in resized else shape[a] for a in range(r)],
                                  np.int64)
    else:
        inits["scales"] = np.array([data.draw(st.sampled_from(SCALES)) if a in resized else 1.0 for a in range(r)],
                                   np.float32)
    if coord == "tf_crop_and_resize":
        assume(not nhwc)  # refused: onnxruntime's NHWC kernel misplaces the extrapolated outputs
        inits["roi"] = np.array([data.draw(st.sampled_from([0.0, 0.2, -0.1])) for _ in range(r)]
                                + [data.draw(st.sampled_from([1.0, 0.7, 1.1])) for _ in range(r)], np.float32)
        attrs["extrapolation_value"] = -3.0
    inputs = ["x", "roi" if "roi" in inits else "", "scales" if "scales" in inits else ""]
    if "sizes" in inits:
        inputs.append("sizes")
    check_node(helper.make_node("Resize", inputs, ["y"], **attrs), {"x": rand(seed, *shape)}, opset=opset,
               initializers=inits, **TOL)


def test_resize_antialias_nhwc_crop_refused():
    model = single_node_model(
        helper.make_node("Resize", ["x", "roi", "scales"], ["y"], mode="linear", antialias=1,
                         coordinate_transformation_mode="tf_crop_and_resize"),
        {"x": rand(0, 1, 4, 4, 2)}, opset=18,
        initializers={"roi": np.array([0, 0, 0, 0, 1, 1, 1, 1], np.float32),
                      "scales": np.array([1, 0.5, 0.5, 1], np.float32)})
    assert_refused(OnnxModule(model), {"x": torch.zeros(1, 4, 4, 2)}, "NHWC")


def test_resize_antialias_nearest_refused():
    model = single_node_model(
        helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="nearest", antialias=1),
        {"x": rand(0, 1, 1, 4, 4)}, opset=18, initializers={"scales": np.array([1, 1, 0.5, 0.5], np.float32)})
    assert_refused(OnnxModule(model), {"x": torch.zeros(1, 1, 4, 4)}, "antialias")


# -- depth <-> space --------------------------------------------------------------------------------


@SETTINGS
@given(data=st.data(), seed=seeds)
def test_depth_space(data, seed):
    bs = data.draw(st.integers(1, 3))
    n, h, w = (data.draw(st.integers(1, 3)) for _ in range(3))
    if data.draw(st.booleans()):
        c = data.draw(st.integers(1, 3)) * bs * bs
        opset = data.draw(st.sampled_from([1, 11, 13]))
        attrs = {"blocksize": bs}
        if opset >= 11:
            attrs["mode"] = data.draw(st.sampled_from(["DCR", "CRD"]))
        node = helper.make_node("DepthToSpace", ["x"], ["y"], **attrs)
        check_node(node, {"x": rand(seed, n, c, h, w)}, opset=opset)
    else:
        c = data.draw(st.integers(1, 3))
        node = helper.make_node("SpaceToDepth", ["x"], ["y"], blocksize=bs)
        check_node(node, {"x": rand(seed, n, c, h * bs, w * bs)}, opset=13)


# -- gradients ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("node, shape, inits", [
    (helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 0, 0, 2], strides=[2, 1]), (1, 2, 5, 5),
     {"w": rand(1, 3, 2, 3, 3)}),
    (helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2], output_padding=[1, 0], pads=[0, 1, 1, 0]),
     (1, 2, 3, 3), {"w": rand(1, 2, 3, 3, 3)}),
    (helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], pads=[1, 0, 2, 1], ceil_mode=1, strides=[2, 2]),
     (1, 2, 5, 6), {}),
    (helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], ceil_mode=1, strides=[2, 2]), (1, 2, 5, 5), {}),
    (helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="cubic"), (1, 1, 4, 5),
     {"scales": np.array([1, 1, 1.5, 0.5], np.float32)}),
    (helper.make_node("Pad", ["x", "pads"], ["y"], mode="reflect"), (2, 4), {"pads": np.array([0, 2, 1, 3], np.int64)}),
    (helper.make_node("LayerNormalization", ["x", "s"], ["y"]), (2, 3, 4), {"s": rand(3, 4)}),
])
def test_gradients_flow_to_float_inputs(node, shape, inits):
    model = single_node_model(node, {"x": rand(0, *shape)}, opset=18, initializers=inits)
    module = OnnxModule(model)
    x = torch.from_numpy(rand(0, *shape)).requires_grad_(True)
    y = module.run({"x": x})["y"]
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
