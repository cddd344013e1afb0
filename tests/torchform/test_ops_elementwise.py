"""Elementwise operators: OnnxModule against onnxruntime on one-node models.

Shapes, dtypes, values and attributes are drawn by hypothesis; outputs must have the same
shape and dtype (float16 values come back as float32, the module's compute type), integer
and bool outputs must be equal, and float outputs close with NaN and inf in the same places.
"""

from __future__ import annotations

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from fcpts_onnx.errors import UnsupportedModelError
from fcpts_onnx.torchform import OnnxModule

from .harness import run_both, single_node_model

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

F32, F64, F16 = np.float32, np.float64, np.float16
FLOATS = (F32, F64, F16)
SIGNED = (np.int8, np.int16, np.int32, np.int64)
UNSIGNED = (np.uint8, np.uint16, np.uint32, np.uint64)
INTS = SIGNED + UNSIGNED
NAN, INF = float("nan"), float("inf")

TOL = {  # (rtol, atol) by the reference's dtype
    np.dtype(F32): (1e-5, 1e-6),
    np.dtype(F64): (1e-9, 1e-12),
    np.dtype(F16): (4e-3, 1e-3),  # onnxruntime rounds to float16, the module keeps float32
}


# ---------------------------------------------------------------------------------------
# running and comparing


def assert_match(reference: dict, ours: dict, rtol: float | None = None, atol: float | None = None) -> None:
    for name, ref in reference.items():
        got = ours[name]
        assert got.shape == ref.shape, f"{name}: shape {got.shape} != {ref.shape}"
        if ref.dtype == np.float16:
            # onnxruntime rounds to float16; compare the module's float32 value rounded the same way
            assert got.dtype == np.float32, f"{name}: dtype {got.dtype} for a float16 reference"
            with np.errstate(over="ignore"):
                got = got.astype(np.float16)
        else:
            assert got.dtype == ref.dtype, f"{name}: dtype {got.dtype} != {ref.dtype}"
        if ref.dtype.kind in "biu":
            np.testing.assert_array_equal(got, ref, err_msg=name)
            continue
        r, a = TOL[ref.dtype]
        np.testing.assert_allclose(got.astype(np.float64), ref.astype(np.float64), equal_nan=True,
                                   rtol=r if rtol is None else rtol, atol=a if atol is None else atol,
                                   err_msg=name)


def check(op: str, inputs: dict, *, opset: int, attrs: dict | None = None, constants: dict | None = None,
          rtol: float | None = None, atol: float | None = None, extra_nodes=(), node_inputs=None) -> dict:
    """Run ``op`` on ``inputs`` (name -> array, or None for an absent optional input) in both
    runtimes; ``constants`` become initializers. Returns onnxruntime's outputs."""
    feeds = {k: v for k, v in inputs.items() if v is not None}
    names = node_inputs or [k if v is not None else "" for k, v in inputs.items()]
    node = helper.make_node(op, [*names, *(constants or {})], ["out"], **(attrs or {}))
    model = single_node_model(node, feeds, opset=opset, initializers=constants, extra_nodes=extra_nodes)
    reference, ours = run_both(model, feeds)
    assert_match(reference, ours, rtol, atol)
    return reference


# ---------------------------------------------------------------------------------------
# strategies


def elements(dtype, lo: float = -10.0, hi: float = 10.0, specials: bool = False):
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return st.booleans()
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return st.integers(max(int(lo), int(info.min)), min(int(hi), int(info.max)))
    info = np.finfo(dtype)
    lo, hi = max(lo, float(info.min)), min(hi, float(info.max))
    lo_v, hi_v = dtype.type(lo), dtype.type(hi)
    if float(lo_v) < lo:  # bounds must be representable in the dtype: round them inward
        lo_v = np.nextafter(lo_v, dtype.type(INF))
    if float(hi_v) > hi:
        hi_v = np.nextafter(hi_v, dtype.type(-INF))
    values = st.floats(float(lo_v), float(hi_v), width=8 * dtype.itemsize)
    if specials:
        values = values | st.sampled_from([NAN, INF, -INF, 0.0, -0.0])
    return values


def arrays(dtype, shape, **kw):
    return hnp.arrays(np.dtype(dtype), shape, elements=elements(dtype, **kw))


SHAPES = hnp.array_shapes(min_dims=0, max_dims=4, min_side=1, max_side=4)


def broadcast_shapes(n: int = 2):
    return hnp.mutually_broadcastable_shapes(num_shapes=n, min_dims=0, max_dims=4, min_side=1, max_side=4)


def no_attrs():
    return st.just({})


# ---------------------------------------------------------------------------------------
# unary operators and activations

