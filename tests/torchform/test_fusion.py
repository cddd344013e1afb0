"""Activation chains run as one kernel (torchform/fusion.py): the same values as onnxruntime,
the same gradients as the node-by-node plan, and no fusion where the graph could notice it."""

from __future__ import annotations

from collections import Counter

import hypothesis.extra.numpy as hnp
import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from fcpts_onnx.discovery import discover
from fcpts_onnx.torchform import OnnxModule

from .harness import assert_close, run_both


def _model(nodes, *, opset, constants, outputs=("y",), x_shape=(2, 3, 4, 5), extra_inputs=()):
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in constants.items()]
    inputs = [helper.make_tensor_value_info(n, helper.TensorProto.FLOAT, list(x_shape)) for n in ("x", *extra_inputs)]
    graph_outputs = [helper.make_tensor_value_info(o, helper.TensorProto.FLOAT, None) for o in outputs]
    graph = helper.make_graph(nodes, "chain", inputs, graph_outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    return model


def _relu6_plus_3(opset=13, order=("x", "three")):
    add = helper.make_node("Add", list(order), ["a"])
    if opset >= 11:
        clip = helper.make_node("Clip", ["a", "zero", "six"], ["r"])
    else:
        clip = helper.make_node("Clip", ["a"], ["r"], min=0.0, max=6.0)
    return [add, clip]


_SCALARS = {"three": 3.0, "zero": 0.0, "six": 6.0, "sixth": 1 / 6, "one": 1.0, "half": 0.5,
            "sqrt2": 2**0.5, "rsqrt2": 0.5**0.5, "cubic": 0.044715, "k": (2 / np.pi) ** 0.5}


def _tanh_part(cube, cubic_order=("cubic", "cu"), k_order=("k", "p"), one_order=("t", "one")):
    """1 + Tanh(k * (x + 0.044715 * x^3)) -> "h", the cube "cu" as Pow or Mul(x, Mul(x, x))."""
    nodes = ([helper.make_node("Pow", ["x", "three"], ["cu"])] if cube == "Pow" else
             [helper.make_node("Mul", ["x", "x"], ["sq"]), helper.make_node("Mul", ["x", "sq"], ["cu"])])
    return nodes + [helper.make_node("Mul", list(cubic_order), ["c"]), helper.make_node("Add", ["x", "c"], ["p"]),
                    helper.make_node("Mul", list(k_order), ["s"]), helper.make_node("Tanh", ["s"], ["t"]),
                    helper.make_node("Add", list(one_order), ["h"])]

# name -> (nodes, opset, kind): every spelling the matcher knows, each with a hidden value "r" or "h"
SPELLINGS = {
    "paddle2onnx: Div(Mul(x, relu6(x+3)), 6)": (
        [*_relu6_plus_3(12), helper.make_node("Mul", ["x", "r"], ["m"]), helper.make_node("Div", ["m", "six"], ["y"])],
        12, "hardswish"),
    "Mul(Mul(relu6(3+x), x), 1/6)": (
        [*_relu6_plus_3(13, ("three", "x")), helper.make_node("Mul", ["r", "x"], ["m"]),
         helper.make_node("Mul", ["sixth", "m"], ["y"])], 13, "hardswish"),
    "Mul(x, Div(relu6(x+3), 6))": (
        [*_relu6_plus_3(13), helper.make_node("Div", ["r", "six"], ["h"]), helper.make_node("Mul", ["x", "h"], ["y"])],
        13, "hardswish"),
    "Mul(Mul(relu6(x+3), 1/6), x)": (
        [*_relu6_plus_3(13), helper.make_node("Mul", ["r", "sixth"], ["h"]), helper.make_node("Mul", ["h", "x"], ["y"])],
        13, "hardswish"),
    "torch legacy: Mul(x, HardSigmoid(x, 1/6, 0.5))": (
        [helper.make_node("HardSigmoid", ["x"], ["h"], alpha=1 / 6, beta=0.5), helper.make_node("Mul", ["x", "h"], ["y"])],
        13, "hardswish"),
    "Clip with min/max attributes, opset 10": (
        [*_relu6_plus_3(10), helper.make_node("Mul", ["x", "r"], ["m"]), helper.make_node("Div", ["m", "six"], ["y"])],
        10, "hardswish"),
    "SiLU: Mul(Sigmoid(x), x)": (
        [helper.make_node("Sigmoid", ["x"], ["h"]), helper.make_node("Mul", ["h", "x"], ["y"])], 13, "silu"),
    "torch legacy GELU: Mul(Mul(x, Add(Erf(Div(x, sqrt 2)), 1)), 0.5)": (
        [helper.make_node("Div", ["x", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
         helper.make_node("Add", ["e", "one"], ["h"]), helper.make_node("Mul", ["x", "h"], ["m"]),
         helper.make_node("Mul", ["m", "half"], ["y"])], 13, "gelu"),
    "Mul(x, Mul(Add(1, Erf(Mul(x, 1/sqrt 2))), 0.5))": (
        [helper.make_node("Mul", ["rsqrt2", "x"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
         helper.make_node("Add", ["one", "e"], ["h"]), helper.make_node("Mul", ["half", "h"], ["m"]),
         helper.make_node("Mul", ["m", "x"], ["y"])], 13, "gelu"),
    "Mul(Mul(x, 0.5), Add(Erf(Div(x, sqrt 2)), 1))": (
        [helper.make_node("Mul", ["x", "half"], ["m"]), helper.make_node("Div", ["x", "sqrt2"], ["d"]),
         helper.make_node("Erf", ["d"], ["e"]), helper.make_node("Add", ["e", "one"], ["h"]),
         helper.make_node("Mul", ["h", "m"], ["y"])], 13, "gelu"),
    "torch legacy tanh GELU: Mul(0.5, Mul(x, 1 + tanh(k (x + a Mul(x, Mul(x, x))))))": (
        [*_tanh_part("Mul", one_order=("one", "t")), helper.make_node("Mul", ["x", "h"], ["m"]),
         helper.make_node("Mul", ["half", "m"], ["y"])], 13, "gelu_tanh"),
    "torch dynamo tanh GELU: Mul(x, Mul(0.5, 1 + tanh(k (x + a Pow(x, 3)))))": (
        [*_tanh_part("Pow"), helper.make_node("Mul", ["half", "h"], ["m"]), helper.make_node("Mul", ["x", "m"], ["y"])],
        18, "gelu_tanh"),
    "GPT-2 gelu_new: Mul(Mul(x, 0.5), 1 + tanh((x + Pow(x, 3) a) k))": (
        [helper.make_node("Mul", ["x", "half"], ["m"]), *_tanh_part("Pow", ("cu", "cubic"), ("p", "k")),
         helper.make_node("Mul", ["m", "h"], ["y"])], 14, "gelu_tanh"),
}


def _hidden(nodes) -> str:
    return "r" if any("r" in n.output for n in nodes) else "h"


# the activations' corners (0, +-3, +-6) and values anywhere around them
_values = st.one_of(st.sampled_from([-6.0, -3.0, 0.0, 3.0, 6.0]), st.floats(-9, 9, width=32))


@pytest.mark.parametrize("name", sorted(SPELLINGS))
@settings(max_examples=15, deadline=None)
@given(x=hnp.arrays(np.float32, (2, 3, 4, 5), elements=_values))
def test_every_spelling_is_fused_exact_and_has_the_chains_gradient(name, x):
    nodes, opset, kind = SPELLINGS[name]
    model = _model(nodes, opset=opset, constants=_SCALARS)
    module = OnnxModule(model)
    assert module.fusions == Counter({kind: 1})
    reference, ours = run_both(model, {"x": x})
    assert_close(reference, ours)
    # the node-by-node plan runs when a hidden value is asked for: the gradients must agree
    grads = []
    for keep in ((), (_hidden(nodes),)):
        xt = torch.from_numpy(x.copy()).requires_grad_()
        out = module.run({"x": xt}, keep=keep)
        assert set(keep) <= set(out)
        (torch.from_numpy(np.linspace(-1, 1, x.size, dtype=np.float32).reshape(x.shape)) * out["y"]).sum().backward()
        grads.append(xt.grad)
    # except at the kinks x = +-3 (within rounding of x/6 + 0.5), where the chain and torch's
    # kernel take the derivatives from opposite sides (next test)
    smooth = torch.from_numpy(~np.isclose(np.abs(x), 3.0, rtol=0, atol=1e-5))
    torch.testing.assert_close(grads[0][smooth], grads[1][smooth], rtol=1e-5, atol=1e-6)


def test_a_fused_chain_matches_its_nodes_at_the_corners():
    nodes, opset, _ = SPELLINGS["paddle2onnx: Div(Mul(x, relu6(x+3)), 6)"]
    module = OnnxModule(_model(nodes, opset=opset, constants=_SCALARS, x_shape=(7,)))
    x = torch.tensor([-6.0, -3.0, -1e-3, 0.0, 1e-3, 3.0, 6.0], requires_grad=True)
    module.run({"x": x})["y"].sum().backward()
    # d/dx of x * relu6(x + 3) / 6: 0 below -3, x/3 + 0.5 between, 1 above; at the kinks the
    # fused kernel takes the outer side's derivative (0 and 1) ...
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 0.0, 0.5 - 1e-3 / 3, 0.5, 0.5 + 1e-3 / 3, 1.0, 1.0]))
    # ... where the chain's Clip passes the gradient at both bounds (the inner side's)
    x.grad = None
    module.run({"x": x}, keep=["r"])["y"].sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([0.0, -0.5, 0.5 - 1e-3 / 3, 0.5, 0.5 + 1e-3 / 3, 1.5, 1.0]))


def _paddle_chain():
    return SPELLINGS["paddle2onnx: Div(Mul(x, relu6(x+3)), 6)"][0]


@pytest.mark.parametrize("case", ["inner value is a graph output", "inner value used elsewhere",
                                  "Add constant is not 3", "Clip bound is not 6", "gate of another tensor",
                                  "bound is a computed value"])
def test_chains_the_graph_could_notice_are_not_fused(case):
    nodes, constants, outputs, extra = list(_paddle_chain()), dict(_SCALARS), ["y"], ()
    if case == "inner value is a graph output":
        outputs = ["y", "r"]
    elif case == "inner value used elsewhere":
        nodes.append(helper.make_node("Neg", ["r"], ["n"]))
        outputs = ["y", "n"]
    elif case == "Add constant is not 3":
        constants["three"] = 2.5
    elif case == "Clip bound is not 6":
        constants["six"] = 6.5  # also the divisor: a valid-looking chain that is not hardswish
    elif case == "gate of another tensor":
        nodes = [helper.make_node("Sigmoid", ["z"], ["h"]), helper.make_node("Mul", ["x", "h"], ["y"])]
        extra = ("z",)
    elif case == "bound is a computed value":
        nodes = [helper.make_node("Identity", ["six"], ["six_copy"]), *nodes]
        nodes[2] = helper.make_node("Clip", ["a", "zero", "six_copy"], ["r"])
    model = _model(nodes, opset=13, constants=constants, outputs=outputs, extra_inputs=extra)
    module = OnnxModule(model)
    assert module.fusions == Counter()
    rng = np.random.default_rng(0)
    feeds = {n: rng.uniform(-8, 8, (2, 3, 4, 5)).astype(np.float32) for n in ("x", *extra)}
    reference, ours = run_both(model, feeds)
    assert_close(reference, ours)


def test_a_tuned_bias_is_never_folded_into_a_kernel():
    # Add(MatMul(x, W), b) makes b a tuned bias; b = 3 must stay a parameter the optimizer moves
    rng = np.random.default_rng(0)
    constants = {"W": rng.standard_normal((16, 8)).astype(np.float32), "b": np.full(1, 3.0, np.float32),
                 "zero": 0.0, "six": 6.0}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["x1"]), helper.make_node("Add", ["x1", "b"], ["a"]),
             helper.make_node("Clip", ["a", "zero", "six"], ["r"]), helper.make_node("Mul", ["x1", "r"], ["m"]),
             helper.make_node("Div", ["m", "six"], ["y"])]
    model = _model(nodes, opset=13, constants=constants, x_shape=(4, 16))
    module = OnnxModule(model, prunable=discover(model).weights)
    assert [s.role for s in module.sources.values()] == ["weight", "bias"]
    assert module.fusions == Counter()
    x = rng.standard_normal((4, 16)).astype(np.float32)
    reference, ours = run_both(model, {"x": x})
    assert_close(reference, ours)
    module.run({"x": torch.from_numpy(x)})["y"].sum().backward()
    bias = module.parameters_by_role("bias")
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in bias.values())


