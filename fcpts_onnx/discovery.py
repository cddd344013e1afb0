"""Finding the prunable weights of an exported graph, wherever they are stored.

A prunable weight is the constant weight operand of a Conv, ConvTranspose, Gemm or MatMul
node, or the input (W) or recurrence (R) weights of an RNN, GRU or LSTM node. Exporters
store it as an initializer, as the output of a Constant node, behind one or more Identity
nodes, or share one tensor between several nodes; all of these resolve
to one :class:`PrunableWeight` that knows where its values live, so write-back changes
exactly that tensor and nothing else. Weights behind Transpose nodes (dynamo's unoptimised
Linear, TensorFlow-layout kernels) or Cast-to-float nodes (fp16/bf16 storage) are followed
to their stored tensor. Nodes inside If, Loop and Scan bodies read weights like the main
graph's: stored outside the body or in it (``PrunableWeight.body`` and ``Consumer.body`` give
the path into the bodies).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import OptionError, UnsupportedModelError

RECURRENT_OP_TYPES = ("LSTM", "GRU", "RNN")
# onnxruntime's offline optimizer (ORT_ENABLE_EXTENDED) writes these com.microsoft ops in place
# of a plain one plus an activation, transpose or scale; the weight is the plain op's weight.
CONTRIB_DOMAIN = "com.microsoft"
# com.microsoft Attention multiplies its input by one packed [input_hidden, Q + K + V hidden]
# weight first: the three projections of the unfused graph, read as MatMul's right operand.
FUSED_OP_TYPES = {"FusedConv": "Conv", "FusedGemm": "Gemm", "FusedMatMul": "MatMul", "Attention": "MatMul"}
PRUNABLE_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Einsum", *RECURRENT_OP_TYPES, *FUSED_OP_TYPES)


def einsum_weight_axes(equation: str, weight_input: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """For an Einsum of two operands that multiplies by a weight, the weight's axes that index
    the outputs and those it sums against the other operand: tf.keras's EinsumDense writes
    ``abc,cde->abde`` (outputs d, e; summed c). None where the weight is not used so: an implicit
    output, an ellipsis or a repeated letter in the weight's term, an axis summed on its own, or
    one shared with the other operand's output axes (a batch axis: not a linear layer's)."""
    eq = equation.replace(" ", "")
    if eq.count("->") != 1:
        return None
    inputs, out = eq.split("->")
    terms = inputs.split(",")
    if len(terms) != 2 or weight_input not in (0, 1):
        return None
    weight, other = terms[weight_input], terms[1 - weight_input]
    if not weight.isalpha() or len(set(weight)) != len(weight):
        return None
    outputs = tuple(i for i, c in enumerate(weight) if c in out and c not in other)
    summed = tuple(i for i, c in enumerate(weight) if c not in out and c in other)
    if not outputs or not summed or len(outputs) + len(summed) != len(weight):
        return None
    return outputs, summed


def plain_op_type(op_type: str, domain: str = "") -> str | None:
    """The standard op a prunable node multiplies like (FusedConv -> Conv), None if not prunable."""
    if domain in ("", "ai.onnx"):
        return op_type if op_type in PRUNABLE_OP_TYPES and op_type not in FUSED_OP_TYPES else None
    if domain == CONTRIB_DOMAIN:
        return FUSED_OP_TYPES.get(op_type)
    return None

# Weight dtypes we can prune: the value is read as float32 for ranking and written back
# in its own dtype.
FLOAT_TYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.DOUBLE: "float64",
}

QUANTIZED_OP_TYPES = {
    "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm", "QAttention",
    "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits", "QLinearAdd", "QLinearMul",
    "DynamicQuantizeLSTM",
}

SUBGRAPH_OP_TYPES = ("If", "Loop", "Scan")
# the control flow the trainable form runs, and the attributes that hold its bodies
RUN_BODIES = {"If": ("then_branch", "else_branch"), "Loop": ("body",), "Scan": ("body",)}


def run_bodies(node: onnx.NodeProto) -> tuple[str, ...]:
    """The body attributes of an If, Loop or Scan node (the control flow that is run and pruned); ()."""
    return RUN_BODIES.get(node.op_type, ()) if node.domain in ("", "ai.onnx") else ()


@dataclass(frozen=True)
class Consumer:
    """One node input that reads a weight.

    ``perm``: when the weight reaches the node through Transpose nodes, the node sees the
    stored tensor with its axes permuted: the node's axis i is the stored axis perm[i].
    """

    node_name: str
    op_type: str
    input_index: int
    node_index: int
    perm: tuple[int, ...] | None = None
    via: tuple[str, ...] = ()  # Transpose/Reshape/Cast nodes between the stored tensor and this input
    # the shape a Reshape gives the stored tensor before any Transpose (tf.keras's attention output
    # projection: [1, 1, 32, 4, 8] read as [32, 32]); perm then permutes this layout
    reshaped: tuple[int, ...] | None = None
    # where the node sits when it is inside If bodies: (If node's index, "then_branch" or
    # "else_branch") from the main graph inwards; node_index then counts in the innermost body
    body: tuple[tuple[int, str], ...] = ()

    def view_shape(self, stored_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The weight's shape as this node reads it."""
        layout = self.layout(stored_shape)
        return layout if self.perm is None else tuple(layout[a] for a in self.perm)

    def layout(self, stored_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The stored tensor's shape after the Reshape between (the stored shape without one)."""
        return stored_shape if self.reshaped is None else self.reshaped

    def stored_axis(self, axis: int) -> int:
        """The axis behind this node's ``axis`` in the stored tensor viewed as ``layout``."""
        return axis if self.perm is None else self.perm[axis]


def body_graph(graph: onnx.GraphProto, body: tuple[tuple[int, str], ...]) -> onnx.GraphProto:
    """The If body that ``body`` leads to from ``graph``: (If node's index, "then_branch" or
    "else_branch") pairs, outermost first; ``graph`` itself for ()."""
    for node_index, branch in body:
        graph = next(a.g for a in graph.node[node_index].attribute if a.name == branch)
    return graph


def locate_tensor(model: onnx.ModelProto, storage: str, index: int,
                  body: tuple[tuple[int, str], ...] = ()) -> onnx.TensorProto:
    """The TensorProto at ``graph.initializer[index]`` or in ``graph.node[index]``'s value, in
    the main graph or the If body that ``body`` leads to."""
    graph = body_graph(model.graph, body)
    if storage == "initializer":
        return graph.initializer[index]
    node = graph.node[index]
    for attr in node.attribute:
        if attr.name == "value":
            return attr.t
    raise AssertionError(f"Constant node {node.name!r} has no tensor value attribute")


@dataclass
class PrunableWeight:
    """A constant weight tensor that some Conv/ConvTranspose/Gemm/MatMul node multiplies by,
    or the W or R of an RNN/GRU/LSTM node ([directions, gates * hidden, input or hidden]).

    ``storage`` and ``index`` locate the TensorProto: ``graph.initializer[index]`` for
    "initializer", the ``value`` attribute of ``graph.node[index]`` for "constant".
    """

    name: str
    storage: str
    index: int
    shape: tuple[int, ...]
    dtype: str
    consumers: list[Consumer] = field(default_factory=list)
    macs: int | None = None  # per inference; None when shapes are unknown
    external: bool = False
    body: tuple[tuple[int, str], ...] = ()  # stored inside this If body (see body_graph); () in the main graph

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def op_type(self) -> str:
        return self.consumers[0].op_type

    @property
    def matrix_shape(self) -> tuple[int, ...]:
        """The shape of one weight matrix, for ERK's fan-in + fan-out rule: a recurrent weight
        holds one [gates * hidden, input] matrix per direction, and the directions are not a
        kernel axis (counted as one, a bidirectional layer would get half its ERK density)."""
        shape = self.consumers[0].layout(self.shape) if self.consumers else self.shape
        return shape[1:] if self.op_type in RECURRENT_OP_TYPES else shape

    @property
    def node_names(self) -> list[str]:
        return [c.node_name for c in self.consumers]

    @property
    def where(self) -> str:
        kind = "initializer" if self.storage == "initializer" else "Constant node"
        kind += " in an If body" if self.body else ""
        ops = sorted({op for c in self.consumers for op in c.via})
        via = f" via {'/'.join(ops)}" if ops else ""
        return kind + via + (" (external data)" if self.external else "")

    def tensor(self, model: onnx.ModelProto) -> onnx.TensorProto:
        """The TensorProto holding this weight in ``model`` (the loaded model or a copy of it)."""
        return locate_tensor(model, self.storage, self.index, self.body)

    def values(self, model: onnx.ModelProto) -> np.ndarray:
        return numpy_helper.to_array(self.tensor(model))


@dataclass(frozen=True)
class SkippedWeight:
    """A weight operand that is not pruned, and why."""

    name: str
    op_type: str
    node_name: str
    reason: str


@dataclass
class Discovery:
    """Everything discovery found: what will be pruned and what was left alone."""

    weights: list[PrunableWeight]
    skipped: list[SkippedWeight]

    @property
    def total_params(self) -> int:
        return sum(w.size for w in self.weights)


def consumer_node(graph: onnx.GraphProto, consumer: Consumer) -> onnx.NodeProto:
    """The node a consumer names, inside If bodies too."""
    return body_graph(graph, consumer.body).node[consumer.node_index]


@dataclass(frozen=True)
class ConstantSource:
    """Where a constant tensor name comes from: the main graph, or the If body ``body`` leads to."""

    storage: str  # "initializer" | "constant"
    index: int
    name: str
    body: tuple[tuple[int, str], ...] = ()

    def tensor(self, model: onnx.ModelProto) -> onnx.TensorProto:
        return locate_tensor(model, self.storage, self.index, self.body)

    def tensor_dims(self, graph: onnx.GraphProto) -> tuple[int, ...]:
        if self.storage == "initializer":
            return tuple(graph.initializer[self.index].dims)
        node = graph.node[self.index]
        return tuple(next(a.t.dims for a in node.attribute if a.name == "value"))


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}_{index}"


