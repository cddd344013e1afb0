"""Write-back invariants (issue "Foundation", item 4).

The written model is the input model except for the pruned tensors' values and the
fcpts_onnx.* metadata entries; exactly round(S * N) prunable weights end zero; the input
is never touched; every storage form and dtype is written in place. onnxruntime runs
every written model; numpy recomputes simple graphs from the written weights.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from fcpts_onnx import sparsify
from fcpts_onnx.discovery import discover
from fcpts_onnx.errors import UnsupportedModelError
from fcpts_onnx.masks import zero_smallest
from fcpts_onnx.writeback import METADATA_PREFIX, apply_weights

try:
    from . import graphs as G
except ImportError:
    import graphs as G


# --------------------------------------------------------------------------------------------
# helpers


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}  # hidden files (staging folders) included


def _run(path_or_model, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    src = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    session = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def _feed(model: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feed = {}
    for vi in model.graph.input:
        tt = vi.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        feed[vi.name] = rng.standard_normal([d.dim_value for d in tt.shape.dim]).astype(dtype)
    return feed


def _values_by_name(model: onnx.ModelProto | onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Stored tensors by name: initializers and Constant node values (by output name), in the
    main graph and in If bodies."""
    graph = model.graph if isinstance(model, onnx.ModelProto) else model
    out = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = attr.t
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                out.update(_values_by_name(attr.g))
    return out


def _same_tensor_except_values(a: onnx.TensorProto, b: onnx.TensorProto) -> None:
    assert (a.name, a.data_type, list(a.dims)) == (b.name, b.data_type, list(b.dims))


def _same_tensor(a: onnx.TensorProto, b: onnx.TensorProto, *, exact_proto: bool) -> None:
    _same_tensor_except_values(a, b)
    if exact_proto:
        assert a.SerializeToString() == b.SerializeToString()
    else:  # written through external data: compare the decoded bytes
        assert numpy_helper.to_array(a).tobytes() == numpy_helper.to_array(b).tobytes()


def assert_same_graph_except_pruned(src: onnx.ModelProto, out: onnx.ModelProto, pruned: set[str],
                                    *, exact_proto: bool = True) -> None:
    """``out`` is ``src`` except the values of ``pruned`` tensors and fcpts_onnx.* metadata."""
    assert out.ir_version == src.ir_version
    assert [(o.domain, o.version) for o in out.opset_import] == [(o.domain, o.version) for o in src.opset_import]
    assert (out.producer_name, out.producer_version, out.domain, out.model_version) == (
        src.producer_name, src.producer_version, src.domain, src.model_version)
    _same_graph_except_pruned(src.graph, out.graph, pruned, exact_proto)
    # metadata: every non-fcpts entry kept in order; the tool only adds fcpts_onnx.* keys
    theirs = [(p.key, p.value) for p in src.metadata_props]
    ours = [(p.key, p.value) for p in out.metadata_props if not p.key.startswith(METADATA_PREFIX)]
    assert ours == theirs
    assert any(p.key.startswith(METADATA_PREFIX) for p in out.metadata_props)


def _same_graph_except_pruned(g: onnx.GraphProto, h: onnx.GraphProto, pruned: set[str], exact_proto: bool) -> None:
    """A graph (the main one or an If body) is the same except the pruned tensors' values."""
    assert h.name == g.name
    assert [v.SerializeToString() for v in h.input] == [v.SerializeToString() for v in g.input]
    assert [v.SerializeToString() for v in h.output] == [v.SerializeToString() for v in g.output]
    assert [v.SerializeToString() for v in h.value_info] == [v.SerializeToString() for v in g.value_info]
    # nodes: same order, names, wiring and attributes; a pruned Constant differs only in its value's data
    assert len(h.node) == len(g.node)
    for a, b in zip(g.node, h.node):
        assert (a.op_type, a.name, a.domain, list(a.input), list(a.output)) == (
            b.op_type, b.name, b.domain, list(b.input), list(b.output))
        assert [x.name for x in a.attribute] == [x.name for x in b.attribute]
        is_pruned_constant = a.op_type == "Constant" and a.output[0] in pruned
        for x, y in zip(a.attribute, b.attribute):
            if is_pruned_constant and x.name == "value":
                _same_tensor_except_values(x.t, y.t)
            elif x.type == onnx.AttributeProto.GRAPH:  # an If body: the same rules inside
                _same_graph_except_pruned(x.g, y.g, pruned, exact_proto)
            elif exact_proto:
                assert x.SerializeToString() == y.SerializeToString(), (a.name, x.name)
            elif x.HasField("t"):
                _same_tensor(x.t, y.t, exact_proto=False)
            else:
                assert x.SerializeToString() == y.SerializeToString(), (a.name, x.name)
    # initializers: same names, order, dtypes, dims; unpruned ones byte-identical
    assert [t.name for t in h.initializer] == [t.name for t in g.initializer]
    for a, b in zip(g.initializer, h.initializer):
        if a.name in pruned:
            _same_tensor_except_values(a, b)
        else:
            _same_tensor(a, b, exact_proto=exact_proto)
    assert len(h.sparse_initializer) == len(g.sparse_initializer)