#  op, opsets, dtypes, value range, special values?, attribute strategy
UNARY = [
    ("Abs", (6, 13), FLOATS + INTS, (-100, 100), True, no_attrs()),
    ("Neg", (6, 13), FLOATS + SIGNED, (-100, 100), True, no_attrs()),
    ("Exp", (6, 13), FLOATS, (-20, 20), True, no_attrs()),
    ("Log", (6, 13), FLOATS, (-2, 50), True, no_attrs()),
    ("Sqrt", (6, 13), FLOATS, (-2, 50), True, no_attrs()),
    ("Reciprocal", (6, 13), FLOATS, (-5, 5), True, no_attrs()),
    ("Floor", (6, 13), FLOATS, (-10, 10), True, no_attrs()),
    ("Ceil", (6, 13), FLOATS, (-10, 10), True, no_attrs()),
    ("Round", (11, 22), FLOATS, (-10, 10), True, no_attrs()),
    ("Sign", (9, 13), FLOATS + INTS, (-100, 100), True, no_attrs()),
    ("Sin", (7, 22), (F32, F64, F16), (-10, 10), False, no_attrs()),
    ("Cos", (7, 22), (F32, F64, F16), (-10, 10), False, no_attrs()),
    ("Tan", (7,), (F32, F16), (-1.5, 1.5), False, no_attrs()),
    ("Asin", (7,), (F32, F16), (-1, 1), False, no_attrs()),
    ("Acos", (7,), (F32, F16), (-1, 1), False, no_attrs()),
    ("Atan", (7,), (F32, F16), (-10, 10), False, no_attrs()),
    ("Sinh", (9,), (F32, F16), (-5, 5), False, no_attrs()),
    ("Cosh", (9,), (F32, F16), (-5, 5), False, no_attrs()),
    ("Asinh", (9,), (F32, F16), (-10, 10), False, no_attrs()),
    ("Acosh", (9,), (F32, F16), (1, 10), False, no_attrs()),
    ("Atanh", (9,), (F32, F16), (-0.9, 0.9), False, no_attrs()),
    ("Tanh", (6, 13), FLOATS, (-10, 10), True, no_attrs()),
    ("Sigmoid", (6, 13), FLOATS, (-20, 20), True, no_attrs()),
    ("Relu", (6, 13, 14), FLOATS, (-10, 10), True, no_attrs()),
    ("Erf", (9, 13), (F32, F16), (-4, 4), True, no_attrs()),
    ("Not", (1,), (np.bool_,), (0, 1), False, no_attrs()),
    ("IsNaN", (9, 13, 20), FLOATS, (-10, 10), True, no_attrs()),
    ("IsInf", (10, 20), (F32, F64), (-10, 10), True,
     st.fixed_dictionaries({"detect_negative": st.integers(0, 1), "detect_positive": st.integers(0, 1)})),
    ("Softplus", (1, 22), (F32,), (-30, 30), True, no_attrs()),
    ("Softsign", (1, 22), (F32,), (-10, 10), True, no_attrs()),
    ("Elu", (6, 22), (F32, F16), (-10, 10), True,
     st.fixed_dictionaries({}, optional={"alpha": elements(F32, 0.1, 3.0)})),
    ("Selu", (6, 22), (F32, F16), (-10, 10), True,
     st.fixed_dictionaries({}, optional={"alpha": elements(F32, 0.1, 3.0),
                                         "gamma": elements(F32, 0.1, 3.0)})),
    ("Celu", (12,), (F32,), (-10, 10), True,
     st.fixed_dictionaries({}, optional={"alpha": elements(F32, 0.1, 3.0)})),
    ("LeakyRelu", (6, 16), (F32, F16), (-10, 10), True,
     st.fixed_dictionaries({}, optional={"alpha": elements(F32, -2.0, 2.0)})),
    ("ThresholdedRelu", (10, 22), (F32, F16), (-5, 5), True,
     st.fixed_dictionaries({}, optional={"alpha": elements(F32, -2.0, 2.0)})),
    ("HardSigmoid", (6, 22), (F32, F16), (-10, 10), True,
     st.fixed_dictionaries({}, optional={"alpha": elements(F32, -1.0, 1.0),
                                         "beta": elements(F32, -1.0, 1.0)})),
    ("HardSwish", (14, 22), (F32, F16), (-6, 6), True, no_attrs()),
    ("Mish", (18, 22), (F32, F64, F16), (-20, 20), True, no_attrs()),  # float64: opset 18 only
    ("Swish", (24,), (F32, F64, F16), (-20, 20), True,
     st.fixed_dictionaries({}, optional={"alpha": elements(F32, -2.0, 3.0)})),
    ("Gelu", (20,), (F32, F16), (-6, 6), True,
     st.fixed_dictionaries({}, optional={"approximate": st.sampled_from(["none", "tanh"])})),
    ("Shrink", (9,), (F32, F64) + INTS, (-10, 10), False,
     st.fixed_dictionaries({}, optional={"bias": elements(F32, 0.0, 2.0),
                                         "lambd": elements(F32, 0.0, 3.0)})),
    ("BitwiseNot", (18,), INTS, (-1000, 1000), False, no_attrs()),
]


