"""The operator registry: (domain, op_type) -> torch implementations by opset version.

An implementation is a plain function ``fn(ctx, *inputs) -> Tensor | tuple[Tensor, ...]``.
``inputs`` are torch tensors in ONNX input order, None where an optional input is absent.
``ctx`` is the :class:`NodeContext`: attributes (already decoded), the opset in force and
the node's name. Register with ``@register("Op", since=V)``; a model with opset O gets the
implementation with the largest ``since`` <= O, the way ONNX versions operators.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

OpFn = Callable[..., Any]

# (domain, op_type) -> sorted list of (since_version, fn)
REGISTRY: dict[tuple[str, str], list[tuple[int, OpFn]]] = {}

_DEFAULT_DOMAINS = ("", "ai.onnx")


def register(op_type: str, *, since: int = 1, domain: str = "") -> Callable[[OpFn], OpFn]:
    """Register ``fn`` as the implementation of ``op_type`` from opset ``since`` on."""
    key = ("" if domain in _DEFAULT_DOMAINS else domain, op_type)

    def wrap(fn: OpFn) -> OpFn:
        versions = REGISTRY.setdefault(key, [])
        if any(v == since for v, _ in versions):
            raise ValueError(f"operator {key} since opset {since} registered twice")
        versions.append((since, fn))
        versions.sort(key=lambda item: item[0])
        return fn

    return wrap


def resolve(domain: str, op_type: str, opset: int) -> OpFn | None:
    """The implementation for ``op_type`` under ``opset``, or None when there is none."""
    versions = REGISTRY.get(("" if domain in _DEFAULT_DOMAINS else domain, op_type))
    if not versions:
        return None
    chosen = None
    for since, fn in versions:
        if since <= opset:
            chosen = fn
    return chosen


def decode_attribute(attr: onnx.AttributeProto) -> Any:
    """Attribute value as Python data (tensors as numpy arrays, graphs left as protos)."""
    if attr.type == onnx.AttributeProto.TENSOR:
        return numpy_helper.to_array(attr.t)
    if attr.type == onnx.AttributeProto.STRING:
        return attr.s.decode("utf-8")
    if attr.type == onnx.AttributeProto.STRINGS:
        return [s.decode("utf-8") for s in attr.strings]
    return onnx.helper.get_attribute_value(attr)


@dataclass
class NodeContext:
    """What an implementation knows about its node besides the input tensors."""

    node: onnx.NodeProto
    opset: int
    attrs: dict[str, Any] = field(default_factory=dict)
    # The device of the current run (its inputs'), set by OnnxModule.run: where ops that make
    # data from shapes alone (ConstantOfShape, Range) put it. None outside a module run.
    device: Any = None

    @classmethod
    def of(cls, node: onnx.NodeProto, opset: int) -> NodeContext:
        return cls(node, opset, {a.name: decode_attribute(a) for a in node.attribute})

    @property
    def name(self) -> str:
        return self.node.name or self.node.output[0]

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)

    def ints(self, name: str, default: Any = None) -> list[int] | None:
        value = self.attrs.get(name, default)
        return None if value is None else [int(v) for v in value]


def tensor_ints(t) -> list[int]:
    """A 0-D/1-D integer tensor (shape, axes, pads...) as Python ints."""
    if t is None:
        return []
    if isinstance(t, np.ndarray):
        return [int(v) for v in t.reshape(-1)]
    return [int(v) for v in t.reshape(-1).tolist()]