# -- LayerNorm as torch's exporter writes it below opset 17 --------------------------------


def _spelled_layer_norm(opset=13, *, square="Pow", affine=("g", "b"), axes=(-1,), var_axes=None, inverse="Div"):
    def mean(inp, out, ax):
        if ax == "gap":  # tf2onnx: a mean over every axis after the first two
            return helper.make_node("GlobalAveragePool", [inp], [out])
        if opset >= 18:
            return helper.make_node("ReduceMean", [inp, f"{out}_axes"], [out])
        return helper.make_node("ReduceMean", [inp], [out], axes=list(ax))

    nodes = [mean("x", "m", axes), helper.make_node("Sub", ["x", "m"], ["d"]),
             helper.make_node("Pow", ["d", "two"], ["p"]) if square == "Pow" else helper.make_node("Mul", ["d", "d"], ["p"]),
             mean("p", "v", var_axes or axes), helper.make_node("Add", ["v", "eps"], ["a"]),
             helper.make_node("Sqrt", ["a"], ["s"])]
    normed = "n" if affine else "y"
    if inverse == "Div":
        nodes.append(helper.make_node("Div", ["d", "s"], [normed]))
    elif inverse == "Reciprocal":  # Mul(d, Reciprocal(Sqrt(.)))
        nodes += [helper.make_node("Reciprocal", ["s"], ["r"]), helper.make_node("Mul", ["d", "r"], [normed])]
    else:  # Mul(Div(1, Sqrt(.)), d)
        nodes += [helper.make_node("Div", ["one", "s"], ["r"]), helper.make_node("Mul", ["r", "d"], [normed])]
    if "g" in affine:
        nodes.append(helper.make_node("Mul", ["n", "g"], ["h" if "b" in affine else "y"]))
    if "b" in affine:
        nodes.append(helper.make_node("Add", ["h", "b"], ["y"]))
    rng = np.random.default_rng(1)
    constants = {"two": 2.0, "eps": 1e-5, "g": rng.uniform(0.5, 1.5, 5), "b": rng.normal(size=5)}
    if inverse == "Div(1, .)":
        constants["one"] = 1.0
    if opset >= 18 and axes != "gap":
        constants["m_axes"] = np.array(axes, np.int64)
        constants["v_axes"] = np.array(var_axes or axes, np.int64)
    return nodes, {k: v for k, v in constants.items() if k not in ("g", "b") or k in affine}