@pytest.mark.parametrize("op, opsets, dtypes, bounds, specials, attrs", UNARY, ids=[u[0] for u in UNARY])
@FAST
@given(data=st.data())
def test_unary(op, opsets, dtypes, bounds, specials, attrs, data):
    dtype = data.draw(st.sampled_from(dtypes), label="dtype")
    opset = data.draw(st.sampled_from(opsets), label="opset")
    if op == "Mish" and opset == 22 and dtype == F64:
        opset = 18  # onnxruntime has no double Mish-22
    if op == "Sign" and dtype == F16:
        specials = False  # onnxruntime's float16 Sign maps NaN to 0; float32 (the module's type) keeps NaN
    attributes = data.draw(attrs, label="attrs")
    x = data.draw(arrays(dtype, SHAPES, lo=bounds[0], hi=bounds[1], specials=specials), label="x")
    check(op, {"x": x}, opset=opset, attrs=attributes)


@FAST
@given(data=st.data())
def test_relu_on_integers(data):
    dtype = data.draw(st.sampled_from([np.int8, np.int32]))
    check("Relu", {"x": data.draw(arrays(dtype, SHAPES, lo=-128, hi=127))}, opset=14)


@FAST
@given(data=st.data())
def test_prelu_broadcasts_the_slope(data):
    opset = data.draw(st.sampled_from([7, 9, 16]))
    dtype = data.draw(st.sampled_from([F32, F16] if opset < 16 else [F32, F64, np.int32, np.int64]))
    # slope: per-channel [C,1,1] (how exporters write it), a suffix of X's shape, or a scalar
    n, c, h, w = (data.draw(st.integers(1, 3)) for _ in range(4))
    x_shape = (n, c, h, w)
    slope_shape = data.draw(st.sampled_from([(c, 1, 1), (w,), (h, w), (1,), (), (1, c, 1, 1)]))
    x = data.draw(arrays(dtype, x_shape, lo=-10, hi=10))
    slope = data.draw(arrays(dtype, slope_shape, lo=-3, hi=3))
    as_constant = data.draw(st.booleans())
    if as_constant:
        check("PRelu", {"x": x}, constants={"slope": slope}, opset=opset)
    else:
        check("PRelu", {"x": x, "slope": slope}, opset=opset)


def test_prelu_slope_may_broadcast_x():
    # onnxruntime broadcasts both ways: X [3] with slope [2, 3] gives [2, 3]
    check("PRelu", {"x": np.array([-1.0, 0.5, -2.0], F32), "slope": np.array([[0.1, 0.2, 0.3], [1, 2, 3]], F32)},
          opset=16)


def test_shrink_computes_in_float32():
    # integer (and double) inputs go through float32 in onnxruntime and truncate back
    check("Shrink", {"x": np.array([16777219, -16777219, 5, -5, 1], np.int32)}, opset=9,
          attrs={"bias": 0.5, "lambd": 0.0})
    check("Shrink", {"x": np.array([0, 1, 2, 3, 255], np.uint8)}, opset=9, attrs={"bias": 1.7, "lambd": 0.5})
    check("Shrink", {"x": np.array([1.1, -1.1, 0.3], F64)}, opset=9)


def test_prelu_legacy_per_channel_slope():
    # opset 6 (before numpy broadcasting): a 1-D slope of size C is per channel.
    x = np.random.default_rng(0).standard_normal((2, 3, 2, 2)).astype(F32)
    slope = np.array([0.1, 0.2, 0.3], F32)
    model = single_node_model(helper.make_node("PRelu", ["x", "slope"], ["y"]), {"x": x}, opset=6,
                              initializers={"slope": slope})
    got = OnnxModule(model).run({"x": torch.from_numpy(x)})["y"].numpy()
    np.testing.assert_allclose(got, np.where(x < 0, x * slope.reshape(3, 1, 1), x))


# ---------------------------------------------------------------------------------------
# binary arithmetic


