"""Prunable-weight discovery on every weight-storage form (issue "Foundation", item 2).

Every graph is built in memory with onnx.helper (see graphs.py); onnxruntime is the oracle
that the graphs are valid and runnable. MACs are checked against hand formulas.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from fcpts_onnx import sparsify
from fcpts_onnx.discovery import PRUNABLE_OP_TYPES, discover
from fcpts_onnx.errors import OptionError, UnsupportedModelError
from fcpts_onnx.onnx_io import load_model

try:
    from . import graphs as G
except ImportError:
    import graphs as G


def _one(model: onnx.ModelProto, **kwargs):
    found = discover(model, **kwargs)
    assert len(found.weights) == 1, [w.name for w in found.weights]
    return found.weights[0]


def _consumers(w):
    return [(c.node_name, c.op_type, c.input_index) for c in w.consumers]


def _ort_runs(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


# --------------------------------------------------------------------------------------------
# One row per weight-storage form / op: what discovery must report.
# (builder, name, storage, shape, dtype, consumers, MACs by hand)

CASES = {
    # Conv: MACs = out H*W * size(W) (each output pixel of each output channel does C/g*k*k MACs)
    "conv": (G.conv, "W", "initializer", (6, 4, 3, 3), "float32", [("conv", "Conv", 1)], 6 * 6 * (6 * 4 * 9)),
    "conv_grouped": (G.grouped_conv, "W", "initializer", (6, 2, 3, 3), "float32", [("conv", "Conv", 1)],
                     6 * 6 * (6 * 2 * 9)),
    "conv_depthwise": (G.depthwise_conv, "W", "initializer", (4, 1, 3, 3), "float32", [("conv", "Conv", 1)],
                       6 * 6 * (4 * 1 * 9)),
    # ConvTranspose: every input pixel is scattered through the whole weight: in H*W * size(W)
    "conv_transpose": (G.conv_transpose, "W", "initializer", (4, 6, 3, 3), "float32",
                       [("deconv", "ConvTranspose", 1)], 5 * 5 * (4 * 6 * 9)),
    "conv_transpose_grouped": (G.grouped_conv_transpose, "W", "initializer", (4, 3, 3, 3), "float32",
                               [("deconv", "ConvTranspose", 1)], 5 * 5 * (4 * 3 * 9)),
    # Gemm/MatMul: M * N * K with K the contracted dim (chosen != the other dims to catch mix-ups)
    "gemm_transB1": (G.gemm, "W", "initializer", (5, 8), "float32", [("gemm", "Gemm", 1)], 3 * 5 * 8),
    "gemm_transB0": (lambda: G.gemm(trans_b=0), "W", "initializer", (8, 5), "float32", [("gemm", "Gemm", 1)],
                     3 * 5 * 8),
    "gemm_weight_A_transA": (G.gemm_weight_a, "W", "initializer", (8, 5), "float32", [("gemm", "Gemm", 0)],
                             5 * 3 * 8),
    "matmul_right": (G.matmul, "W", "initializer", (8, 5), "float32", [("mm", "MatMul", 1)], 3 * 5 * 8),
    "matmul_left": (G.matmul_left, "W", "initializer", (5, 8), "float32", [("mm", "MatMul", 0)], 5 * 3 * 8),
    "matmul_batched_3d": (G.matmul_batched, "W", "initializer", (2, 4, 5), "float32", [("mm", "MatMul", 1)],
                          2 * 3 * 5 * 4),
    # storage forms
    "constant_node": (G.matmul_constant, "W", "constant", (8, 5), "float32", [("mm", "MatMul", 1)], 3 * 5 * 8),
    "constant_node_conv": (G.conv_constant, "W", "constant", (6, 4, 3, 3), "float32", [("conv", "Conv", 1)],
                           6 * 6 * (6 * 4 * 9)),
    "identity_1": (lambda: G.matmul_identity(1), "W", "initializer", (8, 5), "float32", [("mm", "MatMul", 1)],
                   3 * 5 * 8),
    "identity_2": (lambda: G.matmul_identity(2), "W", "initializer", (8, 5), "float32", [("mm", "MatMul", 1)],
                   3 * 5 * 8),
    "identity_2_constant": (lambda: G.matmul_identity(2, constant=True), "W", "constant", (8, 5), "float32",
                            [("mm", "MatMul", 1)], 3 * 5 * 8),
    # behind Transpose (stored shape; MACs as the node reads it)
    "transpose_matmul": (G.matmul_via_transpose, "W", "initializer", (5, 8), "float32", [("mm", "MatMul", 1)],
                         3 * 5 * 8),
    "transpose_no_perm": (lambda: G.matmul_via_transpose(perm=False), "W", "initializer", (5, 8), "float32",
                          [("mm", "MatMul", 1)], 3 * 5 * 8),
    "transpose_constant": (lambda: G.matmul_via_transpose(constant=True), "W", "constant", (5, 8), "float32",
                           [("mm", "MatMul", 1)], 3 * 5 * 8),
    "transpose_twice": (lambda: G.matmul_via_transpose(depth=2), "W", "initializer", (8, 5), "float32",
                        [("mm", "MatMul", 1)], 3 * 5 * 8),
    "transpose_conv_hwio": (G.conv_via_transpose, "W", "initializer", (3, 3, 4, 6), "float32",
                            [("conv", "Conv", 1)], 6 * 6 * (6 * 4 * 9)),
    # dtypes
    "bf16_initializer": (G.bf16_matmul, "W", "initializer", (8, 5), "bfloat16", [("mm", "MatMul", 1)], 3 * 5 * 8),
    "bf16_constant": (lambda: G.bf16_matmul(constant=True), "W", "constant", (8, 5), "bfloat16",
                      [("mm", "MatMul", 1)], 3 * 5 * 8),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_discovers_each_storage_form(case):
    builder, name, storage, shape, dtype, consumers, macs = CASES[case]
    model = builder()
    onnx.checker.check_model(model, full_check=True)
    found = discover(model)
    assert found.skipped == []
    assert len(found.weights) == 1
    w = found.weights[0]
    assert (w.name, w.storage, w.shape, w.dtype) == (name, storage, shape, dtype)
    assert _consumers(w) == consumers
    assert w.macs == macs
    assert w.size == int(np.prod(shape))
    assert found.total_params == w.size
    assert w.external is False
    # storage/index locate the very tensor that holds the values
    via = " via Transpose" if case.startswith("transpose") else ""
    if storage == "initializer":
        assert model.graph.initializer[w.index].name == name
        assert w.where == "initializer" + via
    else:
        node = model.graph.node[w.index]
        assert node.op_type == "Constant" and node.output[0] == name
        assert w.where == "Constant node" + via
    t = w.tensor(model)
    assert tuple(t.dims) == shape
    np.testing.assert_array_equal(w.values(model), numpy_helper.to_array(t))


@pytest.mark.parametrize("case", [c for c in sorted(CASES) if not c.startswith("bf16")])
def test_case_graphs_run_in_onnxruntime(case):
    """The oracle: every float graph above is a valid model onnxruntime executes."""
    model = CASES[case][0]()
    x = model.graph.input[0]
    shape = [d.dim_value for d in x.type.tensor_type.shape.dim]
    (y,) = _ort_runs(model, {"x": np.ones(shape, np.float32)})
    assert list(y.shape) == [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]


def test_constant_value_attribute_is_the_located_tensor():
    model = G.matmul_constant()
    w = _one(model)
    # Changing the tensor discovery returns changes the Constant node's value attribute itself.
    w.tensor(model).raw_data = np.zeros((8, 5), np.float32).tobytes()
    node = model.graph.node[w.index]
    value = next(a.t for a in node.attribute if a.name == "value")
    assert not numpy_helper.to_array(value).any()
    assert len(model.graph.initializer) == 0


def test_identity_chain_resolves_to_source_not_alias():
    model = G.matmul_identity(2)
    w = _one(model)
    assert w.name == "W"  # not the Identity outputs W_id0 / W_id1
    assert {n.output[0] for n in model.graph.node if n.op_type == "Identity"} == {"W_id0", "W_id1"}


# --------------------------------------------------------------------------------------------
# Shared weights


@pytest.mark.parametrize("via_identity", [False, True])
def test_shared_matmul_weight_is_one_weight_with_two_consumers(via_identity):
    found = discover(G.shared_matmul(via_identity=via_identity))
    assert len(found.weights) == 1
    w = found.weights[0]
    assert w.name == "W" and w.shape == (6, 6)
    assert _consumers(w) == [("mm1", "MatMul", 1), ("mm2", "MatMul", 1)]
    assert found.total_params == 36  # counted once, not twice
    assert w.macs == 2 * (3 * 6 * 6)  # both readers' work


def test_shared_conv_weight_counted_once():
    found = discover(G.shared_conv())
    (w,) = found.weights
    assert w.node_names == ["conv1", "conv2"]
    assert found.total_params == 4 * 4 * 9
    assert w.macs == 2 * (8 * 8 * 4 * 4 * 9)


# --------------------------------------------------------------------------------------------
# Filters: --exclude and --op-types


def test_exclude_by_weight_name():
    found = discover(G.mixed(), exclude=["^W1$"])
    assert [w.name for w in found.weights] == ["Wc", "W2"]
    assert [(s.name, s.node_name, s.reason) for s in found.skipped] == [("W1", "fc1", "matches --exclude")]


def test_exclude_by_node_name_uses_search():
    found = discover(G.mixed(), exclude=["fc"])  # re.search: matches fc1 and fc2
    assert [w.name for w in found.weights] == ["Wc"]
    assert {(s.name, s.node_name, s.reason) for s in found.skipped} == {
        ("W1", "fc1", "matches --exclude"), ("W2", "fc2", "matches --exclude"),
    }


def test_exclude_not_matching_anything_changes_nothing():
    assert [w.name for w in discover(G.mixed(), exclude=["^nothing$"]).weights] == ["Wc", "W1", "W2"]


@pytest.mark.parametrize("excluded", ["mm1", "mm2"])
def test_excluding_any_reader_of_a_shared_weight_keeps_it_dense(excluded):
    found = discover(G.shared_matmul(), exclude=[f"^{excluded}$"])
    assert found.weights == []
    reasons = {(s.node_name, s.reason) for s in found.skipped if s.name == "W"}
    assert (excluded, "matches --exclude") in reasons
    assert any(r == "shared with a node that is not pruned" for _, r in reasons)


def test_op_types_filter_skips_other_ops_with_reason():
    found = discover(G.mixed(), op_types=["Conv"])
    assert [w.name for w in found.weights] == ["Wc"]
    assert {(s.name, s.op_type, s.reason) for s in found.skipped} == {
        ("W1", "Gemm", "Gemm not in --op-types"), ("W2", "MatMul", "MatMul not in --op-types"),
    }
    found = discover(G.mixed(), op_types=["Gemm", "MatMul"])
    assert [w.name for w in found.weights] == ["W1", "W2"]
    assert [s.name for s in found.skipped] == ["Wc"]


@pytest.mark.parametrize("keep", ["MatMul", "Gemm"])
def test_op_types_filter_on_weight_shared_by_two_op_types(keep):
    """A weight read by a MatMul and a Gemm: when either op type is filtered out, it stays whole."""
    model = G.shared_matmul()
    model.graph.node[1].op_type = "Gemm"  # h @ W as Gemm (same maths, transB=0)
    found = discover(model, op_types=[keep])
    assert found.weights == []
    assert any(s.reason == "shared with a node that is not pruned" for s in found.skipped)


def test_invalid_regex_is_an_option_error():
    with pytest.raises(OptionError, match=r"not a valid regular expression") as info:
        discover(G.matmul(), exclude=["fc[1"])
    assert "fc[1" in str(info.value)


def test_unknown_op_type_is_an_option_error():
    with pytest.raises(OptionError, match="LayerNormalization") as info:
        discover(G.matmul(), op_types=["MatMul", "LayerNormalization"])
    assert all(op in str(info.value) for op in PRUNABLE_OP_TYPES)


# --------------------------------------------------------------------------------------------
# What is not pruned


def test_if_branch_weights_are_pruned_where_they_are_stored():
    model = G.if_model()
    assert _ort_runs(model, {"x": np.ones((3, 8), np.float32)})[0].shape == (3, 4)
    found = discover(model)
    by_name = {w.name: w for w in found.weights}
    assert set(by_name) == {"W", "W_then", "W_else"} and not found.skipped
    assert by_name["W"].body == () and by_name["W"].consumers[0].body == ()
    # the If is node 3; W_then an initializer of its then-branch, W_else a Constant of its else-branch
    assert (by_name["W_then"].storage, by_name["W_then"].index, by_name["W_then"].body) == \
        ("initializer", 0, ((3, "then_branch"),))
    assert (by_name["W_else"].storage, by_name["W_else"].index, by_name["W_else"].body) == \
        ("constant", 0, ((3, "else_branch"),))
    assert [c.node_name for c in by_name["W_else"].consumers] == ["else_mm"]
    assert by_name["W_else"].consumers[0].body == ((3, "else_branch"),)
    for w in found.weights:  # each locates its own tensor, and the MACs are read inside the bodies too
        assert w.tensor(model).name == w.name and w.macs == 3 * w.size
    assert "in an If body" in by_name["W_else"].where


def test_main_graph_weight_read_in_an_if_body_is_pruned_with_both_readers():
    found = discover(G.if_model(share_outer=True))
    shared = next(w for w in found.weights if w.name == "W_shared")
    assert shared.body == ()
    assert {(c.node_name, c.body) for c in shared.consumers} == {("mm_side", ()), ("then_mm", ((3, "then_branch"),))}


def test_loop_and_scan_body_weights_are_pruned_with_every_reader():
    for model, name, body_reader, index in ((G.loop_model(), "W_loop", "body_mm", 1),
                                            (G.scan_model(), "W_scan", "body_mm", 1)):
        assert _ort_runs(model, {"x": np.ones((3, 8), np.float32)})[0].shape[-1] == 5
        found = discover(model)
        assert sorted(w.name for w in found.weights) == ["W", name] and not found.skipped
        weight = next(w for w in found.weights if w.name == name)
        assert {(c.node_name, c.body) for c in weight.consumers} == {(body_reader, ((index, "body"),)), ("out_mm", ())}


@pytest.mark.parametrize("kind", sorted(G.QUANTIZED))
def test_quantized_graphs_are_refused(kind, tmp_path):
    model = G.QUANTIZED[kind]()
    onnx.checker.check_model(model, full_check=True)
    with pytest.raises(UnsupportedModelError, match="quantized"):
        discover(model)
    path = G.save(model, tmp_path / "q.onnx")
    out = tmp_path / "q.sparse.onnx"
    with pytest.raises(UnsupportedModelError, match="quantized"):
        sparsify(path, out, sparsity=0.5, report_path=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx"]


def test_integer_weight_is_skipped_with_reason():
    i32 = TensorProto.INT32
    node = helper.make_node("MatMul", ["x", "Wi"], ["y"], name="mm_int")
    model = G.model([node], [G.vi("x", i32, [3, 4])], [G.vi("y", i32, [3, 5])],
                    [G.tensor("Wi", np.arange(20, dtype=np.int32).reshape(4, 5))])
    assert _ort_runs(model, {"x": np.ones((3, 4), np.int32)})[0].shape == (3, 5)
    found = discover(model)
    assert found.weights == []
    assert [(s.name, s.node_name, s.reason) for s in found.skipped] == [
        ("Wi", "mm_int", "INT32 weight; only float weights are pruned")]


def test_1d_float_weight_is_skipped_with_reason():
    node = helper.make_node("MatMul", ["x", "v"], ["y"], name="mm_vec")
    model = G.model([node], [G.vi("x", G.F32, [3, 4])], [G.vi("y", G.F32, [3])], [G.tensor("v", G.rand((4,)))])
    assert _ort_runs(model, {"x": np.ones((3, 4), np.float32)})[0].shape == (3,)
    found = discover(model)
    assert found.weights == []
    assert [(s.name, s.reason) for s in found.skipped] == [("v", "weight has fewer than 2 dimensions")]


@pytest.mark.parametrize("op", ["MatMul", "Conv"])
def test_weight_behind_cast_is_pruned_in_its_stored_dtype(op):
    """A bf16 weight cast to float for fp32 compute: the stored bf16 tensor is the weight."""
    model = G.bf16_cast_matmul(op=op)
    onnx.checker.check_model(model, full_check=True)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    _ort_runs(model, {"x": np.ones(shape, np.float32)})
    found = discover(model)
    assert found.skipped == []
    (w,) = found.weights
    assert (w.name, w.dtype, w.op_type, w.where) == ("W", "bfloat16", op, "initializer via Cast")
    assert w.consumers[0].via == ("Cast",) and w.consumers[0].perm is None


def test_cast_to_an_integer_type_is_not_followed():
    model = G.bf16_cast_matmul()
    next(n for n in model.graph.node if n.op_type == "Cast").attribute[0].i = TensorProto.INT32
    assert discover(model).weights == []


def test_conv_weight_from_graph_input_is_not_prunable():
    model = G.conv(bias=False)
    w = model.graph.initializer.pop()
    model.graph.input.append(G.vi("W", TensorProto.FLOAT, list(w.dims)))
    found = discover(model)
    assert found.weights == []


def test_fp16_weights_keep_their_dtype_and_storage():
    model = G.fp16_model()
    found = discover(model)
    assert [(w.name, w.storage, w.dtype, w.shape) for w in found.weights] == [
        ("Wc", "initializer", "float16", (4, 3, 3, 3)),
        ("W1", "initializer", "float16", (8, 64)),
        ("W2", "constant", "float16", (8, 5)),
    ]
    assert all(w.values(model).dtype == np.float16 for w in found.weights)


def test_external_data_weights_are_marked(tmp_path):
    path = G.save(G.mlp_big(), tmp_path / "m.onnx", external=True)
    assert (tmp_path / "w.data").is_file()
    loaded = load_model(path)
    assert loaded.external_data_files == ("w.data",)
    assert {"W1", "W2", "B2"} <= loaded.external_tensors
    found = discover(loaded.model, external=loaded.external_tensors)
    assert [(w.name, w.external) for w in found.weights] == [("W1", True), ("W2", True)]
    assert all("external data" in w.where for w in found.weights)
    # the values were loaded from the data file
    np.testing.assert_array_equal(found.weights[0].values(loaded.model), G.rand((32, 32), 0))


def test_mixed_model_discovers_every_storage_form_in_graph_order():
    model = G.mixed()
    found = discover(model)
    assert [(w.name, w.storage, w.op_type, w.node_names) for w in found.weights] == [
        ("Wc", "initializer", "Conv", ["conv"]),
        ("W1", "initializer", "Gemm", ["fc1"]),  # behind Identity id_w1
        ("W2", "constant", "MatMul", ["fc2"]),
    ]
    # the non-prunable bias tensors are neither weights nor skipped
    names = {w.name for w in found.weights} | {s.name for s in found.skipped}
    assert not names & {"Bc", "B1", "B2"}
    assert found.total_params == 108 + 1024 + 160


# --------------------------------------------------------------------------------------------
# Properties


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    group=st.integers(1, 3), per_group_in=st.integers(1, 3), per_group_out=st.integers(1, 3),
    k=st.integers(1, 3), extra=st.integers(0, 4), transpose=st.booleans(),
)
def test_conv_shape_and_macs_match_formula(group, per_group_in, per_group_out, k, extra, transpose):
    c_in, c_out, hw = group * per_group_in, group * per_group_out, k + extra
    if transpose:
        model = G.conv_transpose(c_in=c_in, c_out=c_out, k=k, group=group, hw=hw)
        shape, macs = (c_in, c_out // group, k, k), hw * hw * c_in * (c_out // group) * k * k
    else:
        model = G.conv(c_in=c_in, c_out=c_out, k=k, group=group, hw=hw)
        out = hw - k + 1
        shape, macs = (c_out, c_in // group, k, k), out * out * c_out * (c_in // group) * k * k
    w = _one(model)
    assert w.shape == shape
    assert w.macs == macs


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 6), k=st.integers(1, 6), n=st.integers(1, 6),
       form=st.sampled_from(["matmul", "matmul_left", "gemm1", "gemm0", "gemm_a"]))
def test_matmul_gemm_macs_are_m_n_k(m, k, n, form):
    model = {
        "matmul": lambda: G.matmul(m=m, k=k, n=n),
        "matmul_left": lambda: G.matmul_left(m=m, k=k, n=n),
        "gemm1": lambda: G.gemm(trans_b=1, m=m, k=k, n=n),
        "gemm0": lambda: G.gemm(trans_b=0, m=m, k=k, n=n),
        "gemm_a": lambda: G.gemm_weight_a(m=m, k=k, n=n),
    }[form]()
    w = _one(model)
    assert w.size == k * (n if form in ("matmul", "gemm1", "gemm0") else m)
    assert w.macs == m * n * k


@pytest.mark.parametrize("builder, perm, view", [
    (G.matmul_via_transpose, (1, 0), (8, 5)),
    (lambda: G.matmul_via_transpose(perm=False), (1, 0), (8, 5)),
    (lambda: G.matmul_via_transpose(depth=2), (0, 1), (8, 5)),
    (lambda: G.matmul_via_transpose(depth=3), (1, 0), (8, 5)),
    (G.conv_via_transpose, (3, 2, 0, 1), (6, 4, 3, 3)),
])
def test_transpose_fed_weight_records_the_permutation(builder, perm, view):
    """The node reads the stored tensor permuted: its axis i is the stored axis perm[i]."""
    model = builder()
    (c,) = _one(model).consumers
    w = _one(model)
    assert c.perm == perm and c.view_shape(w.shape) == view
    # the permutation is the one onnxruntime applies through the Transpose chain
    seen = np.transpose(w.values(model), perm)
    x = np.random.default_rng(0).standard_normal([d.dim_value for d in
                                                  model.graph.input[0].type.tensor_type.shape.dim]).astype(np.float32)
    (y,) = _ort_runs(model, {"x": x})
    if len(view) == 2:
        np.testing.assert_allclose(y, x @ seen, rtol=1e-5, atol=1e-5)
    else:  # Conv: the first output pixel is the full contraction of the first window
        expected = np.einsum("oihw,ihw->o", seen, x[0, :, :3, :3])
        np.testing.assert_allclose(y[0, :, 0, 0], expected, rtol=1e-5, atol=1e-5)


def test_transpose_with_a_perm_that_does_not_fit_is_left_alone():
    model = G.matmul_via_transpose()
    model.graph.node[0].attribute[0].ints[:] = [0, 1, 2]  # rank 3 perm on a 2-D weight: invalid
    found = discover(model)
    assert found.weights == []


def _reshaped_weight_model(shape_source: str):
    """x [N, 6] @ Reshape(W [1, 2, 3, 4], shape): tf.keras's attention output projection, its
    Reshape's shape computed from Shape nodes of the stored tensor ("computed"), stored ("stored"),
    read off the input ("from the input"), or the weight transposed before the Reshape."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(1, 2, 3, 4)).astype(np.float32), "W")]
    nodes = []
    if shape_source == "computed":  # [prod(dims 1..2), dim 3] of W itself
        inits += [numpy_helper.from_array(np.array([1, 2], np.int64), "lead"),
                  numpy_helper.from_array(np.array([3], np.int64), "last")]
        nodes += [helper.make_node("Shape", ["W"], ["ws"]), helper.make_node("Gather", ["ws", "lead"], ["wl"]),
                  helper.make_node("ReduceProd", ["wl"], ["rows"], keepdims=1),
                  helper.make_node("Gather", ["ws", "last"], ["cols"]),
                  helper.make_node("Concat", ["rows", "cols"], ["shape"], axis=0)]
    elif shape_source == "from the input":
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "one"))
        nodes += [helper.make_node("Shape", ["x"], ["xs"]), helper.make_node("Gather", ["xs", "one"], ["rows"]),
                  helper.make_node("Concat", ["rows", "minus1"], ["shape"], axis=0)]
        inits.append(numpy_helper.from_array(np.array([-1], np.int64), "minus1"))
    else:
        inits.append(numpy_helper.from_array(np.array([6, 0], np.int64) if shape_source == "stored"
                                             else np.array([6, -1], np.int64), "shape"))
    source = "W"
    if shape_source == "transposed first":
        nodes.append(helper.make_node("Transpose", ["W"], ["Wt"], perm=[0, 2, 1, 3]))
        source = "Wt"
    nodes += [helper.make_node("Reshape", [source, "shape"], ["Wr"]), helper.make_node("MatMul", ["x", "Wr"], ["y"])]
    graph = helper.make_graph(nodes, "reshaped", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("shape_source", ["computed", "stored"])
def test_a_weight_behind_a_reshape_known_before_the_run_is_prunable_in_the_layout_it_is_read(shape_source):
    model = _reshaped_weight_model(shape_source)
    if shape_source == "stored":  # 0 copies the stored axis: [6, 0] of [1, 2, 3, 4] is [6, 2]... which does not fit
        found = discover(model)
        assert found.weights == []
        model.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.array([6, -1], np.int64), "shape"))
    (w,) = discover(model).weights
    assert w.shape == (1, 2, 3, 4) and w.where == "initializer via Reshape"
    assert w.consumers[0].view_shape(w.shape) == (6, 4) and w.matrix_shape == (6, 4)
    x = np.random.default_rng(1).normal(size=(5, 6)).astype(np.float32)
    (ours,) = _ort_runs(model, {"x": x})
    assert ours.shape == (5, 4)