class GraphIndex:
    """Name lookups over a graph: initializers, producers, Constant nodes. A body's index
    (``parent`` set) looks up the names it does not define in the scopes around it."""

    def __init__(self, graph: onnx.GraphProto, opset_imports: Sequence[onnx.OperatorSetIdProto] = (),
                 parent: GraphIndex | None = None, path: tuple[tuple[int, str], ...] = ()):
        self.parent = parent
        self.path = path  # from the main graph to this one, as ConstantSource.body spells it
        self.initializers = {t.name: i for i, t in enumerate(graph.initializer)}
        self.producers: dict[str, int] = {}
        for i, node in enumerate(graph.node):
            for out in node.output:
                if out:
                    self.producers[out] = i
        self.graph = graph
        # the model's opsets, for evaluating constant subgraphs; without them nothing is evaluated
        self.opset_imports = list(opset_imports)
        self._static: dict[str, np.ndarray | None] = {}

    def resolve(self, name: str, through_views: bool = False) -> tuple[ConstantSource | None, str | None]:
        """Follow Identity nodes back to a constant; returns (source, producer op that stopped us).

        ``through_views`` also follows Transpose and Cast-to-float nodes: they change neither
        which values are zero nor their magnitude order, so pruning the stored tensor prunes
        what the reader sees (how dynamo writes Linear without its optimizer, how fp16/bf16
        storage is cast up for fp32 compute)."""
        source, stopped_by = (self.resolve_view(name) if through_views else self._walk(name, False))[:2]
        return source, stopped_by

    def resolve_view(self, name: str) -> tuple[ConstantSource | None, str | None, tuple[int, ...] | None,
                                                tuple[str, ...], tuple[int, ...] | None]:
        """Like resolve through views; also returns the composed permutation (the reader's
        axis i is the stored axis perm[i]; None without Transpose), the view ops passed, and the
        shape a Reshape gives the stored tensor (None without one; perm permutes that layout)."""
        source, stopped_by, perms, via, target = self._walk(name, True)
        reshaped = None
        if source is not None and target is not None:
            reshaped = _reshaped(tuple(source.tensor_dims(self._graph_at(source.body))), target)
            if reshaped is None:
                return None, "Reshape", None, via, None
        if source is None or not perms:
            return source, stopped_by, None, via, reshaped
        rank = len(reshaped if reshaped is not None else source.tensor_dims(self._graph_at(source.body)))
        composed = list(range(rank))
        for perm in perms:  # nearest the reader first: P_new[i] = p[P[i]]
            p = list(reversed(range(rank))) if perm is None else perm
            if sorted(p) != list(range(rank)):
                return None, "Transpose", None, via, None  # a perm that does not fit the tensor: not ours to read
            composed = [p[a] for a in composed]
        return source, None, tuple(composed), via, reshaped

    def _graph_at(self, path: tuple[tuple[int, str], ...]) -> onnx.GraphProto:
        index = self
        while index.path != path:
            index = index.parent
        return index.graph

    def static_value(self, name: str, limit: int = 64) -> np.ndarray | None:
        """The value of ``name`` where constants alone decide it (tf2onnx computes some Reshape
        targets with Shape, Gather and Concat of stored tensors), evaluated by onnx's reference
        evaluator over at most ``limit`` nodes; None where a graph input or anything else
        reaches it."""
        if name in self._static:
            return self._static[name]
        value = None
        order: list[int] = []
        stack, seen = [name], set()
        while stack and len(order) <= limit:
            value_name = stack.pop()
            if value_name in seen or value_name in self.initializers or not value_name:
                continue
            seen.add(value_name)
            if value_name not in self.producers:
                order = []
                break
            i = self.producers[value_name]
            node = self.graph.node[i]
            if node.domain not in ("", "ai.onnx") or node.op_type in SUBGRAPH_OP_TYPES:
                order = []
                break
            order.append(i)
            stack.extend(node.input)
        if order and len(order) <= limit and self.opset_imports:
            nodes = [self.graph.node[i] for i in sorted(set(order))]
            needed = {n for node in nodes for n in node.input} & set(self.initializers)
            graph = onnx.helper.make_graph(nodes, "static", [], [onnx.ValueInfoProto(name=name)],
                                           [self.graph.initializer[self.initializers[n]] for n in sorted(needed)])
            try:
                from onnx.reference import ReferenceEvaluator

                model = onnx.helper.make_model(graph, opset_imports=self.opset_imports)
                value = np.asarray(ReferenceEvaluator(model).run(None, {})[0])
            except Exception:  # not evaluable here: the weight stays unread, as before
                value = None
        elif name in self.initializers:
            value = onnx.numpy_helper.to_array(self.graph.initializer[self.initializers[name]])
        self._static[name] = value
        return value

    def _loop_passthrough(self, name: str) -> str | None:
        """Where this index is a Loop's body and ``name`` a loop-carried input that the body hands
        back unchanged (through Identity nodes at most), the enclosing graph's initial value for
        it; None otherwise. paddle2onnx passes a decoder's weights into its Loop this way (SLANet:
        the attention, GRU cell and heads, 30% of the model's weights), so the weight every
        iteration reads is that initial value."""
        if self.parent is None or not self.path:
            return None
        owner = self.parent.graph.node[self.path[-1][0]]
        if owner.op_type != "Loop" or owner.domain not in ("", "ai.onnx"):
            return None
        inputs = [i.name for i in self.graph.input]
        if name not in inputs:
            return None
        k = inputs.index(name)
        if k < 2 or k >= len(owner.input) or k - 1 >= len(self.graph.output) or not owner.input[k]:
            return None  # the iteration count, the condition, or no initial value
        out = self.graph.output[k - 1].name
        while out != name and out in self.producers:
            node = self.graph.node[self.producers[out]]
            if node.op_type != "Identity" or node.domain not in ("", "ai.onnx") or not node.input:
                return None
            out = node.input[0]
        return owner.input[k] if out == name else None

    def _walk(self, name: str, through_views: bool):
        seen = set()
        perms: list[list[int] | None] = []
        via: list[str] = []
        target = None  # a Reshape's shape, where one stands between
        while name not in seen:
            seen.add(name)
            if name in self.initializers:
                return ConstantSource("initializer", self.initializers[name], name, self.path), None, perms, \
                    tuple(via), target
            if name not in self.producers:
                carried = self._loop_passthrough(name)
                if carried is not None:  # a Loop state the body passes on unchanged: its initial value
                    name = carried
                if self.parent is None or (carried is None and name in {i.name for i in self.graph.input}):
                    return None, None, perms, tuple(via), target  # a graph input or an outer-scope name
                # an If body reading an outer value: go on there (views in between compose)
                source, stopped_by, outer_perms, outer_via, outer_target = self.parent._walk(name, through_views)
                if target is not None and outer_target is not None:
                    return None, "Reshape", perms, tuple(via), None
                if target is not None and outer_perms:  # a Transpose before the Reshape, as above
                    return None, "Transpose", perms, tuple(via), None
                return source, stopped_by, perms + outer_perms, tuple(via) + outer_via, \
                    target if target is not None else outer_target
            node = self.graph.node[self.producers[name]]
            standard = node.domain in ("", "ai.onnx")
            if node.op_type == "Identity" and standard and node.input:
                name = node.input[0]
                continue
            if through_views and node.op_type == "Transpose" and standard and node.input:
                if target is not None:  # a Transpose before the Reshape: its layout is not ours to map
                    return None, "Transpose", perms, tuple(via), None
                perms.append(next((list(a.ints) for a in node.attribute if a.name == "perm"), None))
                via.append("Transpose")
                name = node.input[0]
                continue
            if through_views and node.op_type == "Reshape" and standard and len(node.input) == 2 and target is None \
                    and not next((a.i for a in node.attribute if a.name == "allowzero"), 0):
                shape = self.static_value(node.input[1])
                if shape is None or shape.dtype.kind not in "iu" or shape.ndim != 1:
                    return None, "Reshape", perms, tuple(via), None
                target = tuple(int(d) for d in shape)
                via.append("Reshape")
                name = node.input[0]
                continue
            if through_views and node.op_type == "Cast" and standard and node.input and \
                    next((a.i for a in node.attribute if a.name == "to"), None) in FLOAT_TYPES:
                via.append("Cast")
                name = node.input[0]
                continue
            if node.op_type == "Constant" and standard:
                if any(a.name == "value" for a in node.attribute):
                    return ConstantSource("constant", self.producers[name], node.output[0], self.path), None, perms, \
                        tuple(via), target
                return None, "Constant", perms, tuple(via), None
            return None, node.op_type, perms, tuple(via), None
        return None, None, perms, tuple(via), None