def _assert_gradients_match_the_nodewise_plan(module, x, inner: str, atol: float) -> None:
    """Gradients of x and of every parameter, fused against the node-by-node plan (which runs
    when ``inner``, a value the fusion removes, is asked for)."""
    grads = []
    for keep in ((), (inner,)):
        module.zero_grad()
        xt = torch.from_numpy(x).requires_grad_()
        out = module.run({"x": xt}, keep=keep)
        (out["y"] * torch.linspace(-1, 1, out["y"].numel()).reshape(out["y"].shape)).sum().backward()
        grads.append([xt.grad, *(p.grad for p in module.parameters())])
    for fused, nodewise in zip(*grads):
        torch.testing.assert_close(fused, nodewise, rtol=1e-4, atol=atol)


def _model_with_ints(nodes, *, opset, constants, **kw):
    model = _model(nodes, opset=opset, constants={k: v for k, v in constants.items() if not k.endswith("_axes")}, **kw)
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in constants.items() if k.endswith("_axes"))
    return model


@pytest.mark.parametrize("opset,square,affine,axes,inverse", [
    (13, "Pow", ("g", "b"), (-1,), "Div"), (18, "Pow", ("g", "b"), (-1,), "Div"), (13, "Mul", ("g", "b"), (-1,), "Div"),
    (13, "Pow", (), (-1,), "Div"), (13, "Pow", ("g",), (-1,), "Div"), (13, "Pow", ("g", "b"), (-2, -1), "Div"),
    (13, "Pow", ("g", "b"), (-1,), "Reciprocal"), (18, "Mul", ("g",), (-1,), "Div(1, .)"),
    (13, "Pow", (), (-1,), "Reciprocal"),
    # positive axes (tf2onnx: Keras writes axis=-1 as the last axis), read against the rank when
    # the kernel runs; not the trailing ones: the same function, computed as the nodes do
    (13, "Mul", ("g", "b"), (3,), "Reciprocal"), (18, "Pow", ("g", "b"), (2, 3), "Div"),
    (13, "Pow", ("g", "b"), (1,), "Div"), (18, "Mul", ("g", "b"), (1, 3), "Reciprocal"),
    (13, "Mul", ("g", "b"), "gap", "Reciprocal"),
])
def test_a_spelled_out_layer_norm_is_one_kernel_with_its_scale_and_shift_tuned(opset, square, affine, axes, inverse):
    nodes, constants = _spelled_layer_norm(opset, square=square, affine=affine, axes=axes, inverse=inverse)
    if axes in ((-2, -1), (2, 3), "gap"):
        constants.update(g=np.ones((4, 5)) * 1.25, b=np.full((4, 5), -0.5))  # scale over both axes
    model = _model_with_ints(nodes, opset=opset, constants=constants)
    module = OnnxModule(model)
    assert module.fusions == Counter({"layer_norm": 1})
    # the scale and shift are normalisation parameters, tuned like LayerNormalization's
    assert sorted(s.name for s in module.sources.values() if s.role == "norm") == sorted(affine)
    x = np.random.default_rng(0).normal(2.0, 3.0, (2, 3, 4, 5)).astype(np.float32)
    reference, ours = run_both(model, {"x": x})
    assert_close(reference, ours, rtol=1e-5, atol=1e-5)
    _assert_gradients_match_the_nodewise_plan(module, x, "s", atol=1e-5)