def _pruned_values_check(src: onnx.ModelProto, out: onnx.ModelProto, names) -> int:
    """Each pruned tensor: original values where non-zero, old zeros kept. Returns total zeros."""
    zeros = 0
    before, after = _values_by_name(src), _values_by_name(out)
    for name in names:
        old = numpy_helper.to_array(before[name]).astype(np.float64)
        new = numpy_helper.to_array(after[name]).astype(np.float64)
        assert new.shape == old.shape
        kept = new != 0
        np.testing.assert_array_equal(new[kept], old[kept])  # masking only, never a new value
        assert np.all(new[old == 0] == 0)  # existing zeros stay zeros
        if kept.any() and (~kept).any():  # the zeroed ones are the smallest magnitudes
            assert np.abs(old[~kept]).max() <= np.abs(old[kept]).min()
        zeros += int(np.count_nonzero(new == 0))
    return zeros


def _expected_zeros(sparsity: float, total: int) -> int:
    return math.floor(sparsity * total + 0.5)


# --------------------------------------------------------------------------------------------
# The output is the input, except for pruned values


BUILDERS = {
    "conv": G.conv,
    "conv_grouped": G.grouped_conv,
    "conv_depthwise": G.depthwise_conv,
    "conv_transpose": G.conv_transpose,
    "conv_transpose_grouped": G.grouped_conv_transpose,
    "gemm_transB1": G.gemm,
    "gemm_transB0": lambda: G.gemm(trans_b=0),
    "gemm_weight_A": G.gemm_weight_a,
    "matmul": G.matmul,
    "matmul_left": G.matmul_left,
    "matmul_batched": G.matmul_batched,
    "constant_node": G.matmul_constant,
    "constant_node_conv": G.conv_constant,
    "identity_1": lambda: G.matmul_identity(1),
    "identity_2_constant": lambda: G.matmul_identity(2, constant=True),
    "shared_matmul": G.shared_matmul,
    "shared_via_identity": lambda: G.shared_matmul(via_identity=True),
    "shared_conv": G.shared_conv,
    "if_subgraphs": G.if_model,
    "if_shared_outer": lambda: G.if_model(share_outer=True),
    "mixed": G.mixed,
    "fp16": G.fp16_model,
}


@pytest.mark.parametrize("case", sorted(BUILDERS))
def test_output_is_input_except_pruned_values(case, tmp_path):
    src = BUILDERS[case]()
    in_path = G.save(src, tmp_path / "in.onnx")
    out_path = tmp_path / "out.onnx"
    report = sparsify(in_path, out_path, sparsity=0.5, method="global", report_path=False)
    out = onnx.load_model(str(out_path))
    onnx.checker.check_model(out, full_check=True)
    pruned = {w.name for w in discover(src).weights}
    assert pruned == {row.name for row in report.layers}
    assert_same_graph_except_pruned(src, out, pruned)
    zeros = _pruned_values_check(src, out, pruned)
    total = sum(int(np.prod(_values_by_name(src)[n].dims)) for n in pruned)
    assert zeros == _expected_zeros(0.5, total) == report.zero_params
    assert report.total_params == total
    # the tensors really changed and the written model still runs
    assert any(_values_by_name(src)[n].SerializeToString() != _values_by_name(out)[n].SerializeToString()
               for n in pruned)
    feed = _feed(src)
    assert [y.shape for y in _run(out_path, feed)] == [y.shape for y in _run(in_path, feed)]


