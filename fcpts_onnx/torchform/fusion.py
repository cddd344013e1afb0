"""Activation chains that exporters spell out node by node, run as one torch kernel.

paddle2onnx writes hardswish as ``Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6)``; torch's legacy
exporter below opset 14 as ``Mul(x, HardSigmoid(x))``, and exact GELU below opset 20 as
``Mul(Mul(x, Add(Erf(Div(x, sqrt 2)), 1)), 0.5)``, and its tanh approximation (GPT-2's
gelu_new) as ``0.5 x (1 + Tanh(sqrt(2/pi) (x + 0.044715 x^3)))``; many exporters write SiLU as
``Mul(x, Sigmoid(x))``. Run node by node, a hardswish is four passes over memory forward and
about ten backward (Clip's gradient alone is two comparisons, an and and a where), with every
link's output kept for the backward pass. On PP-OCRv4 rec (28 such chains) those passes were
about a third of a training step on the CPU; ``F.hardswish`` and ``F.silu`` are one pass each
way.

The fused function is the chain's function up to rounding: ``F.hardswish`` computes
``x * min(max(x + 3, 0), 6) / 6`` in paddle2onnx's order (spellings that scale by a stored
1/6 differ by rounding), ``F.silu`` computes ``x / (1 + exp(-x))``, ``F.gelu`` the exact erf
form in its own order. The gradients are the chains' (SiLU and GELU are smooth), except
hardswish's at exactly x = -3 and x = 3, its kinks, where the chain's Clip passes the
gradient (-0.5 and 1.5 times it) and torch's kernel takes the derivative from the other side
(0 and 1): both one-sided derivatives of the same function, at two points real data does
not sit on. The parity check against onnxruntime covers the fused form, since that is the
form that runs.

Normalisations written out node by node fuse the same way: a LayerNorm (torch's exporter
below opset 17, paddle2onnx, tf2onnx's Keras and tf.keras spellings) as ``F.layer_norm``, an RMSNorm (torch's exporters below opset 23)
as ``F.rms_norm``; their scale and shift stay visible as tuned parameters (OnnxModule).

A chain is fused only when its constants are exactly the values the pattern needs (stored
constants, not tuned parameters) and its inner values are used nowhere else and are not graph
outputs, so nothing else in the graph can see that they are gone.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import torch
import torch.nn.functional as F

KERNELS: dict[str, Callable] = {"hardswish": F.hardswish, "silu": F.silu, "gelu": F.gelu}


@dataclass(frozen=True)
class Fusion:
    """One chain: ``output = KERNELS[kind](x, *extra, **attrs)``, replacing ``nodes`` (graph
    order, the last one the output's)."""

    kind: str
    x: str
    output: str
    nodes: tuple[onnx.NodeProto, ...]
    extra: tuple[str, ...] = ()  # further tensor inputs (a LayerNorm's scale and shift)
    attrs: tuple[tuple[str, object], ...] = ()
    # The rank of the chain's highest-rank constant: a [1, 1, 1] "3" broadcast against a
    # lower-rank x gives the chain's output that rank, which the kernel's output must take too.
    rank: int = 0

    @property
    def hidden(self) -> set[str]:
        """The chain's inner values, which no longer exist once it is fused."""
        return {out for node in self.nodes for out in node.output if out} - {self.output}


@dataclass(frozen=True)
class _Match:
    x: str
    nodes: tuple[onnx.NodeProto, ...]
    extra: tuple[str, ...] = ()
    attrs: tuple[tuple[str, object], ...] = ()


class _Graph:
    """What a matcher asks of the graph: producers, stored scalar constants, opsets."""

    def __init__(self, nodes: Sequence[onnx.NodeProto], constant: Callable[[str], np.ndarray | None],
                 opsets: dict[str, int]):
        self.producer = {out: node for node in nodes for out in node.output if out}
        self._constant = constant
        self.opset = opsets.get("", 1)

    def node(self, value: str, *op_types: str) -> onnx.NodeProto | None:
        node = self.producer.get(value)
        if node is None or node.domain not in ("", "ai.onnx") or node.op_type not in op_types:
            return None
        return node

    def constant(self, value: str) -> np.ndarray | None:
        return self._constant(value) if value else None

    def scalar(self, value: str) -> float | None:
        """A stored floating-point constant with one element, as float32, else None."""
        array = self.constant(value)
        if array is None or array.size != 1 or array.dtype.kind != "f":
            return None
        return float(np.float32(array.reshape(())))


def _is(value: float | None, wanted: float) -> bool:
    return value is not None and value == float(np.float32(wanted))


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _binary_operands(node: onnx.NodeProto) -> list[tuple[str, str]]:
    """Both orders of a commutative node's operands."""
    if len(node.input) != 2:
        return []
    a, b = node.input
    return [(a, b), (b, a)]


def _relu6_of_x_plus_3(g: _Graph, value: str) -> _Match | None:
    """value = Clip(Add(x, 3), 0, 6)."""
    clip = g.node(value, "Clip")
    if clip is None or not clip.input:
        return None
    if g.opset >= 11:
        bounds = [g.scalar(clip.input[i]) if len(clip.input) > i else None for i in (1, 2)]
    else:
        bounds = [_attr(clip, "min"), _attr(clip, "max")]
    if not (_is(bounds[0], 0.0) and _is(bounds[1], 6.0)):
        return None
    add = g.node(clip.input[0], "Add")
    if add is None:
        return None
    for x, three in _binary_operands(add):
        if _is(g.scalar(three), 3.0):
            return _Match(x, (add, clip))
    return None


def _hard_sigmoid(g: _Graph, value: str) -> _Match | None:
    """value = relu6(x + 3) / 6, in any of the spellings exporters use."""
    node = g.node(value, "HardSigmoid", "Div", "Mul")
    if node is None:
        return None
    if node.op_type == "HardSigmoid":
        if _is(_attr(node, "alpha", 0.2), 1 / 6) and _is(_attr(node, "beta", 0.5), 0.5):
            return _Match(node.input[0], (node,))
        return None
    if node.op_type == "Div":
        pairs = [tuple(node.input)] if len(node.input) == 2 else []
        scale = 6.0
    else:
        pairs, scale = _binary_operands(node), 1 / 6
    for inner, constant in pairs:
        if _is(g.scalar(constant), scale):
            found = _relu6_of_x_plus_3(g, inner)
            if found:
                return _Match(found.x, (*found.nodes, node))
    return None


def _hardswish(g: _Graph, end: onnx.NodeProto) -> _Match | None:
    """x * hard_sigmoid(x), or (x * relu6(x + 3)) / 6 (or * 1/6)."""
    if end.op_type == "Mul":
        for x, gate in _binary_operands(end):
            found = _hard_sigmoid(g, gate)
            if found and found.x == x:
                return _Match(x, (*found.nodes, end))
    if end.op_type == "Div" and len(end.input) == 2:
        pairs, scale = [tuple(end.input)], 6.0
    elif end.op_type == "Mul":
        pairs, scale = _binary_operands(end), 1 / 6
    else:
        return None
    for product, constant in pairs:
        if not _is(g.scalar(constant), scale):
            continue
        mul = g.node(product, "Mul")
        for x, relu6 in _binary_operands(mul) if mul is not None else []:
            found = _relu6_of_x_plus_3(g, relu6)
            if found and found.x == x:
                return _Match(x, (*found.nodes, mul, end))
    return None


def _silu(g: _Graph, end: onnx.NodeProto) -> _Match | None:
    """x * Sigmoid(x)."""
    if end.op_type != "Mul":
        return None
    for x, gate in _binary_operands(end):
        sigmoid = g.node(gate, "Sigmoid")
        if sigmoid is not None and sigmoid.input[0] == x:
            return _Match(x, (sigmoid, end))
    return None


def _one_plus_erf(g: _Graph, value: str) -> _Match | None:
    """value = 1 + Erf(x / sqrt(2)) (or x * 1/sqrt(2))."""
    add = g.node(value, "Add")
    for inner, one in _binary_operands(add) if add is not None else []:
        erf = g.node(inner, "Erf") if _is(g.scalar(one), 1.0) else None
        scaled = g.node(erf.input[0], "Div", "Mul") if erf is not None else None
        if scaled is None:
            continue
        if scaled.op_type == "Div":
            pairs, factor = ([tuple(scaled.input)] if len(scaled.input) == 2 else []), math.sqrt(2)
        else:
            pairs, factor = _binary_operands(scaled), math.sqrt(0.5)
        for x, constant in pairs:
            if _is(g.scalar(constant), factor):
                return _Match(x, (scaled, erf, add))
    return None


def _close(value: float | None, wanted: float) -> bool:
    """A stored constant within float32 rounding of ``wanted`` (exporters compute sqrt(2/pi)
    in their own order)."""
    return value is not None and abs(value - wanted) <= 1e-6 * abs(wanted)


def _cube(g: _Graph, value: str) -> tuple[str, tuple[onnx.NodeProto, ...]] | None:
    """value = x^3 as Pow(x, 3) or Mul(x, Mul(x, x)) in either order: (x, the nodes)."""
    node = g.node(value, "Pow", "Mul")
    if node is None or len(node.input) != 2:
        return None
    if node.op_type == "Pow":
        return (node.input[0], (node,)) if _is(g.scalar(node.input[1]), 3.0) else None
    for x, squared in _binary_operands(node):
        square = g.node(squared, "Mul")
        if square is not None and list(square.input) == [x, x]:
            return x, (square, node)
    return None


def _one_plus_tanh(g: _Graph, value: str) -> _Match | None:
    """value = 1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)), the products and sums in either order."""
    add = g.node(value, "Add")
    for inner, one in _binary_operands(add) if add is not None else []:
        tanh = g.node(inner, "Tanh") if _is(g.scalar(one), 1.0) else None
        scaled = g.node(tanh.input[0], "Mul") if tanh is not None else None
        for poly_name, k in _binary_operands(scaled) if scaled is not None else []:
            poly = g.node(poly_name, "Add") if _close(g.scalar(k), math.sqrt(2 / math.pi)) else None
            for x, term in _binary_operands(poly) if poly is not None else []:
                cubic = g.node(term, "Mul")
                for cubed, a in _binary_operands(cubic) if cubic is not None else []:
                    cube = _cube(g, cubed)
                    if cube is not None and cube[0] == x and _close(g.scalar(a), 0.044715):
                        return _Match(x, (*cube[1], cubic, poly, scaled, tanh, add))
    return None


def _half_x_times(one_plus: Callable[[_Graph, str], _Match | None]) -> Callable[[_Graph, onnx.NodeProto], _Match | None]:
    """A matcher of x * 0.5 * one_plus(x), the products in any order."""

    def match(g: _Graph, end: onnx.NodeProto) -> _Match | None:
        if end.op_type != "Mul":
            return None
        for a, b in _binary_operands(end):
            if _is(g.scalar(b), 0.5):  # (x * (1 + f)) * 0.5
                mul = g.node(a, "Mul")
                for x, rest in _binary_operands(mul) if mul is not None else []:
                    found = one_plus(g, rest)
                    if found and found.x == x:
                        return _Match(x, (*found.nodes, mul, end))
            mul = g.node(b, "Mul")
            for c, d in _binary_operands(mul) if mul is not None else []:
                if not _is(g.scalar(d), 0.5):
                    continue
                found = one_plus(g, c)  # x * ((1 + f) * 0.5)
                if found and found.x == a:
                    return _Match(a, (*found.nodes, mul, end))
                found = one_plus(g, a)  # (1 + f) * (x * 0.5)
                if found and found.x == c:
                    return _Match(c, (mul, *found.nodes, end))
        return None

    return match


# x * 0.5 * (1 + Erf(x / sqrt(2))): torch's exporter below opset 20 writes Mul(Mul(x, 1 + erf),
# 0.5); others Mul(x, Mul(1 + erf, 0.5)) or Mul(Mul(x, 0.5), 1 + erf).
_gelu = _half_x_times(_one_plus_erf)
# the tanh approximation (GPT-2's gelu_new, F.gelu(approximate="tanh")): torch's legacy exporter
# writes Mul(Mul(x, 1 + tanh), 0.5) with the cube as Mul(x, Mul(x, x)); its dynamo exporter
# Mul(x, Mul(0.5, 1 + tanh)); GPT-2's own code Mul(Mul(x, 0.5), 1 + tanh)
_gelu_tanh = _half_x_times(_one_plus_tanh)
KERNELS["gelu_tanh"] = functools.partial(F.gelu, approximate="tanh")


def _mean_axes(g: _Graph, node: onnx.NodeProto | None) -> tuple[tuple[str, object], ...] | None:
    """The axes a keepdims mean averages over, as the kernels' attributes: ("dims", k) for the
    trailing axes -k..-1 (torch's exporters), ("axes", (a, ...)) for axes given as positive
    numbers (tf2onnx: Keras normalises axis=-1 to the input's last axis), ("first_axis", 2) for
    a GlobalAveragePool (tf2onnx writes a mean over the last axis of a rank-3 tensor so); else
    None. Positive axes need the rank, which the graph need not state: the kernels read it
    off the input when they run."""
    if node is None:
        return None
    if node.op_type == "GlobalAveragePool":
        return (("first_axis", 2),)
    if not _attr(node, "keepdims", 1):
        return None
    if g.opset >= 18:
        axes = g.constant(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        axes = None if axes is None or axes.dtype.kind not in "iu" else sorted(int(a) for a in axes.ravel())
    else:
        axes = _attr(node, "axes")
        axes = None if axes is None else sorted(int(a) for a in axes)
    if not axes or len(set(axes)) != len(axes):
        return None
    if axes == list(range(-len(axes), 0)):
        return (("dims", len(axes)),)
    if axes[0] >= 0:
        return (("axes", tuple(axes)),)
    return None  # negative axes that are not the trailing ones, or a mix of signs


def _mean_node(g: _Graph, value: str) -> onnx.NodeProto | None:
    return g.node(value, "ReduceMean", "GlobalAveragePool")


def _mean_square_plus_eps(g: _Graph, add: onnx.NodeProto | None, x: str):
    """``add`` = mean(x^2) + eps, eps a stored scalar >= 0, the square Pow(x, 2) or Mul(x, x):
    (square, mean node, its axes as _mean_axes gives them, eps), else None."""
    for variance, eps_name in _binary_operands(add) if add is not None else ():
        eps = g.scalar(eps_name)
        var_mean = _mean_node(g, variance)
        square = g.node(var_mean.input[0], "Pow", "Mul") if var_mean is not None else None
        if eps is None or eps < 0 or square is None:
            continue
        if square.op_type == "Pow":
            squared = list(square.input) == [x, square.input[1]] and _is(g.scalar(square.input[1]), 2.0)
        else:
            squared = list(square.input) == [x, x]
        axes = _mean_axes(g, var_mean)
        if squared and axes is not None:
            return square, var_mean, axes, eps
    return None


def _normalized(g: _Graph, value: str) -> _Match | None:
    """value = (x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps), over the last axes, the
    division a Div (torch's exporter below opset 17) or a Mul by Reciprocal(Sqrt(...))."""
    for centred, tail in _over_sqrt(g, value):
        sub, add = g.node(centred, "Sub"), g.node(tail[0].input[0], "Add")
        found = _mean_square_plus_eps(g, add, centred) if sub is not None else None
        mean = _mean_node(g, sub.input[1]) if sub is not None else None
        if found is None or mean is None or mean.input[0] != sub.input[0]:
            continue
        square, var_mean, axes, eps = found
        if _mean_axes(g, mean) == axes:
            return _Match(sub.input[0], (mean, sub, square, var_mean, add, *tail), attrs=(*axes, ("eps", eps)))
    return None


def _layer_norm(g: _Graph, end: onnx.NodeProto) -> _Match | None:
    """normalized(x) * scale + shift, the scale and shift optional."""
    tail: list[onnx.NodeProto] = []
    shift = scale = None
    node = end
    if node.op_type == "Add":
        for inner, other in _binary_operands(node):
            if g.node(inner, "Mul", "Div") is not None:
                tail, shift, node = [node], other, g.producer[inner]
                break
        else:
            return None
    if node.op_type == "Mul":  # a scale, unless this Mul is the normalisation's own
        for inner, other in _binary_operands(node):
            if _normalized(g, inner) is not None:
                tail, scale, node = [node, *tail], other, g.producer[inner]
                break
    if shift is not None and scale is None:
        return None  # a shift without a scale is left to the nodes
    found = _normalized(g, node.output[0])
    if found is None:
        return None
    extra = tuple(v for v in (scale, shift) if v is not None)
    return _Match(found.x, (*found.nodes, *tail), extra, found.attrs)


def _minus_mean_times(g: _Graph, value: str, mean: str, inv: str) -> tuple[onnx.NodeProto, ...] | None:
    """value = -mean * inv, as Mul(Neg(mean), inv) (Keras 3) or Neg(Mul(mean, inv)); the nodes."""
    node = g.node(value, "Mul", "Neg")
    if node is not None and node.op_type == "Mul":
        for negated, other in _binary_operands(node):
            neg = g.node(negated, "Neg")
            if other == inv and neg is not None and neg.input[0] == mean:
                return neg, node
    elif node is not None:
        product = g.node(node.input[0], "Mul")
        if product is not None and sorted(product.input) == sorted([mean, inv]):
            return product, node
    return None


def _mean_view(g: _Graph, value: str) -> tuple[onnx.NodeProto, tuple[int, ...]] | None:
    """value = Reshape(mean, stored shape): tf2onnx's transpose optimiser, moving a channels-last
    LayerNorm to channels-first, turns the transpose of the mean ([N, H, W, 1] -> [N, 1, H, W])
    into a Reshape to a fixed [-1, 1, H, W]. Such a Reshape changes nothing where the shapes
    agree; the kernel checks that they do when it runs (layer_norm's ``mean_view``)."""
    node = g.node(value, "Reshape")
    shape = g.constant(node.input[1]) if node is not None and len(node.input) == 2 else None
    if shape is None or shape.dtype.kind not in "iu" or shape.ndim != 1 or _attr(node, "allowzero", 0):
        return None
    return node, tuple(int(d) for d in shape)


def _keras_offset(g: _Graph, value: str, mean: str, inv: str):
    """value = beta - mean * inv, or -mean * inv without beta: (nodes, beta or None), else None."""
    node = g.node(value, "Add", "Sub")
    if node is not None and node.op_type == "Add":  # Keras 3: -mean * inv + beta
        for product, beta in _binary_operands(node):
            found = _minus_mean_times(g, product, mean, inv)
            if found is not None:
                return (*found, node), beta
    elif node is not None and len(node.input) == 2:  # tf.nn.batch_normalization: beta - mean * inv
        product = g.node(node.input[1], "Mul")
        if product is not None and sorted(product.input) == sorted([mean, inv]):
            return (product, node), node.input[0]
    found = _minus_mean_times(g, value, mean, inv)
    return None if found is None else (found, None)


def _keras_layer_norm(g: _Graph, end: onnx.NodeProto) -> _Match | None:
    """Keras's LayerNormalization as tf2onnx writes it: inv = rsqrt(var + eps) * gamma, then
    ``x * inv + (beta - mean * inv)``, the offset spelled ``Add(Mul(Neg(mean), inv), beta)``
    (Keras 3) or ``Sub(beta, Mul(mean, inv))`` (tf.nn.batch_normalization, tf.keras); the
    means ReduceMean over positive axes, or GlobalAveragePool over a rank-3 input's last axis;
    gamma and beta optional. It is (x - mean) * rsqrt(var + eps) * gamma + beta, a LayerNorm."""
    if end.op_type != "Add":
        return None
    for scaled, offset in _binary_operands(end):
        xs = g.node(scaled, "Mul")
        for x, inv in _binary_operands(xs) if xs is not None else ():
            gamma, inverse = None, _reciprocal_sqrt(g, inv)
            if inverse is None:
                times_gamma = g.node(inv, "Mul")
                for rsqrt, other in _binary_operands(times_gamma) if times_gamma is not None else ():
                    inverse = _reciprocal_sqrt(g, rsqrt)
                    if inverse is not None:
                        gamma, inverse = other, (*inverse, times_gamma)
                        break
            if inverse is None:
                continue
            # the centred value x - mean, read off the square that the variance averages
            add = g.node(inverse[0].input[0], "Add")
            var_mean = next((m for v, _ in _binary_operands(add) if (m := _mean_node(g, v)) is not None), None) \
                if add is not None else None
            square = g.node(var_mean.input[0], "Pow", "Mul") if var_mean is not None else None
            sub = g.node(square.input[0], "Sub") if square is not None else None
            if sub is None or sub.input[0] != x:
                continue
            found = _mean_square_plus_eps(g, add, sub.output[0])
            mean, view = _mean_node(g, sub.input[1]), _mean_view(g, sub.input[1])
            if view is not None:
                mean = _mean_node(g, view[0].input[0])
            if found is None or mean is None or mean.input[0] != x or _mean_axes(g, mean) != found[2]:
                continue
            shifted = _keras_offset(g, offset, mean.output[0], inv) or _keras_offset(g, offset, sub.input[1], inv)
            if shifted is None or (shifted[1] is not None and gamma is None):
                continue  # a shift without a scale is left to the nodes
            (offset_nodes, beta), (square, var_mean, axes, eps) = shifted, found
            nodes = (mean, *(view[:1] if view else ()), sub, square, var_mean, add, *inverse, xs, *offset_nodes, end)
            extra = tuple(v for v in (gamma, beta) if v is not None)
            if set(extra) & {out for node in nodes for out in node.output}:
                continue  # gamma or beta computed inside the chain itself
            return _Match(x, nodes, extra, (*axes, ("eps", eps), *((("mean_view", view[1]),) if view else ())))
    return None


def _reciprocal_sqrt(g: _Graph, value: str) -> tuple[onnx.NodeProto, ...] | None:
    """value = 1 / Sqrt(a): Reciprocal(Sqrt(a)) (torch's rsqrt, both exporters) or
    Div(1, Sqrt(a)) (the legacy exporter at some opsets); the nodes, Sqrt first."""
    node = g.node(value, "Reciprocal", "Div")
    if node is None:
        return None
    if node.op_type == "Div" and (len(node.input) != 2 or not _is(g.scalar(node.input[0]), 1.0)):
        return None
    sqrt = g.node(node.input[-1], "Sqrt")
    return None if sqrt is None else (sqrt, node)


def _over_sqrt(g: _Graph, value: str) -> list[tuple[str, tuple[onnx.NodeProto, ...]]]:
    """value = n / Sqrt(a), spelled Div(n, Sqrt(a)) or Mul(n, 1 / Sqrt(a)): each reading as
    (n, the nodes from Sqrt to value's)."""
    node = g.node(value, "Mul", "Div")
    if node is None or len(node.input) != 2:
        return []
    if node.op_type == "Div":
        sqrt = g.node(node.input[1], "Sqrt")
        return [] if sqrt is None else [(node.input[0], (sqrt, node))]
    readings = []
    for n, other in _binary_operands(node):
        inverse = _reciprocal_sqrt(g, other)
        if inverse is not None:
            readings.append((n, (*inverse, node)))
    return readings


def _rms_normalized(g: _Graph, value: str) -> _Match | None:
    """value = x / sqrt(mean(x^2) + eps) over the last axes, as x * rsqrt(...) or a Div:
    how torch's exporters write an RMSNorm (LLaMA's, T5's) below opset 23."""
    for x, tail in _over_sqrt(g, value):
        add = g.node(tail[0].input[0], "Add")
        found = _mean_square_plus_eps(g, add, x)
        if found is not None:
            square, var_mean, axes, eps = found
            return _Match(x, (square, var_mean, add, *tail), attrs=(*axes, ("eps", eps)))
    return None


def _float_cast(g: _Graph, value: str) -> onnx.NodeProto | None:
    """A Cast to float32 that produced ``value``."""
    node = g.node(value, "Cast")
    return node if node is not None and _attr(node, "to") == onnx.TensorProto.FLOAT else None


def _rms_norm(g: _Graph, end: onnx.NodeProto) -> _Match | None:
    """normalized(x) * scale, the scale optional. torch's legacy exporter writes LLaMA's
    ``weight * (x * rsqrt(...)).to(dtype)`` with Cast(to=float) around the normalisation; the
    one after it is taken into the chain only where x itself comes from a Cast to float, so it
    changes nothing."""
    if end.op_type == "Mul":
        for inner, scale in _binary_operands(end):
            cast = _float_cast(g, inner)
            found = _rms_normalized(g, cast.input[0] if cast is not None else inner)
            if found is None or (cast is not None and _float_cast(g, found.x) is None):
                continue
            nodes = (*found.nodes, *((cast,) if cast is not None else ()), end)
            if scale not in {out for node in nodes for out in node.output}:  # the scale is not the chain's own
                return _Match(found.x, nodes, (scale,), found.attrs)
    return _rms_normalized(g, end.output[0])


def _normalized_axes(x, dims: int | None, axes: tuple[int, ...] | None, first_axis: int | None) -> tuple[int, ...]:
    """The axes of x a fused norm averages over (see _mean_axes), now that x's rank is known."""
    if dims is not None:
        return tuple(range(x.dim() - dims, x.dim()))
    if first_axis is not None:
        return tuple(range(first_axis, x.dim()))
    if any(a >= x.dim() for a in axes):
        raise ValueError(f"a normalisation averages over axes {list(axes)} of a rank-{x.dim()} input")
    return tuple(axes)


def _as_shape(param, shape: tuple[int, ...], rank: int):
    """param viewed as ``shape`` where it is that shape, possibly after leading 1s that add no
    rank beyond x's (tf2onnx stores a LayerNorm's gamma as [1, 1, C]), else None."""
    if param is None or param.dim() > rank:
        return None
    lead = param.dim() - len(shape)
    if lead < 0 or tuple(param.shape[lead:]) != shape or any(d != 1 for d in param.shape[:lead]):
        return None
    return param.reshape(shape)


def rms_norm(x, scale=None, *, eps: float, dims: int | None = None, axes: tuple[int, ...] | None = None,
             first_axis: int | None = None):
    over = _normalized_axes(x, dims, axes, first_axis)
    shape = tuple(x.shape[a] for a in over)
    if over and over == tuple(range(x.dim() - len(over), x.dim())):
        weight = _as_shape(scale, shape, x.dim())
        if weight is not None or scale is None:
            return F.rms_norm(x, shape, weight, eps)
        y = F.rms_norm(x, shape, eps=eps)  # a scale that broadcasts some other way
    else:  # not the trailing axes: what the nodes compute, in one place
        y = x * torch.rsqrt((x * x).mean(over, keepdim=True) + eps) if over else x * (x * x + eps).rsqrt()
    return y if scale is None else y * scale


KERNELS["rms_norm"] = rms_norm


def _check_identity_view(x, over: tuple[int, ...], view: tuple[int, ...]) -> None:
    """A Reshape of the mean to ``view`` (see _mean_view) must give the mean's own shape."""
    shape = [1 if a in over else d for a, d in enumerate(x.shape)]
    wanted = [shape[i] if d == 0 and i < len(shape) else d for i, d in enumerate(view)]
    if wanted.count(-1) == 1:
        known = math.prod(d for d in wanted if d != -1)
        wanted[wanted.index(-1)] = math.prod(shape) // known if known else -1
    if wanted != shape:
        raise ValueError(f"the LayerNorm's mean of shape {shape} is reshaped to {list(view)}, which is not its own shape")


def layer_norm(x, scale=None, shift=None, *, eps: float, dims: int | None = None,
               axes: tuple[int, ...] | None = None, first_axis: int | None = None,
               mean_view: tuple[int, ...] | None = None):
    over = _normalized_axes(x, dims, axes, first_axis)
    if mean_view is not None:
        _check_identity_view(x, over, mean_view)
    shape = tuple(x.shape[a] for a in over)
    if over and over == tuple(range(x.dim() - len(over), x.dim())):
        weight, bias = _as_shape(scale, shape, x.dim()), _as_shape(shift, shape, x.dim())
        if (weight is not None or scale is None) and (bias is not None or shift is None):
            return F.layer_norm(x, shape, weight, bias, eps)
        y = F.layer_norm(x, shape, eps=eps)  # a scale or shift that broadcasts some other way
    else:  # not the trailing axes (or none: a mean over no axes is x itself)
        centred = x - x.mean(over, keepdim=True) if over else x - x
        variance = (centred * centred).mean(over, keepdim=True) if over else centred * centred
        y = centred * torch.rsqrt(variance + eps)
    if scale is not None:
        y = y * scale
    return y if shift is None else y + shift


KERNELS["layer_norm"] = layer_norm


# kind -> matcher, tried in this order on every node as the possible end of a chain
PATTERNS: dict[str, Callable[[_Graph, onnx.NodeProto], _Match | None]] = {
    "hardswish": _hardswish,
    "silu": _silu,
    "gelu": _gelu,
    "gelu_tanh": _gelu_tanh,
    "layer_norm": lambda g, end: _layer_norm(g, end) or _keras_layer_norm(g, end),
    "rms_norm": _rms_norm,
}


def find_fusions(nodes: Sequence[onnx.NodeProto], constant: Callable[[str], np.ndarray | None],
                 opsets: dict[str, int], graph_outputs: Iterable[str]) -> list[Fusion]:
    """The chains among ``nodes`` (graph order, Constant nodes excluded) that can run fused.

    ``constant(name)`` gives a stored constant's value, or None for anything else (computed
    values, and tuned parameters, which must stay visible to the optimizer as they are).
    """
    g = _Graph(nodes, constant, opsets)
    consumers: dict[str, list[int]] = {}
    for node in nodes:
        for name in node.input:
            if name:
                consumers.setdefault(name, []).append(id(node))
    outputs = set(graph_outputs)
    taken: set[int] = set()
    fusions = []
    for end in reversed(nodes):  # from the last node, so the longest chain ending there wins
        if end.domain not in ("", "ai.onnx") or id(end) in taken or len(end.output) != 1:
            continue
        for kind, matcher in PATTERNS.items():
            match = matcher(g, end)
            if match is None:
                continue
            members = {id(n) for n in match.nodes}
            floats = [g.constant(name) for node in match.nodes for name in node.input if name not in match.extra]
            rank = max((c.ndim for c in floats if c is not None and c.dtype.kind == "f"), default=0)
            fusion = Fusion(kind, match.x, end.output[0], match.nodes, match.extra, match.attrs, rank)
            private = all(name not in outputs and set(consumers.get(name, [])) <= members
                          for name in fusion.hidden)
            if private and not members & taken and all(len(n.output) == 1 for n in match.nodes):
                fusions.append(fusion)
                taken |= members
                break
    return fusions[::-1]