def _nonzero(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a[a == 0] = 1
    return a


@FAST
@given(data=st.data())
def test_arithmetic(data):
    op = data.draw(st.sampled_from(["Add", "Sub", "Mul", "Div"]))
    opset = data.draw(st.sampled_from([7, 13, 14]))
    dtypes = FLOATS + INTS if opset >= 14 else (F32, F64, F16, np.int32, np.int64, np.uint32, np.uint64)
    dtype = data.draw(st.sampled_from(dtypes), label="dtype")
    (sa, sb), _ = data.draw(broadcast_shapes(), label="shapes")
    small = np.dtype(dtype).kind in "iu" and np.dtype(dtype).itemsize <= 2  # full range: wraps like C
    lo, hi = (-(2 ** 15), 2 ** 16) if small else (-(10 ** 4), 10 ** 4)
    a = data.draw(arrays(dtype, sa, lo=lo, hi=hi, specials=True), label="a")
    b = data.draw(arrays(dtype, sb, lo=lo, hi=hi, specials=True), label="b")
    if op == "Div" and np.dtype(dtype).kind in "iu":
        b = _nonzero(b)  # integer division by zero is a crash in onnxruntime
    check(op, {"a": a, "b": b}, opset=opset)


def test_integer_division_truncates_toward_zero():
    a = np.array([7, -7, 7, -7, 0, -1, 1], np.int32)
    b = np.array([2, 2, -2, -2, 3, 2, -2], np.int32)
    ref = check("Div", {"a": a, "b": b}, opset=14)
    np.testing.assert_array_equal(ref["out"], [3, -3, -3, 3, 0, 0, 0])
    check("Div", {"a": a.astype(np.int64), "b": b.astype(np.int64)}, opset=14)
    check("Div", {"a": np.array([-128, 127, -7], np.int8), "b": np.array([-1, -1, 2], np.int8)}, opset=14)


@FAST
@given(data=st.data())
def test_mod(data):
    fmod = data.draw(st.integers(0, 1), label="fmod")
    dtype = data.draw(st.sampled_from(FLOATS + INTS), label="dtype")
    is_float = np.dtype(dtype).kind == "f"
    # Floor modulo on floats (fmod=0) only exists from opset 28 in onnxruntime.
    opset = 28 if is_float and not fmod else data.draw(st.sampled_from([10, 13]))
    (sa, sb), _ = data.draw(broadcast_shapes(), label="shapes")
    a = data.draw(arrays(dtype, sa, lo=-1000, hi=1000), label="a")
    b = data.draw(arrays(dtype, sb, lo=-50, hi=50), label="b")
    if not is_float:
        b = _nonzero(b)
    check("Mod", {"a": a, "b": b}, opset=opset, attrs={"fmod": fmod})


def test_mod_signs():
    a = np.array([7, -7, 7, -7, 6, -6], np.int32)
    b = np.array([3, 3, -3, -3, 3, -3], np.int32)
    np.testing.assert_array_equal(check("Mod", {"a": a, "b": b}, opset=13)["out"], [1, 2, -2, -1, 0, 0])
    np.testing.assert_array_equal(check("Mod", {"a": a, "b": b}, opset=13, attrs={"fmod": 1})["out"],
                                  [1, -1, 1, -1, 0, 0])
    af, bf = np.array([7.5, -7.5, 7.5, -7.5, 3.0, 1.0], F32), np.array([2, 2, -2, -2, 0, INF], F32)
    check("Mod", {"a": af, "b": bf}, opset=13, attrs={"fmod": 1})
    check("Mod", {"a": af, "b": bf}, opset=28)


POW_BASES = (F32, F64, F16, np.int32, np.int64)
POW_EXPONENTS = (F32, F64, F16, np.int32, np.int64)


@FAST
@given(data=st.data())
def test_pow(data):
    base = data.draw(st.sampled_from(POW_BASES), label="base dtype")
    exponent = data.draw(st.sampled_from(POW_EXPONENTS), label="exponent dtype")
    opset = data.draw(st.sampled_from([12, 13, 15]))
    (sa, sb), _ = data.draw(broadcast_shapes(), label="shapes")
    float_base = np.dtype(base).kind == "f"
    x = data.draw(arrays(base, sa, lo=-6, hi=6, specials=float_base), label="x")
    if np.dtype(exponent).kind == "f":
        # integer bases with fractional exponents: only non-negative bases have real results
        y = data.draw(arrays(exponent, sb, lo=-3, hi=3), label="y")
        if not float_base:
            x = np.asarray(np.abs(x))
    else:
        y = data.draw(arrays(exponent, sb, lo=-3 if float_base else 0, hi=4), label="y")
    check("Pow", {"x": x, "y": y}, opset=opset)


def test_pow_integer_base_matches_onnxruntime_special_cases():
    # A single exponent of 2 or 3 multiplies (wrapping); any other exponent goes through double.
    x = np.array([46341, 3, -5, 1291], np.int32)
    check("Pow", {"x": x, "y": np.array(2, np.int32)}, opset=15)
    check("Pow", {"x": x, "y": np.array([3], np.int64)}, opset=15)
    check("Pow", {"x": x, "y": np.array(2.0, F32)}, opset=15)
    check("Pow", {"x": x[1:], "y": np.array([4, 0, -1], np.int64)}, opset=15)
    check("Pow", {"x": np.array([2, 3, 10], np.int64), "y": np.array(0.5, F64)}, opset=15)
    check("Pow", {"x": np.array([3], np.int64), "y": np.array([39], np.int64)}, opset=15)
    check("Pow", {"x": np.array([46341], np.int32), "y": np.array(2, np.int64)}, opset=15)  # both single
    check("Pow", {"x": x, "y": np.array([[2]], np.int64)}, opset=15)  # output takes y's rank
    check("Pow", {"x": np.array([-2.0, 0.0, 2.0], F32), "y": np.array([0.5, -1.0, 2], F32)}, opset=15)


@pytest.mark.parametrize("e", [2.0, 3.0, 0.5, -1.5, 1.0])
@pytest.mark.parametrize("shape", [(), (1,), (1, 1, 1)])
def test_pow_single_float_exponent_takes_the_number_path(e, shape):
    # a one-element exponent runs as torch.pow(x, number): the values onnxruntime gives, the
    # output of y's rank where y's is larger, and the gradient of the general tensor pow
    x = np.array([[0.5, 1.0, 2.0], [3.0, 0.25, 4.0]], F32)
    y = np.full(shape, e, F32)
    check("Pow", {"x": x, "y": y}, opset=15)
    xt = torch.from_numpy(x).requires_grad_()
    module = OnnxModule(helper.make_model(helper.make_graph(
        [helper.make_node("Pow", ["x", "y"], ["z"])], "pow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(y, "y")]), opset_imports=[helper.make_opsetid("", 15)]))
    module.run({"x": xt})["z"].sum().backward()
    expected = torch.from_numpy(x).requires_grad_()
    torch.pow(expected, torch.from_numpy(y)).sum().backward()
    torch.testing.assert_close(xt.grad, expected.grad)


@FAST
@given(data=st.data())
def test_bitshift(data):
    dtype = data.draw(st.sampled_from(UNSIGNED), label="dtype")
    bits = 8 * np.dtype(dtype).itemsize
    (sa, sb), _ = data.draw(broadcast_shapes(), label="shapes")
    x = data.draw(arrays(dtype, sa, lo=0, hi=2 ** 62), label="x")
    y = data.draw(arrays(dtype, sb, lo=0, hi=bits - 1), label="y")
    direction = data.draw(st.sampled_from(["LEFT", "RIGHT"]), label="direction")
    check("BitShift", {"x": x, "y": y}, opset=11, attrs={"direction": direction})


@FAST
@given(data=st.data())
def test_bitwise(data):
    op = data.draw(st.sampled_from(["BitwiseAnd", "BitwiseOr", "BitwiseXor"]))
    dtype = data.draw(st.sampled_from(INTS), label="dtype")
    (sa, sb), _ = data.draw(broadcast_shapes(), label="shapes")
    a = data.draw(arrays(dtype, sa, lo=-(2 ** 62), hi=2 ** 62), label="a")
    b = data.draw(arrays(dtype, sb, lo=-(2 ** 62), hi=2 ** 62), label="b")
    check(op, {"a": a, "b": b}, opset=18)


def test_legacy_broadcast_attribute():
    # opset < 7: B broadcast onto A only with broadcast=1, aligned at `axis` (no onnxruntime kernel).
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 3, 4)).astype(F32)
    b = rng.standard_normal((3,)).astype(F32)
    for op, expected in (("Add", a + b.reshape(3, 1)), ("Mul", a * b.reshape(3, 1)), ("Sub", a - b.reshape(3, 1))):
        node = helper.make_node(op, ["a", "b"], ["y"], broadcast=1, axis=1)
        model = single_node_model(node, {"a": a}, opset=6, initializers={"b": b})
        got = OnnxModule(model).run({"a": torch.from_numpy(a)})["y"].numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-6)
    b4 = rng.standard_normal((4,)).astype(F32)
    node = helper.make_node("Div", ["a", "b"], ["y"], broadcast=1)  # no axis: suffix
    model = single_node_model(node, {"a": a}, opset=6, initializers={"b": b4})
    np.testing.assert_allclose(OnnxModule(model).run({"a": torch.from_numpy(a)})["y"].numpy(), a / b4, rtol=1e-6)


# ---------------------------------------------------------------------------------------
# variadic


@FAST
@given(data=st.data())
def test_variadic(data):
    op = data.draw(st.sampled_from(["Sum", "Mean", "Max", "Min"]))
    opset = data.draw(st.sampled_from([8, 13]))
    if op == "Mean":
        dtypes = (F32, F16)
    elif op == "Sum" or opset < 12:
        dtypes = FLOATS
    else:
        dtypes = FLOATS + (np.int8, np.int32, np.int64, np.uint8, np.uint32, np.uint64)
    dtype = data.draw(st.sampled_from(dtypes), label="dtype")
    n = data.draw(st.integers(1, 4), label="n")
    shapes, _ = data.draw(broadcast_shapes(n), label="shapes")
    inputs = {f"x{i}": data.draw(arrays(dtype, s, lo=-100, hi=100, specials=op in ("Max", "Min")), label=f"x{i}")
              for i, s in enumerate(shapes)}
    check(op, inputs, opset=opset)


def test_max_min_propagate_nan_and_mean_rounds_like_onnxruntime():
    a, b, c = np.array([NAN, 1, 2], F32), np.array([0, NAN, 1], F32), np.array([0, 0, NAN], F32)
    for op in ("Max", "Min"):
        ref = check(op, {"a": a, "b": b, "c": c}, opset=13)
        assert np.isnan(ref["out"]).all()
    # onnxruntime multiplies the sum by 1/n: (2 + 4 + 1) / 3 -> 2.3333335, not 2.3333333
    ref = check("Mean", {"a": np.array([2], F32), "b": np.array([4], F32), "c": np.array([1], F32)},
                opset=13, rtol=0, atol=0)
    assert ref["out"][0] == np.float32(7) * np.float32(1 / 3)


# ---------------------------------------------------------------------------------------
# comparison and logic


@FAST
@given(data=st.data())
def test_comparison(data):
    op = data.draw(st.sampled_from(["Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"]))
    opsets = {"Equal": [11, 13, 19], "Less": [9, 13], "Greater": [9, 13]}.get(op, [12, 16])
    opset = data.draw(st.sampled_from(opsets), label="opset")
    dtypes = FLOATS + INTS + ((np.bool_,) if op == "Equal" else ())
    dtype = data.draw(st.sampled_from(dtypes), label="dtype")
    (sa, sb), _ = data.draw(broadcast_shapes(), label="shapes")
    # few distinct values, so that ties happen
    if np.dtype(dtype).kind == "f":
        values = st.sampled_from([0.0, -0.0, 1.0, 2.5, -3.0, NAN, INF, -INF])
    else:
        values = elements(dtype, lo=-2, hi=2)
    a = data.draw(hnp.arrays(np.dtype(dtype), sa, elements=values), label="a")
    b = data.draw(hnp.arrays(np.dtype(dtype), sb, elements=values), label="b")
    check(op, {"a": a, "b": b}, opset=opset)


@FAST
@given(data=st.data())
def test_logic(data):
    op = data.draw(st.sampled_from(["And", "Or", "Xor"]))
    (sa, sb), _ = data.draw(broadcast_shapes(), label="shapes")
    check(op, {"a": data.draw(arrays(np.bool_, sa)), "b": data.draw(arrays(np.bool_, sb))}, opset=7)


@FAST
@given(data=st.data())
def test_where(data):
    opset = data.draw(st.sampled_from([9, 16]))
    dtypes = (F32, F64, F16, np.int8, np.int32, np.int64, np.uint8, np.uint32)
    dtype = data.draw(st.sampled_from(dtypes), label="dtype")
    (sc, sx, sy), _ = data.draw(broadcast_shapes(3), label="shapes")
    check("Where", {"c": data.draw(arrays(np.bool_, sc), label="c"),
                    "x": data.draw(arrays(dtype, sx, lo=-100, hi=100, specials=True), label="x"),
                    "y": data.draw(arrays(dtype, sy, lo=-100, hi=100, specials=True), label="y")}, opset=opset)


# ---------------------------------------------------------------------------------------
# Clip


@FAST
@given(data=st.data())
def test_clip_attributes(data):
    dtype = data.draw(st.sampled_from((F32, F16)), label="dtype")
    attrs = data.draw(st.fixed_dictionaries({}, optional={"min": elements(F32, -5, 0),
                                                           "max": elements(F32, 0, 5)}))
    x = data.draw(arrays(dtype, SHAPES, lo=-10, hi=10, specials=True), label="x")
    check("Clip", {"x": x}, opset=6, attrs=attrs)


@FAST
@given(data=st.data())
def test_clip_inputs(data):
    opset = data.draw(st.sampled_from([11, 12, 13]))
    dtypes = (F32, F16)
    if opset >= 12:
        dtypes += (F64, np.int8, np.int32, np.int64, np.uint8, np.uint32, np.uint64)
    dtype = data.draw(st.sampled_from(dtypes), label="dtype")
    # onnxruntime clips a float16 value with an absent bound at +-65504; the module, computing
    # float16 values in float32, at +-FLT_MAX: only infinities tell them apart
    x = data.draw(arrays(dtype, SHAPES, lo=-100, hi=100, specials=dtype != F16), label="x")
    lo = data.draw(st.none() | arrays(dtype, st.sampled_from([(), (1,)]), lo=-60, hi=60), label="min")
    hi = data.draw(st.none() | arrays(dtype, st.sampled_from([(), (1,)]), lo=-60, hi=60), label="max")
    if data.draw(st.booleans(), label="bounds as constants"):
        constants = {k: v for k, v in (("lo", lo), ("hi", hi)) if v is not None}
        names = ["x", "lo" if lo is not None else "", "hi" if hi is not None else ""]
        while names[-1] == "":
            names.pop()
        feeds = {"x": x}
        node = helper.make_node("Clip", names, ["out"])
        model = single_node_model(node, feeds, opset=opset, initializers=constants)
        reference, ours = run_both(model, feeds)
        assert_match(reference, ours)
    else:
        check("Clip", {"x": x, "lo": lo, "hi": hi}, opset=opset)


def test_clip_edge_cases():
    x = np.array([NAN, -5, 0, 5, INF, -INF], F32)
    lo, hi = np.array(-1, F32), np.array(1, F32)
    check("Clip", {"x": x, "lo": lo, "hi": hi}, opset=13)
    # absent min, present max; an absent bound is the dtype's extreme, so -inf becomes -FLT_MAX
    ref = check("Clip", {"x": x, "lo": None, "hi": hi}, opset=13)
    np.testing.assert_array_equal(ref["out"], [NAN, -5, 0, 1, 1, np.finfo(F32).min])
    ref = check("Clip", {"x": x, "lo": np.array(2, F32), "hi": hi}, opset=13)  # min > max: max
    np.testing.assert_array_equal(ref["out"][1:], [1, 1, 1, 1, 1])
    ref = check("Clip", {"x": x}, opset=13)
    np.testing.assert_array_equal(ref["out"][1:], [-5, 0, 5, np.finfo(F32).max, np.finfo(F32).min])
    check("Clip", {"x": x[1:4].astype(np.int64), "lo": None, "hi": np.array(1, np.int64)}, opset=13)
    check("Clip", {"x": x}, opset=6, attrs={"max": 0.5})


# ---------------------------------------------------------------------------------------
# Cast

CAST_TARGETS = FLOATS + INTS + (np.bool_,)
RANGE = {np.dtype(d): (np.iinfo(d).min, np.iinfo(d).max) for d in INTS}


@FAST
@given(data=st.data())
def test_cast(data):
    source = np.dtype(data.draw(st.sampled_from(CAST_TARGETS), label="from"))
    target = np.dtype(data.draw(st.sampled_from(CAST_TARGETS), label="to"))
    opset = data.draw(st.sampled_from([6, 9, 13, 19, 21]))
    # keep values representable in the target (out of range float -> int is undefined in C)
    lo, hi = -70000.0, 70000.0
    if target in RANGE:
        lo, hi = max(lo, RANGE[target][0]), min(hi, RANGE[target][1])
    x = data.draw(arrays(source, SHAPES, lo=lo, hi=hi, specials=target.kind in "fb" and source.kind == "f"), label="x")
    to = helper.np_dtype_to_tensor_dtype(target)
    check("Cast", {"x": x}, opset=opset, attrs={"to": to}, rtol=0, atol=0)
    like = np.zeros((1,), target)
    if opset >= 15:
        check("CastLike", {"x": x, "like": like}, opset=opset, rtol=0, atol=0)


@FAST
@given(x=arrays(F32, SHAPES, lo=-3.0e38, hi=3.0e38, specials=True))
def test_cast_rounds_to_bfloat16(x):
    # float -> bfloat16 -> float: the module keeps float32 values rounded to bfloat16.
    first = helper.make_node("Cast", ["x"], ["b"], to=TensorProto.BFLOAT16)
    check("Cast", {"x": x}, node_inputs=["b"], opset=13, attrs={"to": TensorProto.FLOAT},
          extra_nodes=[first], rtol=0, atol=0)


def test_cast_edge_values():
    to = lambda t: {"to": t}  # noqa: E731
    x = np.array([-1.7, 1.7, -0.5, 0.5, 126.9, -127.9], F32)
    ref = check("Cast", {"x": x}, opset=13, attrs=to(TensorProto.INT8))
    np.testing.assert_array_equal(ref["out"], [-1, 1, 0, 0, 126, -127])  # truncation toward zero
    ref = check("Cast", {"x": np.array([0.0, -0.0, NAN, 0.1, -INF], F32)}, opset=13, attrs=to(TensorProto.BOOL))
    np.testing.assert_array_equal(ref["out"], [False, False, True, True, True])
    # float -> float16 rounds to nearest even and overflows to inf
    check("Cast", {"x": np.array([1 + 2 ** -11, 1 + 3 * 2 ** -11, 65519, 65520, 1e6, NAN], F32)}, opset=13,
          attrs=to(TensorProto.FLOAT16), rtol=0, atol=0)
    # double -> float16 goes through float32 in onnxruntime (double rounding)
    check("Cast", {"x": np.array([1 + 2 ** -11 + 2 ** -40], F64)}, opset=13, attrs=to(TensorProto.FLOAT16),
          rtol=0, atol=0)
    check("Cast", {"x": np.array([2049, 2051, 70000], np.int64)}, opset=13, attrs=to(TensorProto.FLOAT16),
          rtol=0, atol=0)
    check("Cast", {"x": np.array([1.5, -2.5, 3e9, 1e19], F32)}, opset=13, attrs=to(TensorProto.UINT64))


def test_cast_to_unsupported_type_raises():
    node = helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT8E4M3FN)
    model = single_node_model(node, {"x": np.zeros(2, F32)}, opset=19)
    # (module.run may wrap the error to name the node)
    with pytest.raises((UnsupportedModelError, RuntimeError), match="FLOAT8E4M3FN"):
        OnnxModule(model).run({"x": torch.zeros(2)})