def _reshaped(stored: tuple[int, ...], target: tuple[int, ...]) -> tuple[int, ...] | None:
    """ONNX Reshape's output shape for a tensor of shape ``stored`` (0 copies, one -1 infers);
    None where the shape does not fit."""
    dims = [stored[i] if d == 0 and i < len(stored) else d for i, d in enumerate(target)]
    total = int(np.prod(stored, dtype=np.int64))
    if dims.count(-1) == 1:
        known = int(np.prod([d for d in dims if d != -1], dtype=np.int64))
        if known <= 0 or total % known:
            return None
        dims[dims.index(-1)] = total // known
    if any(d < 0 for d in dims) or int(np.prod(dims, dtype=np.int64)) != total:
        return None
    return tuple(dims)


def _weight_input_indices(node: onnx.NodeProto, index: GraphIndex) -> list[int]:
    """Which inputs of a prunable node hold its weights (at most one; W and R for recurrent ops)."""
    if len(node.input) < 2:
        return []
    op_type = plain_op_type(node.op_type, node.domain)
    if op_type in RECURRENT_OP_TYPES:
        # W (input weights) and R (recurrence weights) are matrices each step multiplies by.
        return [k for k in (1, 2) if k < len(node.input) and node.input[k]
                and index.resolve(node.input[k], through_views=True)[0] is not None]
    if op_type in ("Conv", "ConvTranspose"):
        # Only a constant weight (initializer/Constant, maybe behind Identity or Transpose) is prunable.
        return [1] if index.resolve(node.input[1], through_views=True)[0] is not None else []
    if op_type == "MatMul" and node.op_type == "Attention":  # com.microsoft: input 1 is the packed weight
        return [1] if index.resolve(node.input[1], through_views=True)[0] is not None else []
    if op_type == "Einsum":
        equation = next((a.s.decode() for a in node.attribute if a.name == "equation"), "")
        for k in (1, 0):  # the constant side, if the equation uses it as a weight
            if len(node.input) == 2 and index.resolve(node.input[k], through_views=True)[0] is not None:
                return [k] if einsum_weight_axes(equation, k) is not None else []
        return []
    if op_type in ("Gemm", "MatMul"):
        # The constant side is the weight; right is the usual one (x @ W).
        right, _ = index.resolve(node.input[1], through_views=True)
        if right is not None:
            return [1]
        left, _ = index.resolve(node.input[0], through_views=True)
        if left is not None:
            return [0]
        return []
    return []