def test_metadata_records_the_run_and_keeps_other_entries(tmp_path):
    in_path = G.save(G.mixed(), tmp_path / "in.onnx")
    sparsify(in_path, tmp_path / "out.onnx", sparsity=0.6, method="uniform", report_path=False)
    props = {p.key: p.value for p in onnx.load_model(str(tmp_path / "out.onnx")).metadata_props}
    assert props["author"] == "tests"
    assert props[METADATA_PREFIX + "method"] == "uniform"
    total = 108 + 1024 + 160
    assert props[METADATA_PREFIX + "zeros"] == f"{_expected_zeros(0.6, total)}/{total}"


def test_rerun_on_output_updates_metadata_without_duplicates(tmp_path):
    in_path = G.save(G.mixed(), tmp_path / "in.onnx")
    sparsify(in_path, tmp_path / "a.onnx", sparsity=0.5, report_path=False)
    sparsify(tmp_path / "a.onnx", tmp_path / "b.onnx", sparsity=0.7, report_path=False)
    keys = [p.key for p in onnx.load_model(str(tmp_path / "b.onnx")).metadata_props]
    assert len(keys) == len(set(keys))
    props = {p.key: p.value for p in onnx.load_model(str(tmp_path / "b.onnx")).metadata_props}
    assert props[METADATA_PREFIX + "target_sparsity"] == "0.7"


# --------------------------------------------------------------------------------------------
# Exact counts


@pytest.mark.parametrize("method", ["uniform", "global", "erk", "lamp"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.77, 0.9, 644.5 / 1292])  # last: S*N = 644.5 -> 645
def test_exact_zero_count_counts_existing_zeros(method, sparsity, tmp_path):
    src = G.mixed(zeros_in_w2=0.4)  # W2 already 40% exact zeros (64 of 160)
    before = numpy_helper.to_array(_values_by_name(src)["W2"])
    assert np.count_nonzero(before == 0) == 64
    in_path = G.save(src, tmp_path / "in.onnx")
    report = sparsify(in_path, tmp_path / "out.onnx", sparsity=sparsity, method=method, report_path=False)
    out = onnx.load_model(str(tmp_path / "out.onnx"))
    total = 108 + 1024 + 160
    required = _expected_zeros(sparsity, total)
    assert _pruned_values_check(src, out, ["Wc", "W1", "W2"]) == required
    assert report.zero_params == report.required_zeros == required
    assert {row.name: row.zeros_before for row in report.layers}["W2"] == 64
    assert sum(row.zeros for row in report.layers) == required


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.95, 0.5125])  # 0.5125*40 = 20.5 -> 21 (half up)
def test_exact_zero_count_single_small_layer(sparsity, tmp_path):
    in_path = G.save(G.matmul(), tmp_path / "in.onnx")  # 40 weights: S*N = 4, 20, 38, 20.5
    sparsify(in_path, tmp_path / "out.onnx", sparsity=sparsity, method="global", report_path=False,
             max_layer_sparsity=1.0)
    w = numpy_helper.to_array(onnx.load_model(str(tmp_path / "out.onnx")).graph.initializer[0])
    assert np.count_nonzero(w == 0) == _expected_zeros(sparsity, 40)


# --------------------------------------------------------------------------------------------
# The input is never touched