def test_cast_with_type_name_before_opset_6():
    node = helper.make_node("Cast", ["x"], ["y"], to="INT32")
    model = single_node_model(node, {"x": np.zeros(2, F32)}, opset=5)
    got = OnnxModule(model).run({"x": torch.tensor([1.7, -2.5])})["y"]
    assert got.dtype == torch.int32 and got.tolist() == [1, -2]


# ---------------------------------------------------------------------------------------
# edge shapes and values


@pytest.mark.parametrize("op", ["Add", "Mul", "Div", "Pow", "Max", "Equal", "Less"])
def test_empty_tensors(op):
    check(op, {"a": np.zeros((0, 3), F32), "b": np.ones((1, 3), F32)}, opset=15)


def test_special_values():
    x = np.array([NAN, INF, -INF, 0.0, -0.0, 1e-40, -1e-40, 0.5, 1.5, 2.5, -0.5, -2.5], F32)
    for op in ("Sign", "Round", "Abs", "Sqrt", "Log", "Reciprocal", "Exp", "Sigmoid", "Tanh", "Softplus",
               "Floor", "Ceil", "Relu", "IsNaN", "IsInf"):
        check(op, {"x": x}, opset=13 if op != "Softplus" else 1)
    ref = check("Round", {"x": x}, opset=11)
    np.testing.assert_array_equal(ref["out"][7:], [0.0, 2.0, 2.0, -0.0, -2.0])  # half to even
    assert np.isnan(check("Sign", {"x": x}, opset=13)["out"][0])