def _dequantize_fed(node: onnx.NodeProto, index: GraphIndex) -> bool:
    for name in node.input[1:3] if node.op_type in RECURRENT_OP_TYPES else node.input[:2]:
        _, stopped_by = index.resolve(name)
        if stopped_by in ("DequantizeLinear", "QuantizeLinear"):
            return True
    return False


def refuse_quantized(model: onnx.ModelProto) -> None:
    """Raise when the graph is already quantized: pruning int8 weights is a different job."""
    index = GraphIndex(model.graph)
    quantized = sorted({n.op_type for n in model.graph.node if n.op_type in QUANTIZED_OP_TYPES})
    qdq = [
        _node_label(n, i) for i, n in enumerate(model.graph.node)
        if plain_op_type(n.op_type, n.domain) is not None and _dequantize_fed(n, index)
    ]
    if quantized or qdq:
        what = ", ".join(quantized) if quantized else f"QDQ-fed weights ({qdq[0]}...)"
        raise UnsupportedModelError(
            f"the model is already quantized ({what}); sparsify the float model first, then quantize it"
        )


def _compile(patterns: Sequence[str]) -> list[re.Pattern]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise OptionError(f"--exclude {pattern!r} is not a valid regular expression ({exc})") from None
    return compiled


def _shape_map(model: onnx.ModelProto,
               input_shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, tuple[int | None, ...]]:
    """Static shapes of every value onnx shape inference can work out (unknown dims as None).

    ``input_shapes`` pins graph inputs with dynamic dims (e.g. from the calibration data),
    so dynamic-shape exports get MAC counts too.
    """
    if input_shapes:
        pinned = onnx.ModelProto()
        pinned.CopyFrom(model)
        for vi in pinned.graph.input:
            if vi.name in input_shapes and vi.type.tensor_type.HasField("shape"):
                dims = vi.type.tensor_type.shape.dim
                if len(dims) == len(input_shapes[vi.name]):
                    for d, value in zip(dims, input_shapes[vi.name]):
                        d.dim_value = int(value)
        model = pinned
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # shape inference is a best effort: MACs become unknown, nothing else
        return {}
    shapes = {}

    def collect(graph: onnx.GraphProto) -> None:  # If bodies' values too (names are unique across scopes)
        for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
            tt = vi.type.tensor_type
            if tt.HasField("shape") and vi.name not in shapes:
                shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
        for node in graph.node:
            for attr in node.attribute:
                if attr.name in run_bodies(node) and attr.type == onnx.AttributeProto.GRAPH:
                    collect(attr.g)

    collect(inferred.graph)
    return shapes