def test_input_unchanged_and_no_stray_files(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    in_path = G.save(G.mixed(), folder / "in.onnx")
    digest, before = _sha(in_path), _listing(folder)
    report = sparsify(in_path, folder / "out.onnx", sparsity=0.5)  # default report path
    assert _sha(in_path) == digest == report.input_sha256
    assert _listing(folder) - before == {"out.onnx", "out.report.json"}
    assert before <= _listing(folder)
    assert report.output_sha256 == _sha(folder / "out.onnx")


def test_default_output_and_report_paths(tmp_path):
    in_path = G.save(G.matmul_constant(), tmp_path / "net.onnx")
    digest = _sha(in_path)
    sparsify(in_path, sparsity=0.5)
    assert _listing(tmp_path) == {"net.onnx", "net.sparse.onnx", "net.sparse.report.json"}
    assert _sha(in_path) == digest


def test_failed_run_leaves_nothing(tmp_path):
    """bf16 MatMul: discovered, but onnxruntime CPU cannot run it, so nothing is written."""
    in_path = G.save(G.bf16_matmul(), tmp_path / "in.onnx")
    digest = _sha(in_path)
    with pytest.raises(UnsupportedModelError, match="onnxruntime"):
        sparsify(in_path, tmp_path / "out.onnx", sparsity=0.5, report_path=False)
    assert _listing(tmp_path) == {"in.onnx"}
    assert _sha(in_path) == digest


def test_weight_behind_cast_is_pruned_and_stays_bf16(tmp_path):
    in_path = G.save(G.bf16_cast_matmul(), tmp_path / "in.onnx")
    out = tmp_path / "out.onnx"
    report = sparsify(in_path, out, sparsity=0.5, report_path=False)
    (w,) = [t for t in onnx.load(str(out)).graph.initializer if t.name == "W"]
    assert w.data_type == TensorProto.BFLOAT16
    assert int((numpy_helper.to_array(w).astype(np.float32) == 0).sum()) == report.required_zeros == 20


def test_apply_weights_does_not_touch_the_given_model():
    src = G.mixed()
    snapshot = src.SerializeToString()
    found = discover(src)
    new = {w.name: np.zeros(w.shape, np.float32) for w in found.weights}
    out = apply_weights(src, found.weights, new, {"method": "x"})
    assert src.SerializeToString() == snapshot
    assert all(not w.values(out).any() for w in found.weights)


# --------------------------------------------------------------------------------------------
# Storage forms written in place


@pytest.mark.parametrize("builder", [G.matmul_constant, lambda: G.matmul_identity(2, constant=True), G.conv_constant])
def test_constant_node_weight_pruned_in_place(builder, tmp_path):
    src = builder()
    in_path = G.save(src, tmp_path / "in.onnx")
    sparsify(in_path, tmp_path / "out.onnx", sparsity=0.5, report_path=False)
    out = onnx.load_model(str(tmp_path / "out.onnx"))
    assert len(out.graph.initializer) == len(src.graph.initializer) == 0  # no new initializer
    const = next(n for n in out.graph.node if n.op_type == "Constant")
    assert const.name == "w_const" and [a.name for a in const.attribute] == ["value"]
    value = numpy_helper.to_array(const.attribute[0].t)
    assert np.count_nonzero(value == 0) == _expected_zeros(0.5, value.size)
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in src.graph.node]  # Identity nodes kept


def test_identity_reached_initializer_pruned_in_place(tmp_path):
    src = G.matmul_identity(2)
    in_path = G.save(src, tmp_path / "in.onnx")
    sparsify(in_path, tmp_path / "out.onnx", sparsity=0.5, report_path=False)
    out = onnx.load_model(str(tmp_path / "out.onnx"))
    assert [t.name for t in out.graph.initializer] == ["W"]
    assert [(n.op_type, list(n.input)) for n in out.graph.node] == [
        ("Identity", ["W"]), ("Identity", ["W_id0"]), ("MatMul", ["x", "W_id1"])]
    assert np.count_nonzero(numpy_helper.to_array(out.graph.initializer[0]) == 0) == 20


