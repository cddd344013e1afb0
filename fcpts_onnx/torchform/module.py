"""An ONNX graph as a torch.nn.Module that computes the same function, differentiably.

Every prunable weight and every tunable float tensor (biases, normalisation scale and
shift) is an ``nn.Parameter`` that knows its ONNX tensor (:class:`TensorSource`), so the
learner's results write back exactly. Other constants are buffers. Nodes run in the
graph's (topological) order, each through the operator registry; values are dropped after
their last use to keep memory close to the native module's.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from torch import nn

from ..discovery import (
    CONTRIB_DOMAIN,
    ConstantSource,
    GraphIndex,
    PrunableWeight,
    body_graph,
    einsum_weight_axes,
    if_body_nodes,
    locate_tensor,
    plain_op_type,
    run_bodies,
)
from ..errors import FcptsError, UnsupportedModelError
from . import ops  # noqa: F401  (registers the operators)
from .dtypes import to_torch
from .fusion import KERNELS, Fusion, find_fusions
from .registry import NodeContext, OpFn, decode_attribute, resolve

# Which inputs of which ops are tunable besides the prunable weights, and their role.
_TUNABLE_INPUTS = {
    "Conv": {2: "bias"}, "ConvTranspose": {2: "bias"}, "Gemm": {2: "bias"},
    "LSTM": {3: "bias"}, "GRU": {3: "bias"}, "RNN": {3: "bias"},
    "BatchNormalization": {1: "norm", 2: "norm"}, "LayerNormalization": {1: "norm", 2: "norm"},
    "InstanceNormalization": {1: "norm", 2: "norm"}, "GroupNormalization": {1: "norm", 2: "norm"},
    "RMSNormalization": {1: "norm"}, "SimplifiedLayerNormalization": {1: "norm"},
}
# The same for onnxruntime's fused contrib ops, kept apart: op types are only unique per domain.
_CONTRIB_TUNABLE_INPUTS = {
    "FusedConv": {2: "bias"}, "FusedGemm": {2: "bias"}, "Attention": {2: "bias"},
    # the biases of the MatMuls that onnxruntime's transformer fusions folded in
    "BiasGelu": {1: "bias"}, "FastGelu": {1: "bias"},
    "SkipLayerNormalization": {2: "norm", 3: "norm", 4: "bias"},
    "SkipSimplifiedLayerNormalization": {2: "norm", 3: "bias"},
    "EmbedLayerNormalization": {5: "norm", 6: "norm"},
}


_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def _tunable_inputs(node: onnx.NodeProto) -> dict[int, str]:
    if node.domain in ("", "ai.onnx"):
        return _TUNABLE_INPUTS.get(node.op_type, {})
    if node.domain == CONTRIB_DOMAIN:
        return _CONTRIB_TUNABLE_INPUTS.get(node.op_type, {})
    return {}


class NodeExecutionError(RuntimeError):
    """An operator implementation failed on a node: names the node so the failure can be found."""

    def __init__(self, ctx: NodeContext, cause: Exception):
        self.node_name = ctx.name
        self.op_type = ctx.node.op_type
        first = str(cause).strip().splitlines()[0][:200] if str(cause).strip() else type(cause).__name__
        super().__init__(f"node {ctx.name!r} ({ctx.node.op_type}, opset {ctx.opset}) failed: {first}")


@dataclass(frozen=True)
class TensorSource:
    """The ONNX tensor a parameter came from, for exact write-back."""

    name: str
    storage: str  # "initializer" | "constant"
    index: int
    dtype: str  # numpy dtype name of the stored tensor
    role: str  # "weight" (prunable), "bias" or "norm"
    body: tuple[tuple[int, str], ...] = ()  # the If/Loop/Scan body it is stored in (discovery.body_graph)

    def tensor(self, model: onnx.ModelProto) -> onnx.TensorProto:
        return locate_tensor(model, self.storage, self.index, self.body)


def unsupported_operators(model: onnx.ModelProto) -> list[tuple[str, str, int, int]]:
    """(domain, op_type, opset, count) of every node no registered implementation covers."""
    opsets = {op.domain or "": op.version for op in model.opset_import}
    opsets[""] = opsets.get("", opsets.get("ai.onnx", 1))
    missing: Counter = Counter()

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            domain = node.domain if node.domain not in ("ai.onnx",) else ""
            if node.op_type == "Constant" and domain == "":
                continue  # folded into buffers/parameters when the module is built
            if run_bodies(node):
                for _, body in _bodies(node):
                    visit(body)
                continue
            version = opsets.get(domain, 1)
            if resolve(domain, node.op_type, version) is None:
                missing[(domain or "ai.onnx", node.op_type, version)] += 1

    visit(model.graph)
    return [(d, op, v, n) for (d, op, v), n in sorted(missing.items())]


def _bodies(node: onnx.NodeProto) -> list[tuple[str, onnx.GraphProto]]:
    """An If's (then_branch, else_branch) or a Loop's or Scan's body, with their attribute names."""
    bodies = {a.name: a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH}
    names = run_bodies(node)
    if set(bodies) != set(names):
        raise UnsupportedModelError(f"{node.op_type} node {node.name!r} lacks its {' or '.join(names)} graph")
    return [(name, bodies[name]) for name in names]