@pytest.mark.parametrize("case", ["mixed-sign axes", "mean and variance over different axes", "eps computed"])
def test_layer_norms_it_cannot_prove_are_left_to_the_nodes(case):
    kw = {"axes": (-1, 2)} if case == "mixed-sign axes" else {}
    if case == "mean and variance over different axes":
        kw = {"axes": (-1,), "var_axes": (-2, -1)}
    nodes, constants = _spelled_layer_norm(13, **kw)
    if case == "eps computed":
        nodes = [helper.make_node("Abs", ["eps"], ["eps_abs"]), *nodes]
        nodes[5] = helper.make_node("Add", ["v", "eps_abs"], ["a"])
    model = _model_with_ints(nodes, opset=13, constants=constants)
    module = OnnxModule(model)
    if case == "mean and variance over different axes":
        # d / sqrt(mean(d^2 over -2, -1) + eps) * g with d = x - mean(x over -1) is an RMSNorm of
        # d over the last two axes, and fuses as one, g its scale; the shift stays a node
        assert module.fusions == Counter({"rms_norm": 1})
    else:
        assert module.fusions == Counter()
    # either way Mul(., g) then Add(., b), per channel, is an affine normalisation: both tuned
    assert sorted(s.name for s in module.sources.values() if s.role == "norm") == ["b", "g"]
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float32)
    reference, ours = run_both(model, {"x": x})
    assert_close(reference, ours, rtol=1e-5, atol=1e-5)