def _node_macs(node: onnx.NodeProto, weight_shape: tuple[int, ...], weight_input: int,
               shapes: dict[str, tuple[int | None, ...]], batch_pinned: bool = False) -> int | None:
    """Multiply-accumulates of one node per inference, the batch dimension counted as 1.

    ``batch_pinned``: the graph inputs were pinned to batch 1, so a first axis that shape
    inference still leaves unknown is not the batch (tf2onnx's Dense on a sequence multiplies
    [N * T, C] by W, its row count from Shape ops): the count is then unknown, not T times too
    small, and a measured run can fill it in."""
    def per_inference(shape):
        if shape is None or not shape or (batch_pinned and shape[0] is None):
            return None
        dims = list(shape)
        dims[0] = 1 if dims[0] is None else dims[0]
        if any(d is None for d in dims):
            return None
        return dims

    size = int(np.prod(weight_shape, dtype=np.int64))
    op_type = plain_op_type(node.op_type, node.domain)
    if op_type in RECURRENT_OP_TYPES:
        # Every step multiplies each direction's W by X_t and R by H_t-1: size(W or R) MACs per
        # step and batch item, over the whole sequence (sequence_lens only ever shortens it).
        x = shapes.get(node.input[0])
        if x is None or len(x) != 3:
            return None
        layout = next((a.i for a in node.attribute if a.name == "layout"), 0)
        steps, batch = (x[1], x[0]) if layout else (x[0], x[1])
        return None if steps is None else size * steps * (1 if batch is None else batch)
    if op_type == "Conv":
        out = per_inference(shapes.get(node.output[0]))
        # Each output element takes (C/groups * kernel) MACs; size(W) = M * that.
        return None if out is None else size * int(np.prod(out[2:], dtype=np.int64)) * out[0]
    if op_type == "ConvTranspose":
        inp = per_inference(shapes.get(node.input[0]))
        return None if inp is None else size * int(np.prod(inp[2:], dtype=np.int64)) * inp[0]
    if op_type == "MatMul" and node.op_type == "Attention":  # com.microsoft: every position times the weight
        x = per_inference(shapes.get(node.input[0]))
        return None if x is None else size * int(np.prod(x[:-1], dtype=np.int64))
    out = per_inference(shapes.get(node.output[0]))
    if out is None:
        return None
    if op_type == "Einsum":  # each output element sums over the weight's summed axes
        equation = next((a.s.decode() for a in node.attribute if a.name == "equation"), "")
        axes = einsum_weight_axes(equation, weight_input)
        if axes is None:
            return None
        return int(np.prod(out, dtype=np.int64)) * int(np.prod([weight_shape[a] for a in axes[1]], dtype=np.int64))
    trans = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
    if op_type == "Gemm":
        # K is the contracted dimension of the weight, whichever side it sits on.
        if weight_input == 1:
            k = weight_shape[1] if trans.get("transB", 0) else weight_shape[0]
        else:
            k = weight_shape[0] if trans.get("transA", 0) else weight_shape[1]
        return int(np.prod(out, dtype=np.int64)) * k
    return int(np.prod(out, dtype=np.int64)) * weight_shape[matmul_contracted_axis(trans, weight_input, len(weight_shape))]