# ---------------------------------------------------------------------------------------
# gradients

GRAD_CASES = [
    ("Sigmoid", 13, {}), ("Tanh", 13, {}), ("Elu", 6, {"alpha": 0.5}), ("Selu", 6, {}), ("Celu", 12, {}),
    ("Softplus", 1, {}), ("Softsign", 1, {}), ("Mish", 18, {}), ("Gelu", 20, {}),
    ("Gelu", 20, {"approximate": "tanh"}), ("HardSwish", 14, {}), ("HardSigmoid", 6, {}),
    ("LeakyRelu", 16, {}), ("Relu", 14, {}), ("Exp", 13, {}), ("Erf", 13, {}), ("Sin", 7, {}),
    ("Abs", 13, {}), ("Neg", 13, {}), ("Cast", 13, {"to": TensorProto.DOUBLE}),
    ("Cast", 13, {"to": TensorProto.FLOAT16}), ("Cast", 13, {"to": TensorProto.BFLOAT16}),
    ("ThresholdedRelu", 10, {"alpha": 0.1}), ("Shrink", 9, {"lambd": 0.1, "bias": 0.05}),
]


def _input_grad(op: str, opset: int, attrs: dict, x: torch.Tensor, constants: dict | None = None) -> torch.Tensor:
    names = ["x", *(constants or {})]
    node = helper.make_node(op, names, ["y"], **attrs)
    model = single_node_model(node, {"x": x.detach().numpy()}, opset=opset, initializers=constants)
    x = x.clone().requires_grad_(True)
    y = OnnxModule(model).run({"x": x})["y"]
    y.sum().backward()
    return x.grad