def _keras_layer_norm(offset="keras 3", *, mean=(2,), gamma=True, beta=True, opset=13):
    """Keras's LayerNormalization as tf2onnx writes it: moments, inv = rsqrt(var + eps) * gamma,
    ``x * inv + offset``. ``offset``: "keras 3" Add(Mul(Neg(mean), inv), beta) (or that Mul
    alone without beta), "batch_normalization" Sub(beta, Mul(mean, inv)) (tf.keras),
    "neg after" Neg(Mul(mean, inv)) without beta. ``mean``: positive axes, or "gap" (tf2onnx's
    GlobalAveragePool for a mean over a rank-3 tensor's last axis)."""
    def average(inp, out):
        if mean == "gap":
            return helper.make_node("GlobalAveragePool", [inp], [out])
        if opset >= 18:
            return helper.make_node("ReduceMean", [inp, "mean_axes"], [out])
        return helper.make_node("ReduceMean", [inp], [out], axes=list(mean))

    nodes = [average("x", "m"), helper.make_node("Sub", ["x", "m"], ["d"]), helper.make_node("Mul", ["d", "d"], ["dd"]),
             average("dd", "v"), helper.make_node("Add", ["v", "eps"], ["a"]), helper.make_node("Sqrt", ["a"], ["s"]),
             helper.make_node("Reciprocal", ["s"], ["r" if gamma else "inv"])]
    if gamma:
        nodes.append(helper.make_node("Mul", ["r", "g"], ["inv"]))
    nodes.append(helper.make_node("Mul", ["x", "inv"], ["xs"]))
    if offset == "keras 3":
        nodes += [helper.make_node("Neg", ["m"], ["nm"]), helper.make_node("Mul", ["nm", "inv"], ["mm" if beta else "off"])]
        if beta:
            nodes.append(helper.make_node("Add", ["mm", "b"], ["off"]))
    elif offset == "batch_normalization":
        nodes += [helper.make_node("Mul", ["m", "inv"], ["mm"]), helper.make_node("Sub", ["b", "mm"], ["off"])]
    else:
        nodes += [helper.make_node("Mul", ["inv", "m"], ["mm"]), helper.make_node("Neg", ["mm"], ["off"])]
    nodes.append(helper.make_node("Add", ["xs", "off"], ["y"]))
    channels = 8 if mean == "gap" else 5
    rng = np.random.default_rng(3)
    constants = {"eps": 1e-3, "g": rng.uniform(0.5, 1.5, (1, 1, channels) if mean == "gap" else channels),
                 "b": rng.normal(size=channels)}
    constants = {k: v for k, v in constants.items() if (k != "g" or gamma) and (k != "b" or beta)}
    if opset >= 18 and mean != "gap":
        constants["mean_axes"] = np.array(mean, np.int64)
    return nodes, constants


@pytest.mark.parametrize("offset,mean,gamma,beta,opset", [
    ("keras 3", "gap", True, True, 13), ("keras 3", (3,), True, True, 13), ("keras 3", (3,), True, True, 18),
    ("batch_normalization", "gap", True, True, 13), ("keras 3", "gap", True, False, 13),
    ("neg after", (3,), True, False, 18), ("keras 3", (2, 3), False, False, 13), ("keras 3", (1,), True, True, 13),
])
def test_keras_layer_norms_from_tf2onnx_are_one_kernel_with_gamma_and_beta_tuned(offset, mean, gamma, beta, opset):
    nodes, constants = _keras_layer_norm(offset, mean=mean, gamma=gamma, beta=beta, opset=opset)
    model = _model_with_ints(nodes, opset=opset, constants=constants, x_shape=(2, 6, 8) if mean == "gap" else (2, 3, 4, 5))
    module = OnnxModule(model)
    assert module.fusions == Counter({"layer_norm": 1})
    assert sorted(s.name for s in module.sources.values() if s.role == "norm") == [n for n, on in (("b", beta), ("g", gamma)) if on]
    x = np.random.default_rng(0).normal(1.0, 2.0, (2, 6, 8) if mean == "gap" else (2, 3, 4, 5)).astype(np.float32)
    reference, ours = run_both(model, {"x": x})
    assert_close(reference, ours, rtol=1e-5, atol=1e-5)
    _assert_gradients_match_the_nodewise_plan(module, x, "s", atol=1e-5)


@pytest.mark.parametrize("case", ["shift without scale", "x * inv of another x", "centred value of another x",
                                  "mean over other axes", "offset of another mean"])
def test_keras_layer_norms_it_cannot_prove_are_left_to_the_nodes(case):
    nodes, constants = _keras_layer_norm(mean=(3,), gamma=case != "shift without scale")
    x_inputs = ()
    if case == "x * inv of another x":
        nodes[8] = helper.make_node("Mul", ["x2", "inv"], ["xs"])
        x_inputs = ("x2",)
    if case == "centred value of another x":
        nodes[1] = helper.make_node("Sub", ["x2", "m"], ["d"])
        x_inputs = ("x2",)
    if case == "mean over other axes":
        nodes[3] = helper.make_node("ReduceMean", ["dd"], ["v"], axes=[2, 3])
    if case == "offset of another mean":
        nodes = [helper.make_node("ReduceMean", ["x"], ["m2"], axes=[3]), *nodes]
        nodes[10] = helper.make_node("Neg", ["m2"], ["nm"])
    model = _model_with_ints(nodes, opset=13, constants=constants, extra_inputs=x_inputs)
    module = OnnxModule(model)
    assert module.fusions["layer_norm"] == 0
    assert not any(s.role == "norm" for s in module.sources.values())
    rng = np.random.default_rng(0)
    feeds = {name: rng.normal(size=(2, 3, 4, 5)).astype(np.float32) for name in ("x", *x_inputs)}
    reference, ours = run_both(model, feeds)
    assert_close(reference, ours, rtol=1e-5, atol=1e-5)


def _keras_layer_norm_with_mean_view(view):
    """tf2onnx's transpose optimiser moves a channels-last LayerNorm to channels-first: the mean
    over axis 1 reaches the Sub through a Reshape to a fixed [-1, 1, H, W]."""
    nodes, constants = _keras_layer_norm(mean=(1,))
    nodes[1] = helper.make_node("Sub", ["x", "mv"], ["d"])
    nodes.insert(1, helper.make_node("Reshape", ["m", "view"], ["mv"]))
    rng = np.random.default_rng(4)
    constants.update(g=rng.uniform(0.5, 1.5, (1, 3, 1, 1)), b=rng.normal(size=(1, 3, 1, 1)))
    model = _model(nodes, opset=13, constants=constants, x_shape=(2, 3, 4, 4))
    model.graph.initializer.append(numpy_helper.from_array(np.array(view, np.int64), "view"))
    return model