@pytest.mark.parametrize("shape_source", ["from the input", "transposed first"])
def test_a_weight_behind_a_reshape_it_cannot_read_before_the_run_is_left_alone(shape_source):
    assert discover(_reshaped_weight_model(shape_source)).weights == []


@pytest.mark.parametrize("equation,weight_input,expected", [
    ("abc,cde->abde", 1, ((1, 2), (0,))),   # tf.keras EinsumDense: x [B, T, C] by W [C, H, D]
    ("abcd,cde->abe", 1, ((2,), (0, 1))),   # its attention output projection
    ("oc,nc->no", 0, ((0,), (1,))),         # the weight first
    (" ab , bc -> ac ", 1, ((1,), (0,))),   # spaces are allowed
    ("ab,bc", 1, None),                     # implicit output
    ("ab,b...->a...", 1, None),             # an ellipsis in the weight
    ("ab,bb->ab", 1, None),                 # a diagonal of the weight
    ("ab,bcd->ac", 1, None),                # d summed on its own
    ("ab,ab->a", 1, None),                  # a shared with x's output: not a linear layer
    ("ab,bc,cd->ad", 1, None),              # three operands
])
def test_einsum_weight_axes(equation, weight_input, expected):
    from fcpts_onnx.discovery import einsum_weight_axes

    assert einsum_weight_axes(equation, weight_input) == expected