@pytest.mark.parametrize("op, opset, attrs", GRAD_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(GRAD_CASES)])
def test_gradients_flow(op, opset, attrs):
    # includes large magnitudes and exact zeros, where a careless formula gives NaN gradients
    x = torch.tensor([-100.0, -3.0, -0.7, 0.0, 0.4, 2.5, 100.0])
    if op == "Exp":
        x = x[1:-1]
    grad = _input_grad(op, opset, attrs, x)
    assert grad is not None and torch.isfinite(grad).all(), grad
    assert (grad != 0).any(), grad


@pytest.mark.parametrize("op, constant", [
    ("Add", np.float32(2.0)), ("Sub", np.float32(2.0)), ("Mul", np.float32(3.0)), ("Div", np.float32(4.0)),
    ("Pow", np.float32(2.0)), ("Pow", np.int64(3)), ("Max", np.float32(0.1)), ("Min", np.float32(0.1)),
    ("PRelu", np.float32(0.25)), ("Sum", np.float32(1.0)), ("Mean", np.float32(1.0)),
    ("Mod", np.float32(1.5)),
])
def test_binary_gradients_flow(op, constant):
    x = torch.tensor([-2.0, -0.5, 0.3, 1.7, 3.0])
    attrs = {"fmod": 1} if op == "Mod" else {}
    grad = _input_grad(op, 15, attrs, x, constants={"c": np.array(constant)})
    assert grad is not None and torch.isfinite(grad).all() and (grad != 0).any(), grad