def test_a_keras_layer_norm_moved_to_channels_first_by_tf2onnx_fuses():
    model = _keras_layer_norm_with_mean_view([-1, 1, 4, 4])
    module = OnnxModule(model)
    assert module.fusions == Counter({"layer_norm": 1})
    assert sorted(s.name for s in module.sources.values() if s.role == "norm") == ["b", "g"]
    x = np.random.default_rng(0).normal(1.0, 2.0, (2, 3, 4, 4)).astype(np.float32)
    reference, ours = run_both(model, {"x": x})
    assert_close(reference, ours, rtol=1e-5, atol=1e-5)
    _assert_gradients_match_the_nodewise_plan(module, x, "s", atol=1e-5)


def test_a_mean_view_that_is_not_the_means_shape_is_refused_when_it_runs():
    # [2, 1, 4, 4] viewed as [1, 2, 4, 4] broadcasts against x [2, 2, 4, 4]: no longer a LayerNorm
    model = _keras_layer_norm_with_mean_view([1, -1, 4, 4])
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", helper.TensorProto.FLOAT, [2, 2, 4, 4]))
    for init in model.graph.initializer:
        if init.name in ("g", "b"):
            init.CopyFrom(numpy_helper.from_array(np.full((1, 2, 1, 1), 1.5 if init.name == "g" else 0.5, np.float32),
                                                  init.name))
    module = OnnxModule(model)
    x = np.random.default_rng(0).normal(size=(2, 2, 4, 4)).astype(np.float32)
    with pytest.raises(Exception, match="reshaped to"):
        module.run({"x": torch.from_numpy(x)})


def test_a_spelled_out_layer_norms_scale_and_shift_are_tuned_and_written_back(tmp_path):
    from fcpts_onnx import sparsify
    from fcpts_onnx.learner.options import LearnOptions

    rng = np.random.default_rng(0)
    nodes, constants = _spelled_layer_norm(13)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["x1"]), *nodes, helper.make_node("MatMul", ["y", "W2"], ["out"])]
    for node in nodes[1:3]:  # the LayerNorm reads the first MatMul's output
        node.input[:] = ["x1" if i == "x" else i for i in node.input]
    constants.update(W=rng.normal(size=(16, 5)), W2=rng.normal(size=(5, 8)))
    model = _model(nodes, opset=13, constants=constants, outputs=("out",), x_shape=("n", 16))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("out", helper.TensorProto.FLOAT, ["n", 8]))
    onnx_path = tmp_path / "ln.onnx"
    onnx_path.write_bytes(model.SerializeToString())
    report = sparsify(onnx_path, tmp_path / "ln.sparse.onnx", {"x": rng.normal(size=(64, 16)).astype(np.float32)},
                      sparsity=0.5, method="global", reconstruct=True, learn=LearnOptions(iters=20, seed=0),
                      report_path=False)
    written = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "ln.sparse.onnx")).graph.initializer}
    for name in ("g", "b"):
        assert not np.array_equal(written[name], np.asarray(constants[name], np.float32)), name
    assert report.achieved_sparsity == pytest.approx(0.5, abs=1 / (16 * 5 + 5 * 8))


@pytest.mark.parametrize("name", ["paddle2onnx: Div(Mul(x, relu6(x+3)), 6)", "torch legacy GELU: Mul(Mul(x, Add(Erf(Div(x, sqrt 2)), 1)), 0.5)"])
def test_constants_of_higher_rank_give_the_fused_output_their_rank(name):
    # a [1, 1, 1] constant broadcast against x of shape [5] makes the chain's output [1, 1, 5]
    nodes, opset, kind = SPELLINGS[name]
    constants = {k: np.full((1, 1, 1), v, np.float32) for k, v in _SCALARS.items() if k not in ("zero", "six")}
    constants.update(zero=0.0, six=6.0)  # Clip's bounds must be scalars
    if kind == "gelu":
        constants["six"] = np.full((1, 1, 1), 6.0, np.float32)
    model = _model(nodes, opset=opset, constants=constants, x_shape=(5,))
    assert OnnxModule(model).fusions == Counter({kind: 1})
    x = np.linspace(-5, 5, 5, dtype=np.float32)
    reference, ours = run_both(model, {"x": x})
    assert ours["y"].shape == reference["y"].shape == (1, 1, 5)
    assert_close(reference, ours)