def matmul_contracted_axis(attrs: Mapping[str, Any], weight_input: int, rank: int) -> int:
    """The axis of a (Fused)MatMul operand, as the node receives it, that the product sums over (K).

    FusedMatMul reads an operand given as [rows, batch..., cols] as [batch..., rows, cols] when
    transBatchA/B is set, then swaps the last two axes when transA/B is set.
    """
    rows, cols = _matmul_rows_cols(attrs, weight_input, rank)
    return rows if weight_input == 1 else cols  # K: the rows of B, the cols of A


def matmul_output_axis(attrs: Mapping[str, Any], weight_input: int, rank: int) -> int:
    """The axis of a (Fused)MatMul operand, as the node receives it, that indexes the outputs."""
    rows, cols = _matmul_rows_cols(attrs, weight_input, rank)
    return cols if weight_input == 1 else rows


def _matmul_rows_cols(attrs: Mapping[str, Any], weight_input: int, rank: int) -> tuple[int, int]:
    side = "B" if weight_input == 1 else "A"
    rows, cols = (0, rank - 1) if rank >= 3 and attrs.get(f"transBatch{side}", 0) else (rank - 2, rank - 1)
    return (cols, rows) if attrs.get(f"trans{side}", 0) else (rows, cols)


def if_body_nodes(node: onnx.NodeProto, node_index: int, outer: GraphIndex, path: tuple[tuple[int, str], ...] = ()
                  ) -> Iterable[tuple[onnx.NodeProto, int, tuple[tuple[int, str], ...], GraphIndex]]:
    """Every node inside an If's two bodies or a Loop's or Scan's body, nested ones' included:
    (node, its index in its body, the path to that body as Consumer.body spells it, the body's
    index)."""
    for attr in node.attribute:
        if attr.name not in run_bodies(node) or attr.type != onnx.AttributeProto.GRAPH:
            continue
        here = (*path, (node_index, attr.name))
        inner = GraphIndex(attr.g, outer.opset_imports, parent=outer, path=here)
        for j, sub in enumerate(attr.g.node):
            yield sub, j, here, inner
            if run_bodies(sub):
                yield from if_body_nodes(sub, j, inner, here)