def test_if_body_weights_are_written_in_place(tmp_path):
    src = G.if_model(share_outer=True)
    in_path = G.save(src, tmp_path / "in.onnx")
    report = sparsify(in_path, tmp_path / "out.onnx", sparsity=0.5, report_path=False)
    out = onnx.load_model(str(tmp_path / "out.onnx"))
    # W_shared: read by main-graph mm_side and inside the then-branch; W_else: a Constant in the else-branch
    assert sorted(row.name for row in report.layers) == ["W", "W_else", "W_shared"] and not report.skipped
    if_out = next(n for n in out.graph.node if n.op_type == "If")
    else_g = next(a.g for a in if_out.attribute if a.name == "else_branch")
    w_else = numpy_helper.to_array(else_g.node[0].attribute[0].t)
    shared = numpy_helper.to_array({t.name: t for t in out.graph.initializer}["W_shared"])
    w = numpy_helper.to_array({t.name: t for t in out.graph.initializer}["W"])
    assert sum(int(np.count_nonzero(a == 0)) for a in (w, w_else, shared)) == _expected_zeros(0.5, 40 + 20 + 20)
    assert int(np.count_nonzero(w_else == 0)) > 0  # the body's own tensor took zeros, in place
    # nothing else in the If changed: with the pruned values put back, the node is the input's byte for byte
    if_src = next(n for n in src.graph.node if n.op_type == "If")
    restored = onnx.NodeProto()
    restored.CopyFrom(if_out)
    src_else = next(a.g for a in if_src.attribute if a.name == "else_branch")
    next(a.g for a in restored.attribute if a.name == "else_branch").node[0].attribute[0].t.CopyFrom(
        src_else.node[0].attribute[0].t)
    assert restored.SerializeToString() == if_src.SerializeToString()


def test_excluded_weight_is_byte_identical(tmp_path):
    src = G.mixed()
    in_path = G.save(src, tmp_path / "in.onnx")
    report = sparsify(in_path, tmp_path / "out.onnx", sparsity=0.5, nodes_to_exclude=["^fc1$"],
                      report_path=False)
    out = onnx.load_model(str(tmp_path / "out.onnx"))
    assert [row.name for row in report.layers] == ["Wc", "W2"]
    assert_same_graph_except_pruned(src, out, {"Wc", "W2"})  # W1 is compared byte for byte
    assert _pruned_values_check(src, out, ["Wc", "W2"]) == _expected_zeros(0.5, 108 + 160)


# --------------------------------------------------------------------------------------------
# dtypes


def test_fp16_model_stays_fp16_and_runs(tmp_path):
    src = G.fp16_model()
    in_path = G.save(src, tmp_path / "in.onnx")
    sparsify(in_path, tmp_path / "out.onnx", sparsity=0.6, method="erk", report_path=False)
    out = onnx.load_model(str(tmp_path / "out.onnx"))
    tensors = _values_by_name(out)
    for name in ("Wc", "W1", "W2", "Bc"):
        assert tensors[name].data_type == TensorProto.FLOAT16
        assert numpy_helper.to_array(tensors[name]).dtype == np.float16
    zeros = _pruned_values_check(src, out, ["Wc", "W1", "W2"])
    assert zeros == _expected_zeros(0.6, 108 + 512 + 40)
    (y,) = _run(tmp_path / "out.onnx", _feed(src))
    assert y.dtype == np.float16 and y.shape == (2, 5) and np.all(np.isfinite(y))