def _spelled_rms_norm(opset=13, *, inverse="Reciprocal", square="Pow", scale=True, axes=(-1,), casts=False):
    """RMSNorm as torch's exporters write it below opset 23: Pow|Mul, ReduceMean, Add eps, Sqrt,
    then Reciprocal + Mul (rsqrt), Div(1, .) + Mul, or Div(x, .); then Mul by the scale.
    ``casts``: the legacy exporter's Cast(to=float) before and after (LLaMA's ``.to(dtype)``)."""
    x = "xc" if casts else "x"
    nodes = [helper.make_node("Cast", ["x"], ["xc"], to=onnx.TensorProto.FLOAT)] if casts else []
    nodes.append(helper.make_node("Pow", [x, "two"], ["p"]) if square == "Pow" else helper.make_node("Mul", [x, x], ["p"]))
    if opset >= 18:
        nodes.append(helper.make_node("ReduceMean", ["p", "v_axes"], ["v"]))
    else:
        nodes.append(helper.make_node("ReduceMean", ["p"], ["v"], axes=list(axes)))
    nodes += [helper.make_node("Add", ["v", "eps"], ["a"]), helper.make_node("Sqrt", ["a"], ["s"])]
    normed = "n" if scale or casts else "y"
    if inverse == "Reciprocal":
        nodes += [helper.make_node("Reciprocal", ["s"], ["r"]), helper.make_node("Mul", [x, "r"], [normed])]
    elif inverse == "Div(1, .)":
        nodes += [helper.make_node("Div", ["one", "s"], ["r"]), helper.make_node("Mul", ["r", x], [normed])]
    else:
        nodes.append(helper.make_node("Div", [x, "s"], [normed]))
    if casts:
        nodes.append(helper.make_node("Cast", ["n"], ["nc" if scale else "y"], to=onnx.TensorProto.FLOAT))
    if scale:
        nodes.append(helper.make_node("Mul", ["g", "nc" if casts else "n"], ["y"]))
    rng = np.random.default_rng(2)
    shape = (4, 5) if tuple(axes) in ((-2, -1), (2, 3)) else (5,)
    constants = {"two": 2.0, "one": 1.0, "eps": 1e-6, "g": rng.uniform(0.5, 1.5, shape)}
    if not scale:
        del constants["g"]
    if opset >= 18:
        constants["v_axes"] = np.array(axes, np.int64)
    return nodes, constants


@pytest.mark.parametrize("opset,inverse,square,scale,axes,casts", [
    (13, "Reciprocal", "Pow", True, (-1,), False), (18, "Reciprocal", "Pow", True, (-1,), False),
    (13, "Div(1, .)", "Pow", True, (-1,), True), (13, "Div(x, .)", "Mul", True, (-1,), False),
    (13, "Reciprocal", "Pow", False, (-1,), False), (13, "Reciprocal", "Pow", True, (-2, -1), False),
    (13, "Reciprocal", "Mul", True, (3,), False), (18, "Div(x, .)", "Pow", True, (2, 3), False),
    (13, "Reciprocal", "Pow", True, (1,), False),
])
def test_a_spelled_out_rms_norm_is_one_kernel_with_its_scale_tuned(opset, inverse, square, scale, axes, casts):
    nodes, constants = _spelled_rms_norm(opset, inverse=inverse, square=square, scale=scale, axes=axes, casts=casts)
    model = _model_with_ints(nodes, opset=opset, constants=constants)
    module = OnnxModule(model)
    assert module.fusions == Counter({"rms_norm": 1})
    assert [s.name for s in module.sources.values() if s.role == "norm"] == (["g"] if scale else [])
    x = np.random.default_rng(0).normal(0.5, 3.0, (2, 3, 4, 5)).astype(np.float32)
    reference, ours = run_both(model, {"x": x})
    assert_close(reference, ours, rtol=1e-5, atol=1e-6)
    _assert_gradients_match_the_nodewise_plan(module, x, "s", atol=1e-6)


@pytest.mark.parametrize("case", ["mixed-sign axes", "cube, not square", "eps computed", "x not the squared value",
                                  "cast to float16 after", "cast to float after, x not from a cast"])
def test_rms_norms_it_cannot_prove_are_left_to_the_nodes(case):
    nodes, constants = _spelled_rms_norm(13, axes=(-1, 2) if case == "mixed-sign axes" else (-1,),
                                         casts=case.startswith("cast to"))
    if case == "cube, not square":
        constants["two"] = 3.0
    if case == "eps computed":
        nodes = [helper.make_node("Abs", ["eps"], ["eps_abs"]), *nodes]
        nodes[3] = helper.make_node("Add", ["v", "eps_abs"], ["a"])
    if case == "x not the squared value":
        nodes = [helper.make_node("Neg", ["x"], ["xn"]), *nodes]
        nodes[-2] = helper.make_node("Mul", ["xn", "r"], ["n"])
    if case == "cast to float after, x not from a cast":  # then the Cast may convert: it stays a node
        nodes = nodes[1:]
        for node in nodes:
            node.input[:] = ["x" if name == "xc" else name for name in node.input]
    if case == "cast to float16 after":  # a real Cast: only the normalisation before it may fuse, unscaled
        nodes[-2] = helper.make_node("Cast", ["n"], ["nh"], to=onnx.TensorProto.FLOAT16)
        nodes[-1] = helper.make_node("Mul", ["gh", "nh"], ["yh"])
        nodes.append(helper.make_node("Cast", ["yh"], ["y"], to=onnx.TensorProto.FLOAT))
    model = _model_with_ints(nodes, opset=13, constants=constants)
    if case == "cast to float16 after":
        model.graph.initializer.append(numpy_helper.from_array(constants["g"].astype(np.float16), "gh"))
    module = OnnxModule(model)
    if case.startswith("cast to"):  # the normalisation before the Cast, unscaled
        assert module.fusions == Counter({"rms_norm": 1})
    else:
        assert module.fusions == Counter()
    assert not any(s.name == "g" and s.role == "norm" for s in module.sources.values())
    x = np.abs(np.random.default_rng(0).normal(size=(2, 3, 4, 5))).astype(np.float32) + 0.1  # a cube's mean > 0
    reference, ours = run_both(model, {"x": x})
    assert_close(reference, ours, rtol=1e-3 if case == "cast to float16 after" else 1e-5, atol=1e-3)