def test_clip_and_where_gradients_flow():
    x = torch.tensor([-2.0, -0.5, 0.3, 1.7, 3.0])
    grad = _input_grad("Clip", 13, {}, x, constants={"lo": np.array(-1, F32), "hi": np.array(1, F32)})
    assert torch.equal(grad, torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0]))
    grad = _input_grad("Clip", 6, {"min": 0.0}, x)
    assert torch.equal(grad, torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0]))
    cond = np.array([True, False, True, False, True])
    node = helper.make_node("Where", ["c", "x", "z"], ["y"])
    model = single_node_model(node, {"x": x.numpy()}, opset=16, initializers={"c": cond, "z": np.zeros(5, F32)})
    xg = x.clone().requires_grad_(True)
    OnnxModule(model).run({"x": xg})["y"].sum().backward()
    assert torch.equal(xg.grad, torch.tensor(cond, dtype=torch.float32))


@pytest.mark.parametrize("fmod, opset", [(0, 28), (1, 13)])
def test_mod_with_a_tiny_divisor(fmod, opset):
    """Found by hypothesis in CI: 5 mod 2**-126 is exactly 0; torch's float32 kernel gave NaN."""
    a = np.array(5.0, F32)
    b = np.full((4, 2, 2, 1), np.float32(1.1754944e-38), F32)
    out = check("Mod", {"a": a, "b": b}, opset=opset, attrs={"fmod": fmod})["out"]
    assert not np.isnan(out).any()