def _einsum_model(equation="abc,cde->abde", w_shape=(24, 2, 3)):
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Einsum", ["x", "W"], ["h"], equation=equation), helper.make_node("Add", ["h", "b"], ["y"])],
        "einsum", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, w_shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, *w_shape[1:]])],
        [numpy_helper.from_array(rng.normal(size=w_shape).astype(np.float32), "W"),
         numpy_helper.from_array(rng.normal(size=w_shape[1:]).astype(np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_an_einsum_by_a_weight_is_a_prunable_layer_with_its_bias_protected_outputs_and_macs(tmp_path):
    from fcpts_onnx.inspection import inspect_model
    from fcpts_onnx.learner.options import LearnOptions
    from fcpts_onnx.torchform import OnnxModule

    model = _einsum_model()
    (w,) = discover(model).weights
    assert (w.name, w.op_type, w.shape) == ("W", "Einsum", (24, 2, 3))
    module = OnnxModule(model, prunable=[w])
    assert {s.name: s.role for s in module.sources.values()} == {"W": "weight", "b": "bias"}
    path = tmp_path / "einsum.onnx"
    path.write_bytes(model.SerializeToString())
    (layer,) = inspect_model(path, input_shapes={"x": (1, 4, 24)})["layers"]
    assert layer["macs"] == 4 * 2 * 3 * 24  # every output element sums over C = 24
    x = np.random.default_rng(1).normal(size=(64, 4, 24)).astype(np.float32)
    report = sparsify(path, tmp_path / "sparse.onnx", {"x": x}, sparsity=0.95, method="fcpts",
                      learn=LearnOptions(iters=6, seed=0), report_path=False)
    assert report.zero_params == round(0.95 * 144)  # 7 weights left for 6 outputs
    written = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "sparse.onnx")).graph.initializer}
    # outputs are indexed by (d, e), two axes: each of the 6 pairs keeps a weight
    assert (np.abs(written["W"]).max(axis=0) > 0).all()


def test_tables_name_a_torch_linear_weight_by_its_reader_and_the_json_keeps_the_tensor_name(tmp_path):
    # torch's legacy exporter stores Linear weights transposed as "onnx::MatMul_<n>"; the node
    # that reads one ("/q/MatMul") says which layer it is
    import torch

    from fcpts_onnx.inspection import format_inspection, inspect_model

    class TwoLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.out = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.out(torch.relu(self.q(x)))

    path = tmp_path / "linear.onnx"
    torch.onnx.export(TwoLinear(), (torch.randn(2, 5, 8),), str(path), dynamo=False, opset_version=17)
    info = inspect_model(path)
    assert all(layer["name"].startswith("onnx::MatMul_") for layer in info["layers"])
    table = format_inspection(info)
    assert "/q/MatMul" in table and "/out/MatMul" in table
    assert not any(layer["name"] in table for layer in info["layers"])