@pytest.mark.parametrize("style,dynamo", [("llama", False), ("llama", True), ("t5", False)])
def test_torch_exported_rms_norms_are_fused_and_their_weights_tuned_and_written_back(tmp_path, style, dynamo):
    """LLaMA's RMSNorm (``weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)``) as torch's legacy
    exporter (opset 17, with Casts) and its dynamo exporter (opset 18) write it, and T5's
    (``weight * (x * rsqrt(mean(x.float()^2) + eps))``, the Cast only on the square's side)."""
    import warnings

    from fcpts_onnx import sparsify
    from fcpts_onnx.learner.options import LearnOptions

    class RMSNorm(torch.nn.Module):
        def __init__(self, size):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.rand(size) + 0.5)

        def forward(self, x):
            if style == "t5":
                return self.weight * (x * torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + 1e-6))
            dtype = x.dtype
            x = x.to(torch.float32)
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
            return self.weight * x.to(dtype)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), RMSNorm(16), torch.nn.Linear(16, 16), RMSNorm(16),
                                torch.nn.Linear(16, 8)).eval()
    path = tmp_path / "rms.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(4, 16),), str(path), input_names=["x"], dynamo=dynamo,
                          opset_version=18 if dynamo else 17, dynamic_axes=None if dynamo else {"x": {0: "n"}},
                          **({"dynamic_shapes": ({0: torch.export.Dim("n")},)} if dynamo else {}))
    exported = onnx.load(str(path))
    module = OnnxModule(exported, prunable=discover(exported).weights)
    assert module.fusions == Counter({"rms_norm": 2})
    norms = sorted(s.name for s in module.sources.values() if s.role == "norm")
    assert len(norms) == 2
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 16)).astype(np.float32)
    reference, ours = run_both(exported, {"x": x[:8]})
    assert_close(reference, ours, rtol=1e-5, atol=1e-6)
    sparsify(path, tmp_path / "rms.sparse.onnx", {"x": x}, sparsity=0.5, method="global", reconstruct=True,
             learn=LearnOptions(iters=20, seed=0), report_path=False)
    before = {i.name: numpy_helper.to_array(i) for i in exported.graph.initializer}
    written = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "rms.sparse.onnx")).graph.initializer}
    for name in norms:
        assert not np.array_equal(written[name], before[name]), name


@pytest.mark.parametrize("module_name,dynamo", [("gpt2", False), ("gpt2", True), ("torch", False), ("torch", True)])
def test_torch_exported_tanh_gelus_are_fused_exact_with_the_chains_gradient(tmp_path, module_name, dynamo):
    """GPT-2's gelu_new and F.gelu(approximate="tanh") as torch's legacy (opset 17) and dynamo
    (opset 18) exporters write them: one kernel, onnxruntime's values, the chain's gradients."""
    import math
    import warnings

    class GPT2Gelu(torch.nn.Module):
        def forward(self, x):
            return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))

    class TorchGelu(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.gelu(x, approximate="tanh")

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), GPT2Gelu() if module_name == "gpt2" else TorchGelu(),
                                torch.nn.Linear(16, 8)).eval()
    path = tmp_path / "gelu.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(4, 16),), str(path), input_names=["x"], dynamo=dynamo,
                          opset_version=18 if dynamo else 17)
    exported = onnx.load(str(path))
    module = OnnxModule(exported, prunable=discover(exported).weights)
    assert module.fusions == Counter({"gelu_tanh": 1})
    x = (np.random.default_rng(0).normal(size=(4, 16)) * 3).astype(np.float32)
    reference, ours = run_both(exported, {exported.graph.input[0].name: x})
    assert_close(reference, ours, rtol=1e-5, atol=1e-6)
    inner = next(n.output[0] for n in exported.graph.node if n.op_type == "Tanh")
    output = exported.graph.output[0].name
    grads = []
    for keep in ((), (inner,)):  # fused, then node by node
        module.zero_grad()
        out = module.run({exported.graph.input[0].name: torch.from_numpy(x)}, keep=keep)[output]
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        grads.append([p.grad for p in module.parameters()])
    for fused, nodewise in zip(*grads):
        torch.testing.assert_close(fused, nodewise, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("constant,value", [("cubic", 0.05), ("k", 0.8), ("three", 2.0)])
def test_a_tanh_gelu_with_other_constants_is_left_to_the_nodes(constant, value):
    nodes, opset, _ = SPELLINGS["GPT-2 gelu_new: Mul(Mul(x, 0.5), 1 + tanh((x + Pow(x, 3) a) k))"]
    model = _model(nodes, opset=opset, constants=_SCALARS | {constant: value})
    module = OnnxModule(model)
    assert module.fusions == Counter()
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float32)
    reference, ours = run_both(model, {"x": x})
    assert_close(reference, ours)