def discover(model: onnx.ModelProto, *, exclude: Sequence[str] = (),
             op_types: Sequence[str] | None = None, external: Iterable[str] = ()) -> Discovery:
    """Find the prunable weights of ``model`` and the weight operands left alone.

    Args:
        model: the loaded model, tensor data in memory.
        exclude: regular expressions; a weight is skipped when one matches (re.search) its
            tensor name or the name of any node that reads it.
        op_types: restrict pruning to these op types (default: all of PRUNABLE_OP_TYPES).
        external: names of tensors stored as external data in the input file.
    """
    refuse_quantized(model)
    patterns = _compile(exclude)
    if op_types is not None:
        unknown = sorted(set(op_types) - set(PRUNABLE_OP_TYPES))
        if unknown:
            raise OptionError(
                f"--op-types {','.join(unknown)} not prunable; choose from {','.join(PRUNABLE_OP_TYPES)}"
            )
    selected_ops = set(op_types) if op_types is not None else set(PRUNABLE_OP_TYPES)
    external = set(external)
    graph = model.graph
    index = GraphIndex(graph, model.opset_import)

    by_source: dict[ConstantSource, PrunableWeight] = {}
    skipped: list[SkippedWeight] = []
    # every node that may read a weight: the main graph's, and those in If bodies (their
    # main-graph weights are pruned like any; what a body stores itself is listed as skipped)
    readers: list[tuple[onnx.NodeProto, int, tuple[tuple[int, str], ...], GraphIndex]] = []
    for i, node in enumerate(graph.node):
        if run_bodies(node):
            readers.extend(if_body_nodes(node, i, index))
            continue
        readers.append((node, i, (), index))
    for node, i, body, scope in readers:
        label = _node_label(node, i)
        if plain_op_type(node.op_type, node.domain) is None:
            continue
        for k in _weight_input_indices(node, scope):
            source, _, perm, via, reshaped = scope.resolve_view(node.input[k])
            tensor = source.tensor(model)
            shape = tuple(int(d) for d in tensor.dims)
            consumer = Consumer(label, node.op_type, k, i, perm, via, reshaped, body)
            reason = None
            if tensor.data_type not in FLOAT_TYPES:
                reason = f"{onnx.TensorProto.DataType.Name(tensor.data_type)} weight; only float weights are pruned"
            elif len(shape) < 2:
                reason = "weight has fewer than 2 dimensions"
            elif node.op_type not in selected_ops and FUSED_OP_TYPES.get(node.op_type) not in selected_ops:
                # Naming Conv keeps selecting the model's Convs after onnxruntime fused them.
                reason = f"{node.op_type} not in --op-types"
            elif any(p.search(source.name) or p.search(label) for p in patterns):
                reason = "matches --exclude"
            if reason is not None:
                skipped.append(SkippedWeight(source.name, node.op_type, label, reason))
                continue
            # Every reader is checked against --exclude/--op-types, not only the first one.
            if source in by_source:
                by_source[source].consumers.append(consumer)
                continue
            if any(other.name == source.name for other in by_source):
                # names key the weights everywhere; sibling If bodies may reuse one
                skipped.append(SkippedWeight(source.name, node.op_type, label,
                                             "another stored tensor has the same name; not pruned"))
                continue
            by_source[source] = PrunableWeight(
                name=source.name, storage=source.storage, index=source.index, shape=shape,
                dtype=FLOAT_TYPES[tensor.data_type], consumers=[consumer],
                external=source.name in external, body=source.body,
            )

    weights = list(by_source.values())
    # A weight read by any excluded node is left whole: pruning it would change what that
    # other reader sees.
    excluded_names = {s.name for s in skipped}
    kept = []
    for w in weights:
        if w.name in excluded_names:
            skipped.append(SkippedWeight(w.name, w.op_type, w.consumers[0].node_name,
                                         "shared with a node that is not pruned"))
            continue
        kept.append(w)
    assign_macs(model, kept)
    return Discovery(weights=kept, skipped=skipped)


