"""Pruned weights stored as ONNX sparse tensors (``--store sparse``), and back.

A pruned weight whose non-zeros take fewer bytes as (value, int64 linear index) pairs than
as a dense tensor is moved from ``graph.initializer`` to ``graph.sparse_initializer`` as a
``SparseTensorProto``: ``values`` holds the non-zero values (1-D, the weight's dtype, named
like the weight), ``indices`` their linearized positions (1-D int64, ascending), ``dims``
the dense shape, as the ONNX spec describes. A weight held by a ``Constant`` node gets a
``sparse_value`` attribute instead of ``value``. onnxruntime densifies both at load time,
so outputs are bit-identical to the dense file.

onnx.checker accepts the form; onnx's strict shape inference (``full_check=True``) does
not type sparse initializers as dense tensors and reports rank errors on their readers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from .discovery import PrunableWeight, body_graph

INDEX_BYTES = 8  # int64 indices, as onnx.checker requires


@dataclass
class SparseStoreSummary:
    """What ``to_sparse_storage`` did: the weights it moved and the bytes of their data."""

    converted: list[str] = field(default_factory=list)
    kept_dense: list[str] = field(default_factory=list)  # not worthwhile, or not convertible
    dense_bytes: int = 0  # data bytes of the converted weights stored densely
    sparse_bytes: int = 0  # their values + indices bytes as sparse tensors

    def to_dict(self) -> dict:
        return {"converted": len(self.converted), "kept_dense": len(self.kept_dense),
                "dense_bytes": self.dense_bytes, "sparse_bytes": self.sparse_bytes}


def worthwhile(size: int, nnz: int, itemsize: int) -> bool:
    """True when values + int64 indices take fewer bytes than the dense tensor."""
    return nnz * (itemsize + INDEX_BYTES) < size * itemsize


def _le_bytes(values: np.ndarray) -> bytes:
    """Little-endian bytes of ``values`` (ONNX raw_data order), via the bit pattern (works for bf16)."""
    bits = np.ascontiguousarray(values).view(np.dtype(f"u{values.dtype.itemsize}"))
    return bits.astype(bits.dtype.newbyteorder("<")).tobytes()


def sparse_tensor(name: str, data_type: int, dense: np.ndarray) -> onnx.SparseTensorProto:
    """``dense`` as a SparseTensorProto: non-zero values and their ascending linear int64 indices."""
    flat = dense.reshape(-1)
    nz = np.flatnonzero(flat != 0)
    values = onnx.TensorProto(name=name, data_type=data_type, dims=[len(nz)])
    values.raw_data = _le_bytes(flat[nz])
    indices = onnx.TensorProto(data_type=onnx.TensorProto.INT64, dims=[len(nz)])
    indices.raw_data = nz.astype("<i8").tobytes()
    return onnx.SparseTensorProto(values=values, indices=indices, dims=list(dense.shape))


def sparse_to_dense(sparse: onnx.SparseTensorProto) -> np.ndarray:
    """The dense array of a SparseTensorProto (linearized 1-D or [NNZ, rank] COO indices)."""
    values = numpy_helper.to_array(sparse.values).reshape(-1)
    indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
    shape = tuple(int(d) for d in sparse.dims)
    if indices.ndim == 2:  # COO: one row of coordinates per value
        indices = np.ravel_multi_index(tuple(indices.T), shape) if indices.size else indices.reshape(-1)
    dense = np.zeros(int(np.prod(shape, dtype=np.int64)), dtype=values.dtype)
    dense[indices.reshape(-1)] = values
    return dense.reshape(shape)


def _dense_tensor(sparse: onnx.SparseTensorProto) -> onnx.TensorProto:
    tensor = onnx.TensorProto(name=sparse.values.name, data_type=sparse.values.data_type,
                              dims=list(sparse.dims))
    tensor.raw_data = _le_bytes(sparse_to_dense(sparse))
    return tensor


def to_sparse_storage(model: onnx.ModelProto, weights: Iterable[PrunableWeight]) -> SparseStoreSummary:
    """Move the given weights to sparse storage in ``model`` (changed in place) where it saves bytes.

    Weights that are also graph inputs (IR < 4 default values) stay dense. Returns what moved.
    """
    graph = model.graph
    summary = SparseStoreSummary()
    input_names = {vi.name for vi in graph.input}
    by_name = {t.name: t for t in graph.initializer}
    moved: set[str] = set()
    for w in weights:
        if w.body:  # stored inside an If body: left dense (onnxruntime's loading of sparse tensors there is untried)
            summary.kept_dense.append(w.name)
            continue
        if w.storage == "initializer":
            tensor = by_name.get(w.name)
            if tensor is None or w.name in input_names:
                summary.kept_dense.append(w.name)
                continue
        else:
            node = graph.node[w.index]
            attrs = [a for a in node.attribute if a.name == "value"]
            if not attrs:
                summary.kept_dense.append(w.name)
                continue
            tensor = attrs[0].t
        values = numpy_helper.to_array(tensor)
        itemsize = values.dtype.itemsize
        nnz = int(np.count_nonzero(values.reshape(-1) != 0))
        if not worthwhile(values.size, nnz, itemsize):
            summary.kept_dense.append(w.name)
            continue
        sparse = sparse_tensor(tensor.name, tensor.data_type, values)
        if w.storage == "initializer":
            graph.sparse_initializer.append(sparse)
            moved.add(w.name)
        else:
            node.attribute.remove(attrs[0])
            node.attribute.append(onnx.AttributeProto(
                name="sparse_value", type=onnx.AttributeProto.SPARSE_TENSOR, sparse_tensor=sparse))
        summary.converted.append(w.name)
        summary.dense_bytes += values.size * itemsize
        summary.sparse_bytes += nnz * (itemsize + INDEX_BYTES)
    if moved:
        kept = [t for t in graph.initializer if t.name not in moved]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return summary


def has_sparse_storage(model: onnx.ModelProto) -> bool:
    graph = model.graph
    return bool(graph.sparse_initializer) or any(
        a.name == "sparse_value" for n in graph.node if n.op_type == "Constant" for a in n.attribute)


def densify(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every sparse initializer and Constant ``sparse_value`` made dense
    (main graph); ``model`` itself when it has none."""
    if not has_sparse_storage(model):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    graph.initializer.extend(_dense_tensor(s) for s in graph.sparse_initializer)
    del graph.sparse_initializer[:]
    for node in graph.node:
        if node.op_type != "Constant":
            continue
        for attr in list(node.attribute):
            if attr.name == "sparse_value":
                dense = _dense_tensor(attr.sparse_tensor)
                node.attribute.remove(attr)
                node.attribute.append(onnx.helper.make_attribute("value", dense))
    return out


def stored_values(model: onnx.ModelProto, weight: PrunableWeight) -> np.ndarray:
    """The values of ``weight`` in ``model`` whichever way they are stored: initializer (by index,
    else by name), sparse initializer, Constant ``value`` or ``sparse_value``."""
    graph = body_graph(model.graph, weight.body)
    if weight.storage == "initializer":
        if weight.index < len(graph.initializer) and graph.initializer[weight.index].name == weight.name:
            return numpy_helper.to_array(graph.initializer[weight.index])
        for tensor in graph.initializer:
            if tensor.name == weight.name:
                return numpy_helper.to_array(tensor)
        for sparse in graph.sparse_initializer:
            if sparse.values.name == weight.name:
                return sparse_to_dense(sparse)
        raise KeyError(weight.name)
    node = graph.node[weight.index]
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "sparse_value":
            return sparse_to_dense(attr.sparse_tensor)
    raise KeyError(weight.name)