MAX_LOOP_TRIPS = 100_000  # a Loop with no trip count whose condition never turns false is refused there


def _declared_shape(value: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    tt = value.type.tensor_type
    if not tt.HasField("shape") or any(not d.HasField("dim_value") for d in tt.shape.dim):
        return None
    return tuple(d.dim_value for d in tt.shape.dim)


def outer_names(graph: onnx.GraphProto) -> set[str]:
    """The names a body reads from the scopes around it (its nested bodies' reads included)."""
    defined = {t.name for t in graph.initializer} | {i.name for i in graph.input}
    defined |= {o for n in graph.node for o in n.output if o}
    used = set()
    for node in graph.node:
        used.update(n for n in node.input if n)
        for attr in node.attribute:
            for body in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else []) + list(attr.graphs):
                used |= outer_names(body)
    used.update(o.name for o in graph.output)
    return used - defined


def refuse_unsupported(model: onnx.ModelProto) -> None:
    missing = unsupported_operators(model)
    if missing:
        listing = ", ".join(f"{op} ({d} opset {v}) x{n}" for d, op, v, n in missing)
        # skl2onnx puts a ZipMap (a list of {class: probability} maps, no tensor) after every
        # classifier unless told not to
        zipmap = any(op == "ZipMap" for _, op, _, _ in missing)
        raise UnsupportedModelError(
            f"the trainable form does not support {len(missing)} operator(s): {listing}; "
            + ("re-export with skl2onnx's options={id(model): {'zipmap': False}}, or " if zipmap else "")
            + "use a data-free method (--method global/lamp/erk/uniform) or re-export without them"
        )


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray:
    (attr,) = node.attribute
    value = decode_attribute(attr)
    if attr.name == "value":
        return value
    if attr.name in ("value_float", "value_floats"):
        return np.array(value, dtype=np.float32)
    if attr.name in ("value_int", "value_ints"):
        return np.array(value, dtype=np.int64)
    if attr.name == "sparse_value":
        return onnx.numpy_helper.to_array(onnx.numpy_helper.to_array(attr.sparse_tensor))
    raise UnsupportedModelError(f"Constant node {node.name!r} with attribute {attr.name} is not supported")


def _output_shape(node: onnx.NodeProto, weight_input: int, index: GraphIndex,
                  model: onnx.ModelProto) -> tuple[int, ...] | None:
    """The trailing axes of the linear layer ``node``'s output that its weight indexes (and a bias
    added to it broadcasts over): (N,) for MatMul and Gemm; for an Einsum the weight's output
    axes, where they end the output term in the weight's order, else None. Read off the weight
    as the node reads it (through Transpose and Reshape views)."""
    source, _, perm, _, reshaped = index.resolve_view(node.input[weight_input])
    if source is None:
        return None
    dims = list(reshaped if reshaped is not None else source.tensor(model).dims)
    if perm is not None:
        dims = [dims[a] for a in perm]
    if len(dims) < 2:
        return None
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if plain_op_type(node.op_type, node.domain) == "Einsum":
        equation = attrs.get("equation", b"")
        equation = (equation.decode() if isinstance(equation, bytes) else equation).replace(" ", "")
        axes = einsum_weight_axes(equation, weight_input)
        if axes is None:
            return None
        weight_term, out_term = equation.split("->")[0].split(",")[weight_input], equation.split("->")[1]
        letters = "".join(weight_term[a] for a in axes[0])
        return tuple(dims[a] for a in axes[0]) if out_term.endswith(letters) else None
    if plain_op_type(node.op_type, node.domain) == "Gemm":
        transposed = attrs.get("transB" if weight_input == 1 else "transA", 0)
        return (dims[0 if transposed == (weight_input == 1) else 1],)
    return (dims[-1] if weight_input == 1 else dims[-2],)