@pytest.mark.parametrize("constant", [False, True])
def test_bf16_weight_written_back_as_bf16(constant, tmp_path):
    """onnxruntime CPU has no bf16 MatMul, so check write-back directly: dtype, values, checker."""
    src = G.bf16_matmul(constant=constant)
    found = discover(src)
    (w,) = found.weights
    assert w.dtype == "bfloat16"
    values = w.values(src)
    assert values.dtype == ml_dtypes.bfloat16
    masked = zero_smallest(values, 20)
    out = apply_weights(src, found.weights, {"W": masked}, {"method": "test"})
    path = tmp_path / "out.onnx"
    onnx.save_model(out, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    back = onnx.load_model(str(path))
    assert_same_graph_except_pruned(src, back, {"W"})
    t = _values_by_name(back)["W"]
    assert t.data_type == TensorProto.BFLOAT16 and list(t.dims) == [8, 5]
    written = numpy_helper.to_array(t)
    assert written.dtype == ml_dtypes.bfloat16
    assert written.tobytes() == masked.tobytes()
    assert np.count_nonzero(written.astype(np.float32) == 0) == 20
    assert _pruned_values_check(src, back, ["W"]) == 20


# --------------------------------------------------------------------------------------------
# External data


def test_external_input_gives_external_output(tmp_path):
    src = G.mlp_big()
    in_path = G.save(src, tmp_path / "in.onnx", external=True)
    data_digest, model_digest = _sha(tmp_path / "w.data"), _sha(in_path)
    out_path = tmp_path / "out.onnx"
    report = sparsify(in_path, out_path, sparsity=0.5, report_path=False)
    assert _listing(tmp_path) == {"in.onnx", "w.data", "out.onnx", "out.onnx.data"}
    assert _sha(tmp_path / "w.data") == data_digest and _sha(in_path) == model_digest
    assert {Path(p).name for p in report.output_files} == {"out.onnx", "out.onnx.data"}
    # the weights live in the data file, referenced by a relative location
    bare = onnx.load_model(str(out_path), load_external_data=False)
    for t in bare.graph.initializer:
        if t.name in ("W1", "W2"):
            assert t.data_location == TensorProto.EXTERNAL
            assert {e.key: e.value for e in t.external_data}["location"] == "out.onnx.data"
    out = onnx.load_model(str(out_path))
    onnx.checker.check_model(str(out_path), full_check=True)
    assert_same_graph_except_pruned(src, out, {"W1", "W2"}, exact_proto=False)
    assert _pruned_values_check(src, out, ["W1", "W2"]) == _expected_zeros(0.5, 1024 + 512)
    feed = _feed(src)
    (y,) = _run(out_path, feed)
    w1, w2 = numpy_helper.to_array(_values_by_name(out)["W1"]), numpy_helper.to_array(_values_by_name(out)["W2"])
    np.testing.assert_allclose(y, np.maximum(feed["x"] @ w1, 0) @ w2.T + G.rand((16,), 2), rtol=1e-4, atol=1e-4)


def test_rerun_into_the_working_directory_with_external_data(tmp_path, monkeypatch):
    """onnx's own save checks for an existing data file relative to the working directory:
    the second identical run, from the output's folder, used to fail with "cannot write"."""
    src = G.mlp_big()
    in_path = G.save(src, tmp_path / "in.onnx", external=True)
    monkeypatch.chdir(tmp_path)
    first = sparsify(in_path, Path("out.onnx"), sparsity=0.5, report_path=False)
    digest = _sha(tmp_path / "out.onnx.data")
    second = sparsify(in_path, Path("out.onnx"), sparsity=0.6, report_path=False)
    assert _listing(tmp_path) == {"in.onnx", "w.data", "out.onnx", "out.onnx.data"}
    assert _sha(tmp_path / "out.onnx.data") != digest  # replaced, not kept
    assert first.zero_params < second.zero_params
    assert _pruned_values_check(src, onnx.load_model("out.onnx"), ["W1", "W2"]) == _expected_zeros(0.6, 1024 + 512)


def test_external_input_written_as_single_file_on_request(tmp_path):
    src = G.mlp_big()
    in_path = G.save(src, tmp_path / "in.onnx", external=True)
    sparsify(in_path, tmp_path / "out.onnx", sparsity=0.5, external_data=False, report_path=False)
    assert _listing(tmp_path) == {"in.onnx", "w.data", "out.onnx"}
    bare = onnx.load_model(str(tmp_path / "out.onnx"), load_external_data=False)
    assert all(t.data_location != TensorProto.EXTERNAL for t in bare.graph.initializer)
    assert all(t.HasField("raw_data") for t in bare.graph.initializer)
    # exact_proto=False: onnx's external-data loader marks inline tensors data_location=DEFAULT explicitly
    assert_same_graph_except_pruned(src, bare, {"W1", "W2"}, exact_proto=False)
    _run(tmp_path / "out.onnx", _feed(src))


def test_self_contained_input_written_external_on_request(tmp_path):
    src = G.mlp_big()
    in_path = G.save(src, tmp_path / "in.onnx")
    sparsify(in_path, tmp_path / "out.onnx", sparsity=0.5, external_data=True, report_path=False)
    assert _listing(tmp_path) == {"in.onnx", "out.onnx", "out.onnx.data"}
    assert (tmp_path / "out.onnx").stat().st_size < (tmp_path / "out.onnx.data").stat().st_size
    _run(tmp_path / "out.onnx", _feed(src))


# --------------------------------------------------------------------------------------------
# Three-way agreement: onnxruntime on the written file == numpy on the written weights


def _written(path: Path, name: str) -> np.ndarray:
    return numpy_helper.to_array(_values_by_name(onnx.load_model(str(path)))[name]).astype(np.float64)


@pytest.mark.parametrize("case", ["gemm_transB1", "gemm_transB0", "gemm_weight_A", "matmul", "matmul_left",
                                  "matmul_batched", "constant_node"])
def test_onnxruntime_matches_numpy_on_written_weights(case, tmp_path):
    src = BUILDERS[case]()
    in_path = G.save(src, tmp_path / "in.onnx")
    feed = _feed(src)
    out_path = tmp_path / "out.onnx"
    sparsify(in_path, out_path, calibration_data={"x": feed["x"]}, sparsity=0.6, method="global",
              report_path=False)
    x, w = feed["x"].astype(np.float64), _written(out_path, "W")
    expected = {
        "gemm_transB1": lambda: x @ w.T + _written(out_path, "C"),
        "gemm_transB0": lambda: x @ w + _written(out_path, "C"),
        "gemm_weight_A": lambda: w.T @ x,
        "matmul": lambda: x @ w,
        "matmul_left": lambda: w @ x,
        "matmul_batched": lambda: x @ w,
        "constant_node": lambda: x @ w,
    }[case]()
    (sparse,) = _run(out_path, feed)
    (dense,) = _run(in_path, feed)
    np.testing.assert_allclose(sparse, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(sparse - dense).max() > 1e-3  # the written weights are the pruned ones


def test_onnxruntime_matches_numpy_for_conv(tmp_path):
    src = G.grouped_conv()
    in_path = G.save(src, tmp_path / "in.onnx")
    out_path = tmp_path / "out.onnx"
    sparsify(in_path, out_path, sparsity=0.5, report_path=False)
    feed = _feed(src)
    x, w, b = feed["x"].astype(np.float64), _written(out_path, "W"), _written(out_path, "B")
    # grouped 3x3 valid convolution (cross-correlation), 2 groups: 4 -> 6 channels
    out = np.zeros((1, 6, 6, 6))
    for o in range(6):
        g = o // 3
        for i in range(2):
            for dy in range(3):
                for dx in range(3):
                    out[0, o] += w[o, i, dy, dx] * x[0, 2 * g + i, dy:dy + 6, dx:dx + 6]
        out[0, o] += b[o]
    (y,) = _run(out_path, feed)
    np.testing.assert_allclose(y, out, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Shared weights


@pytest.mark.parametrize("via_identity", [False, True])
def test_shared_weight_pruned_once_for_both_readers(via_identity, tmp_path):
    src = G.shared_matmul(via_identity=via_identity)
    in_path = G.save(src, tmp_path / "in.onnx")
    out_path = tmp_path / "out.onnx"
    report = sparsify(in_path, out_path, sparsity=0.5, report_path=False)
    assert [(row.name, row.nodes, row.params) for row in report.layers] == [("W", ["mm1", "mm2"], 36)]
    assert report.total_params == 36 and report.zero_params == 18
    out = onnx.load_model(str(out_path))
    assert [t.name for t in out.graph.initializer] == ["W"]
    w = _written(out_path, "W")
    assert np.count_nonzero(w == 0) == 18
    feed = _feed(src)
    (y,) = _run(out_path, feed)
    np.testing.assert_allclose(y, feed["x"].astype(np.float64) @ w @ w, rtol=1e-4, atol=1e-4)


def test_shared_conv_weight_pruned_once(tmp_path):
    src = G.shared_conv()
    in_path = G.save(src, tmp_path / "in.onnx")
    report = sparsify(in_path, tmp_path / "out.onnx", sparsity=0.75, report_path=False)
    assert len(report.layers) == 1 and report.layers[0].nodes == ["conv1", "conv2"]
    out = onnx.load_model(str(tmp_path / "out.onnx"))
    assert len(out.graph.initializer) == 1
    assert np.count_nonzero(numpy_helper.to_array(out.graph.initializer[0]) == 0) == 108
    # both Conv nodes still read the one tensor
    assert [n.input[1] for n in out.graph.node] == ["W", "W"]