def _measured_shapes(model: onnx.ModelProto, names: set[str],
                     feed: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Shapes of ``names`` as onnxruntime computes them on ``feed`` (for what inference misses).

    Exposes the values as extra graph outputs of a copy and runs it once. Best effort:
    any failure (a graph over 2 GiB, an op onnxruntime refuses) leaves the shapes unknown.
    """
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    wanted = sorted(names)
    for name in wanted:
        if name not in existing:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 4
        ort.set_default_logger_severity(4)  # run-time errors are reported by us, in one line
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        quiet = ort.RunOptions()
        quiet.log_severity_level = 4
        values = session.run(wanted, dict(feed), quiet)
    except Exception:
        return {}
    return {name: tuple(np.shape(v)) for name, v in zip(wanted, values)}


def assign_macs(model: onnx.ModelProto, weights: list[PrunableWeight],
                input_shapes: Mapping[str, Sequence[int]] | None = None,
                feed: Mapping[str, np.ndarray] | None = None) -> None:
    """Set each weight's MACs per inference (batch 1), None where a shape stays unknown.

    Shapes come from onnx shape inference, with the graph inputs pinned to ``input_shapes``;
    where that cannot resolve a layer (Reshape fed by Shape ops, common in exports), one
    onnxruntime run on ``feed`` (a batch-1 sample) measures them.
    """
    shapes = _shape_map(model, input_shapes)

    def node_macs(w: PrunableWeight) -> list[int | None]:
        return [_node_macs(consumer_node(model.graph, c), c.view_shape(w.shape), c.input_index, shapes,
                           batch_pinned=bool(input_shapes))
                for c in w.consumers]

    if feed is not None:
        missing = set()
        for w in weights:
            for c, macs in zip(w.consumers, node_macs(w)):
                if macs is None and not c.body:  # values inside a body cannot be made graph outputs
                    node = model.graph.node[c.node_index]
                    missing.update({node.input[0], node.output[0]})
        if missing:
            shapes.update(_measured_shapes(model, missing, feed))
    for w in weights:
        macs = node_macs(w)
        w.macs = None if any(m is None for m in macs) else sum(macs)