def _fused_fn(kernel: Callable, attrs: dict, rank: int) -> OpFn:
    def run_fused(ctx, x, *extra):
        out = kernel(x, *extra, **attrs)
        # the chain's constants broadcast its output up to their rank
        return out.reshape((1,) * (rank - out.dim()) + tuple(out.shape)) if out.dim() < rank else out

    return run_fused


@dataclass
class _Body:
    """A branch of an If or a Loop's or Scan's body: its steps, its own constants, its inputs (a
    Loop's iteration number, condition and carried values; a Scan's states and slices) and the
    names it returns."""

    steps: list[_Step]
    constants: dict[str, str]  # value name -> buffer key
    outputs: tuple[str, ...]
    path: tuple[tuple[int, str], ...]  # where it sits (discovery.body_graph), as Consumer.body spells it
    inputs: tuple[str, ...] = ()
    output_shapes: tuple[tuple[int, ...] | None, ...] = ()  # declared, where every dim is known


@dataclass
class _Step:
    fn: OpFn | None
    ctx: NodeContext
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    release: tuple[str, ...]  # values whose last use is this step
    branches: tuple[_Body, ...] | None = None  # an If's (then, else), a Loop's or Scan's (body,); fn is None


class OnnxModule(nn.Module):
    """The trainable form of an ONNX model.

    Args:
        model: the ONNX model, tensor data loaded.
        prunable: the weights discovery found; each becomes a parameter with role "weight".
        tune: extra roles to make parameters ("bias", "norm"); the rest are buffers.
    """

    def __init__(self, model: onnx.ModelProto, prunable: Sequence[PrunableWeight] = (),
                 tune: Sequence[str] = ("bias", "norm")):
        super().__init__()
        refuse_unsupported(model)
        graph = model.graph
        self._graph = graph  # control-flow bodies are planned from it (kept for their constants' places)
        opsets = {op.domain or "": op.version for op in model.opset_import}
        self.opset = opsets.get("", opsets.get("ai.onnx", 1))
        index = GraphIndex(graph, model.opset_import)
        self.input_names = [i.name for i in graph.input if i.name not in index.initializers]
        self.output_names = [o.name for o in graph.output]
        self.sources: dict[str, TensorSource] = {}  # parameter key -> ONNX tensor
        self.prunable_keys: list[str] = []
        self.weight_transforms: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        self._params = nn.ParameterDict()
        self._const_keys: dict[str, str] = {}  # value name -> parameter or buffer key
        by_source: dict[ConstantSource, str] = {}

        def add_parameter(source: ConstantSource, role: str) -> str:
            if source in by_source:
                return by_source[source]
            key = f"p{len(self._params)}"
            tensor = source.tensor(model)
            array = onnx.numpy_helper.to_array(tensor)
            self._params[key] = nn.Parameter(to_torch(array).float())
            self.sources[key] = TensorSource(source.name, source.storage, source.index, array.dtype.name, role,
                                             source.body)
            by_source[source] = key
            return key

        for w in prunable:
            key = add_parameter(ConstantSource(w.storage, w.index, w.name, w.body), "weight")
            self.prunable_keys.append(key)
        readers = [(node, index) for node in graph.node]
        for i, node in enumerate(graph.node):  # nodes in control-flow bodies read biases too
            if run_bodies(node):
                readers.extend((sub, scope) for sub, _, _, scope in if_body_nodes(node, i, index))
        for node, scope in readers:
            for i, role in _tunable_inputs(node).items():
                if role in tune and i < len(node.input) and node.input[i]:
                    source, _ = scope.resolve(node.input[i])
                    if source is not None and source.tensor(model).data_type in _FLOAT_TYPES:
                        add_parameter(source, role)
        if "bias" in tune:
            self._add_matmul_biases(model, index, add_parameter)
        if "norm" in tune:
            self._add_channel_affines(model, index, add_parameter)
            # A LayerNorm or RMSNorm written out node by node (torch's exporters below opsets 17
            # and 23) has its scale (and shift) in a Mul (and an Add); they are normalisation
            # parameters all the same.
            def stored(name: str) -> np.ndarray | None:
                source, _ = index.resolve(name)
                tensor = None if source is None else source.tensor(model)
                # the patterns' constants are scalars and axis lists: large tensors are not decoded
                if tensor is None or math.prod(tensor.dims) > 64:
                    return None
                return onnx.numpy_helper.to_array(tensor)

            nodes = [n for n in graph.node if not (n.op_type == "Constant" and n.domain in ("", "ai.onnx"))]
            for fusion in find_fusions(nodes, stored, opsets, self.output_names):
                for name in fusion.extra if fusion.kind in ("layer_norm", "rms_norm") else ():
                    source, _ = index.resolve(name)
                    if source is not None and source.tensor(model).data_type in _FLOAT_TYPES:
                        add_parameter(source, "norm")

        # Every constant value name (initializers, Constant outputs) -> a parameter or buffer.
        param_by_name = {src.name: key for key, src in self.sources.items() if not src.body}
        # those stored in If bodies, found by where they are stored
        self._body_params = {(src.body, src.storage, src.index): key for key, src in self.sources.items() if src.body}
        self._if_paths: dict[int, tuple[tuple[int, str], ...]] = {}  # id(If/Loop node) -> the body path it sits in

        def find_ifs(g: onnx.GraphProto, path: tuple[tuple[int, str], ...]) -> None:
            for i, node in enumerate(g.node):
                if run_bodies(node):
                    self._if_paths[id(node)] = path
                    for attr, body in _bodies(node):
                        find_ifs(body, (*path, (i, attr)))

        find_ifs(graph, ())
        n_buffers = 0
        for init in graph.initializer:
            if init.name in param_by_name:
                self._const_keys[init.name] = param_by_name[init.name]
                continue
            key = f"c{n_buffers}"
            n_buffers += 1
            self.register_buffer(key, to_torch(onnx.numpy_helper.to_array(init)), persistent=False)
            self._const_keys[init.name] = key
        steps_nodes = []
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                name = node.output[0]
                if name in param_by_name:
                    self._const_keys[name] = param_by_name[name]
                else:
                    key = f"c{n_buffers}"
                    n_buffers += 1
                    self.register_buffer(key, to_torch(_constant_node_value(node)), persistent=False)
                    self._const_keys[name] = key
                continue
            steps_nodes.append(node)
        self._n_buffers = n_buffers
        self._branches: dict[int, tuple[_Body, _Body]] = {}  # id(If node) -> its bodies, planned once
        # how often each If body ran (by its path): weights in a body the data never takes learn nothing
        self.body_runs: Counter = Counter()
        # The node-by-node plan, for callers that want values a fused chain no longer makes.
        self._exact_steps = self._plan(steps_nodes, opsets)
        # values an If body reads from outside stay visible: a fused chain must not hide them
        read_in_bodies = {n for node in steps_nodes if run_bodies(node)
                          for _, body in _bodies(node) for n in outer_names(body)}
        fusions = find_fusions(steps_nodes, self._stored_constant, opsets, [*self.output_names, *read_in_bodies])
        self.fusions = Counter(f.kind for f in fusions)
        self._fused_away = {name for f in fusions for name in f.hidden}
        self._steps = self._plan(steps_nodes, opsets, fusions) if fusions else self._exact_steps

    def _add_matmul_biases(self, model: onnx.ModelProto, index: GraphIndex, add_parameter) -> None:
        """Add(MatMul(x, W), b) is how exporters write Linear: b is a bias like Conv's. tf2onnx
        puts views between the two: a Dense layer on a sequence is MatMul, Reshape back to
        [N, T, C], then the Add; Keras's attention projections add a [heads, head_dim] bias
        after a Reshape to heads. Through views, a constant is taken for a bias only where it
        has as many elements as the layer has outputs (not, say, a position embedding)."""
        prunable_names = {src.name for src in self.sources.values() if src.role == "weight"}
        producer_of = {out: node for node in model.graph.node for out in node.output}
        views = ("Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity")
        for node in model.graph.node:
            if node.op_type != "Add" or len(node.input) != 2:
                continue
            for a, b in ((0, 1), (1, 0)):
                producer, through_view = producer_of.get(node.input[a]), False
                while producer is not None and producer.domain in ("", "ai.onnx") and producer.op_type in views:
                    producer, through_view = producer_of.get(producer.input[0]), True
                if producer is None or plain_op_type(producer.op_type, producer.domain) not in ("MatMul", "Gemm", "Einsum"):
                    continue
                weights = [index.resolve(n, through_views=True)[0] for n in producer.input[:2]]
                prunable = [i for i, w in enumerate(weights) if w is not None and w.name in prunable_names]
                source, _ = index.resolve(node.input[b])
                if not prunable or source is None or source.tensor(model).data_type != onnx.TensorProto.FLOAT:
                    continue
                dims = list(source.tensor(model).dims)
                outputs = _output_shape(producer, prunable[0], index, model)
                if through_view:
                    if outputs is None or math.prod(dims) != math.prod(outputs):
                        continue
                elif len(dims) > 1:
                    # [1, N] is a bias as [N] is (skl2onnx's intercepts); an Einsum's [H, D] too
                    while dims and dims[0] == 1 and len(dims) > len(outputs or ()):
                        dims = dims[1:]
                    if tuple(dims) != outputs:
                        continue
                add_parameter(source, "bias")

    def _add_channel_affines(self, model: onnx.ModelProto, index: GraphIndex, add_parameter) -> None:
        """Add(Mul(x, scale), shift), scale and shift stored per channel (one axis longer than 1,
        the same shape), is an inference-mode BatchNorm that the exporter wrote out: tf2onnx
        does so wherever the BatchNorm cannot fold into a convolution (the pre-activation
        BatchNorms of Keras's ResNetV2 and DenseNet, 0 of their normalisation parameters tuned
        otherwise). Its scale and shift are normalisation parameters. Not where x is a graph
        input or a view of one: that is the preprocessing's (x - mean) / std."""
        producer_of = {out: node for node in model.graph.node for out in node.output}
        consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in model.graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        inputs = set(self.input_names)

        def stored_per_channel(name: str):
            source, _ = index.resolve(name)
            tensor = None if source is None else source.tensor(model)
            if tensor is None or tensor.data_type != onnx.TensorProto.FLOAT:
                return None, None
            dims = tuple(tensor.dims)
            return (source, dims) if sum(d > 1 for d in dims) == 1 else (None, None)

        def from_an_input(name: str) -> bool:
            node = producer_of.get(name)
            while node is not None and node.op_type in ("Transpose", "Reshape", "Cast", "Identity") and node.input:
                name, node = node.input[0], producer_of.get(node.input[0])
            return name in inputs

        for mul in model.graph.node:
            if mul.op_type != "Mul" or mul.domain not in ("", "ai.onnx") or len(mul.input) != 2:
                continue
            after = consumers.get(mul.output[0], [])
            if len(after) != 1 or after[0].op_type != "Add" or len(after[0].input) != 2:
                continue
            for x, scale_name in (mul.input, mul.input[::-1]):
                scale, dims = stored_per_channel(scale_name)
                shift_name = next((n for n in after[0].input if n != mul.output[0]), None)  # Add(m, m): none
                shift, shift_dims = stored_per_channel(shift_name) if shift_name else (None, None)
                if scale is not None and shift is not None and dims == shift_dims and not from_an_input(x) \
                        and stored_per_channel(x)[0] is None and index.resolve(x)[0] is None:
                    add_parameter(scale, "norm")
                    add_parameter(shift, "norm")
                    break

    def _stored_constant(self, name: str) -> np.ndarray | None:
        """A constant's value, None for computed values and for parameters (they get tuned)."""
        key = self._const_keys.get(name)
        if key is None or key in self._params:
            return None
        return getattr(self, key).detach().cpu().numpy()

    def _add_buffer(self, value: np.ndarray) -> str:
        key = f"c{self._n_buffers}"
        self._n_buffers += 1
        self.register_buffer(key, to_torch(value), persistent=False)
        return key

    def _if_bodies(self, node: onnx.NodeProto, opsets: dict[str, int]) -> tuple[_Body, ...]:
        """Plan an If's branches or a Loop's body (once per node): their constants become
        buffers (parameters where prunable or tuned), and their nodes run like the main
        graph's, reading outer values by name."""
        if id(node) not in self._branches:
            bodies = []
            node_index = next(i for i, n in enumerate(self._graph_holding(node).node) if n is node)
            for branch, graph in _bodies(node):
                path = (*self._if_paths[id(node)], (node_index, branch))
                constants = {}
                for k, init in enumerate(graph.initializer):
                    constants[init.name] = self._body_params.get((path, "initializer", k)) or \
                        self._add_buffer(onnx.numpy_helper.to_array(init))
                nodes = []
                for k, sub in enumerate(graph.node):
                    if sub.op_type == "Constant" and sub.domain in ("", "ai.onnx"):
                        constants[sub.output[0]] = self._body_params.get((path, "constant", k)) or \
                            self._add_buffer(_constant_node_value(sub))
                    else:
                        nodes.append(sub)
                outputs = tuple(o.name for o in graph.output)
                shapes = tuple(_declared_shape(o) for o in graph.output)
                bodies.append(_Body(self._plan(nodes, opsets, keep=outputs), constants, outputs, path,
                                    tuple(i.name for i in graph.input), shapes))
            self._branches[id(node)] = tuple(bodies)
        return self._branches[id(node)]

    def _graph_holding(self, node: onnx.NodeProto) -> onnx.GraphProto:
        return body_graph(self._graph, self._if_paths[id(node)])

    def _plan(self, nodes: list[onnx.NodeProto], opsets: dict[str, int],
              fusions: Sequence[Fusion] = (), keep: Sequence[str] | None = None) -> list[_Step]:
        fused_at = {id(f.nodes[-1]): f for f in fusions}  # a chain runs where its last node was
        inside = {id(n) for f in fusions for n in f.nodes[:-1]}
        ordered = []
        kernels: dict[int, OpFn] = {}  # stand-in node -> its kernel
        for node in nodes:
            if id(node) in inside:
                continue
            fusion = fused_at.get(id(node))
            if fusion is None:
                ordered.append(node)
            else:  # a stand-in node, so errors name the chain and its last node
                ordered.append(onnx.helper.make_node(
                    f"fused {fusion.kind}", [fusion.x, *fusion.extra], [fusion.output],
                    name=f"{node.name or fusion.output} (fused {fusion.kind} of {len(fusion.nodes)} nodes)"))
                kernels[id(ordered[-1])] = _fused_fn(KERNELS[fusion.kind], dict(fusion.attrs), fusion.rank)
        def reads(node: onnx.NodeProto) -> list[str]:  # an If or a Loop also reads what its bodies use
            if run_bodies(node):
                return [*node.input, *sorted(set().union(*(outer_names(b) for _, b in _bodies(node))))]
            return list(node.input)

        last_use: dict[str, int] = {}
        for i, node in enumerate(ordered):
            for name in reads(node):
                if name:
                    last_use[name] = i
        keep = set(self.output_names if keep is None else keep)
        steps = []
        for i, node in enumerate(ordered):
            domain = "" if node.domain in ("", "ai.onnx") else node.domain
            release = tuple(sorted({n for n in reads(node) if n and last_use[n] == i and n not in keep}))
            if run_bodies(node):
                opset = opsets.get(domain, 1)
                steps.append(_Step(None, NodeContext(node, opset), tuple(node.input), tuple(node.output), release,
                                   self._if_bodies(node, opsets)))
                continue
            if id(node) in kernels:
                fn, opset = kernels[id(node)], 0
            else:
                opset = opsets.get(domain, 1)
                fn = resolve(domain, node.op_type, opset)
            steps.append(_Step(fn, NodeContext.of(node, opset), tuple(node.input), tuple(node.output), release))
        return steps

    # -- parameters ---------------------------------------------------------------------

    def parameter(self, key: str) -> nn.Parameter:
        return self._params[key]

    def parameters_by_role(self, role: str) -> dict[str, nn.Parameter]:
        return {k: self._params[k] for k, src in self.sources.items() if src.role == role}

    def _constant(self, key: str) -> torch.Tensor:
        if key in self._params:
            value = self._params[key]
            transform = self.weight_transforms.get(key)
            return transform(value) if transform is not None else value
        return getattr(self, key)

    # -- execution -----------------------------------------------------------------------

    def set_batch_layout(self, layout, settings: Mapping[str, np.ndarray]) -> None:
        """Where the graph keeps each input's and output's samples, and the settings' values
        (calibration.BatchLayout), for run(..., batch_first=True)."""
        self._layout = layout
        self._settings = {name: to_torch(np.asarray(value)) for name, value in settings.items()}

    def run(self, feeds: Mapping[str, torch.Tensor], *, keep: Sequence[str] | None = None,
            keep_all: bool = False, batch_first: bool = False) -> dict[str, torch.Tensor]:
        """Execute the graph; returns the outputs (plus ``keep`` names, or every value).

        ``batch_first``: the feeds hold their samples first, as the learner keeps them; they go
        to the axes the graph takes them on (set_batch_layout), the settings are added, and the
        outputs come back samples first."""
        layout = getattr(self, "_layout", None)
        if batch_first and layout is not None and not (layout.trivial and not self._settings):
            device = next((v.device for v in feeds.values()), None)
            graph_feeds = {k: layout.to_graph(k, v, torch) for k, v in feeds.items()}
            graph_feeds |= {k: v.to(device) for k, v in self._settings.items()}
            out = self.run(graph_feeds, keep=keep, keep_all=keep_all)
            return {k: layout.output_first(k, v, torch) if k in self.output_names else v for k, v in out.items()}
        env: dict[str, torch.Tensor | None] = {"": None}
        for name, key in self._const_keys.items():
            env[name] = self._constant(key)
        for name in self.input_names:
            if name not in feeds:
                raise KeyError(f"missing input {name!r}")
            value = feeds[name]
            env[name] = value.float() if value.dtype in (torch.float16, torch.bfloat16) else value
        wanted = set(keep or ())
        # Fused chains do not make their inner values; whoever asks for them gets the exact plan.
        plan = self._exact_steps if wanted & self._fused_away else self._steps
        device = next((env[n].device for n in self.input_names), None)
        if device is None:
            device = next((v.device for v in env.values() if isinstance(v, torch.Tensor)), None)
        self._execute(plan, env, wanted, keep_all, device)
        env.pop("", None)
        if keep_all:
            return env
        return {n: env[n] for n in (*self.output_names, *wanted) if n in env}

    def _execute(self, steps: list[_Step], env: dict, wanted: set[str], keep_all: bool, device) -> None:
        """Run ``steps`` over ``env`` in place, dropping each value after its last use."""
        for step in steps:
            step.ctx.device = device
            try:
                if step.branches is not None:
                    run = {"If": self._run_if, "Loop": self._run_loop, "Scan": self._run_scan}[step.ctx.node.op_type]
                    result = run(step, env, device)
                else:
                    args = [env[n] if n else None for n in step.inputs]
                    # Trailing absent optional inputs are dropped so implementations see their defaults.
                    while args and args[-1] is None:
                        args.pop()
                    result = step.fn(step.ctx, *args)
            except (FcptsError, NodeExecutionError):
                raise  # an op refusing what it cannot reproduce, or a node inside an If: already said
            except Exception as exc:
                raise NodeExecutionError(step.ctx, exc) from exc
            if not isinstance(result, (tuple, list)):
                result = (result,)
            for name, value in zip(step.outputs, result):
                if name:
                    env[name] = value
            if not keep_all:
                for name in step.release:
                    if name not in wanted:
                        env.pop(name, None)

    def _run_if(self, step: _Step, env: dict, device) -> list[torch.Tensor]:
        """ONNX If: the condition is read on the host (a data-dependent branch, as in
        onnxruntime), and the chosen body runs over a view of the outer values."""
        cond = env[step.inputs[0]]
        if cond is None or cond.numel() != 1:
            raise ValueError(f"If condition must hold one element, got shape {None if cond is None else tuple(cond.shape)}")
        body = step.branches[0] if bool(cond.reshape(-1)[0]) else step.branches[1]
        self.body_runs[body.path] += 1
        scope = dict(env)
        for name, key in body.constants.items():
            scope[name] = self._constant(key)  # a pruned weight through its mask, as in the main graph
        self._execute(body.steps, scope, set(body.outputs), False, device)
        return [scope[name] for name in body.outputs]

    def _run_loop(self, step: _Step, env: dict, device) -> list[torch.Tensor]:
        """ONNX Loop: the body runs while the trip count and the condition allow (both read on
        the host, as onnxruntime does), with the carried values passed on; each scan output is
        its per-iteration values stacked on a new first axis."""
        (body,) = step.branches
        names = list(step.inputs) + [""] * (2 - min(len(step.inputs), 2))
        trips = None if not names[0] else int(env[names[0]].reshape(-1)[0])
        use_cond = bool(names[1])
        going = bool(env[names[1]].reshape(-1)[0]) if use_cond else True
        carried = [env[n] for n in names[2:]]
        n_carried = len(carried)
        scans: list[list[torch.Tensor]] = [[] for _ in range(len(body.outputs) - 1 - n_carried)]
        i = 0
        while going and (trips is None or i < trips):
            if trips is None and i >= MAX_LOOP_TRIPS:
                raise ValueError(f"Loop without a trip count ran {MAX_LOOP_TRIPS} iterations without its condition "
                                 "turning false")
            scope = dict(env)
            for name, key in body.constants.items():
                scope[name] = self._constant(key)
            values = [torch.tensor(i, dtype=torch.int64, device=device), torch.tensor(going, device=device), *carried]
            scope.update(zip(body.inputs, values))
            self._execute(body.steps, scope, set(body.outputs), False, device)
            out = [scope[name] for name in body.outputs]
            if use_cond:  # without a condition input the body's is computed and ignored
                going = bool(out[0].reshape(-1)[0])
            carried = out[1:1 + n_carried]
            for values_k, value in zip(scans, out[1 + n_carried:]):
                values_k.append(value)
            i += 1
        if i:
            self.body_runs[body.path] += 1
        stacked = []
        for k, values_k in enumerate(scans):
            if values_k:
                stacked.append(torch.stack(values_k))
                continue
            shape = body.output_shapes[1 + n_carried + k]
            if shape is None:
                raise ValueError(f"Loop ran no iteration and its scan output {body.outputs[1 + n_carried + k]!r} "
                                 "declares no full shape to make an empty one of")
            stacked.append(torch.zeros((0, *shape), device=device))
        return [*carried, *stacked]

    def _run_scan(self, step: _Step, env: dict, device) -> list[torch.Tensor]:
        """ONNX Scan (opset 9 on): the body runs once per slice of the scan inputs along their
        scan axes (last first where a direction is 1), carrying the state variables; each scan
        output's per-step values are stacked along its output axis (reversed where its
        direction is 1)."""
        node = step.ctx.node
        if step.ctx.opset < 9:
            raise ValueError("Scan before opset 9 (with a batch axis and sequence_lens) is not run; re-export at opset 9+")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute if a.name != "body"}
        (body,) = step.branches
        values = [env[n] for n in step.inputs]
        n_scan = int(attrs["num_scan_inputs"])
        states, xs = values[:len(values) - n_scan], values[len(values) - n_scan:]
        in_axes = [a + x.dim() if a < 0 else a for a, x in zip(attrs.get("scan_input_axes", [0] * n_scan), xs)]
        in_dirs = list(attrs.get("scan_input_directions", [0] * n_scan))
        steps = xs[0].shape[in_axes[0]] if xs else 0
        n_out = len(body.outputs) - len(states)
        per_step: list[list[torch.Tensor]] = [[] for _ in range(n_out)]
        for t in range(steps):
            slices = [x.select(axis, steps - 1 - t if reverse else t) for x, axis, reverse in zip(xs, in_axes, in_dirs)]
            scope = dict(env)
            for name, key in body.constants.items():
                scope[name] = self._constant(key)
            scope.update(zip(body.inputs, [*states, *slices]))
            self._execute(body.steps, scope, set(body.outputs), False, device)
            out = [scope[name] for name in body.outputs]
            states = out[:len(states)]
            for k, value in enumerate(out[len(states):]):
                per_step[k].append(value)
        if steps:
            self.body_runs[body.path] += 1
        elif n_out:
            raise ValueError("Scan over an empty sequence: its scan outputs have no shape to take")
        out_axes = list(attrs.get("scan_output_axes", [0] * n_out))
        out_dirs = list(attrs.get("scan_output_directions", [0] * n_out))
        stacked = []
        for values_k, axis, reverse in zip(per_step, out_axes, out_dirs):
            rank = values_k[0].dim() + 1
            stacked.append(torch.stack(values_k[::-1] if reverse else values_k, dim=axis + rank if axis < 0 else axis))
        return [*states, *stacked]

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feeds = dict(zip(self.input_names, args))
        feeds.update(kwargs)
        outputs = self.run(feeds)
        return tuple(outputs[n] for n in self.output_names)
