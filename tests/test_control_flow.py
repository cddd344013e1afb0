"""If, Loop and Scan graphs: the trainable form runs their bodies exactly (onnxruntime is the
oracle), and the weights the bodies read are pruned, learned and written back where they are
stored: in the main graph, or in a body as an initializer or a Constant node.

Where such graphs come from: torch's legacy exporter writes an If for ``squeeze(dim)`` on a
dynamic axis and for scripted branches; the dynamo exporter for ``torch.cond`` (silero-vad's
op18 "ifless" export puts the 16 kHz and 8 kHz networks in the two branches of one If, their
weights in the main graph); spox-built graphs keep the weights in the branches as Constants.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from fcpts_onnx import sparsify
from fcpts_onnx.discovery import discover
from fcpts_onnx.errors import UnsupportedModelError
from fcpts_onnx.learner.options import LearnOptions
from fcpts_onnx.torchform.module import OnnxModule

try:
    from . import graphs as G
except ImportError:  # run as a plain module
    import graphs as G

F32 = TensorProto.FLOAT
WIDTH = 6
STORAGES = ("main", "initializer", "constant")  # where a branch's weight is stored


def _weight(tag: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, tag])
    return (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)


def nested_if(depth: int, storages: tuple[str, ...], seed: int = 0, by_shape: bool = False) -> onnx.ModelProto:
    """x [N, 6] -> h = x @ W0; then ``depth`` nested Ifs. Level k branches on
    sum(x * s_k) > 0 (s_k a main-graph constant, read from k levels down), so each batch
    picks its path; with ``by_shape`` on x's width, 6 > 3 * (k + 1) (then, else, else...), the same
    for every batch, as torch's squeeze-on-a-dynamic-axis If does. A body on the path
    P ("t" for a then-branch, "e" for an else-branch, outermost first: "te" is the else-branch
    inside the outer then-branch) multiplies h by its weight W<P>: Relu(h @ W<P>) in a
    then-branch, 0.5 * (h @ W<P>) in an else-branch, plus the next level's If inside it.
    ``storages[k]`` says where level k's weights are stored (the main graph, a body
    initializer or a body Constant node). The output is the outermost If's plus h (an outer
    value read again after)."""
    inits = [numpy_helper.from_array(_weight(0, seed), "W0")]
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["h"], name="mm0")]
    for k in range(depth):
        scale = np.random.default_rng(seed + 100 + k).standard_normal(WIDTH).astype(np.float32)
        inits.append(numpy_helper.from_array(scale, f"s{k}"))
        if by_shape:
            inits.append(numpy_helper.from_array(np.array([3 * (k + 1)], np.int64), f"bound{k}"))
            nodes += [helper.make_node("Shape", ["x"], [f"width{k}"], start=1),
                      helper.make_node("Greater", [f"width{k}", f"bound{k}"], [f"cond{k}"])]
        else:
            nodes += [helper.make_node("Mul", ["x", f"s{k}"], [f"xs{k}"]),
                      helper.make_node("ReduceSum", [f"xs{k}"], [f"sum{k}"], keepdims=0),
                      helper.make_node("Greater", [f"sum{k}", "zero"], [f"cond{k}"])]
    inits.append(numpy_helper.from_array(np.array(0.0, np.float32), "zero"))

    def level(k: int, prefix: str) -> tuple[onnx.GraphProto, onnx.GraphProto]:
        bodies = []
        for branch in "te":
            path = prefix + branch
            name = f"W{path}"
            values = _weight(len(path) * 31 + sum(ord(c) for c in path), seed)
            body_nodes, body_inits = [], []
            _store(values, name, storages[k], inits, body_nodes, body_inits)
            body_nodes.append(helper.make_node("MatMul", ["h", name], [f"{path}_mm"], name=f"{path}_mm"))
            if branch == "t":
                body_nodes.append(helper.make_node("Relu", [f"{path}_mm"], [f"{path}_a"]))
            else:
                body_nodes += [helper.make_node("Constant", [], [f"{path}_half"],
                                                value=numpy_helper.from_array(np.array(0.5, np.float32))),
                               helper.make_node("Mul", [f"{path}_mm", f"{path}_half"], [f"{path}_a"])]
            out = f"{path}_a"
            if k + 1 < depth:
                inner_then, inner_else = level(k + 1, path)
                body_nodes += [helper.make_node("If", [f"cond{k + 1}"], [f"{path}_if"], name=f"{path}_if",
                                                then_branch=inner_then, else_branch=inner_else),
                               helper.make_node("Add", [out, f"{path}_if"], [f"{path}_out"])]
                out = f"{path}_out"
            bodies.append(helper.make_graph(body_nodes, f"body_{path}", [],
                                            [helper.make_tensor_value_info(out, F32, ["N", WIDTH])], body_inits))
        return bodies[0], bodies[1]

    if depth:
        then_g, else_g = level(0, "")
        nodes += [helper.make_node("If", ["cond0"], ["y0"], name="if0", then_branch=then_g, else_branch=else_g),
                  helper.make_node("Add", ["y0", "h"], ["y"])]
    else:
        nodes.append(helper.make_node("Relu", ["h"], ["y"]))
    graph = helper.make_graph(nodes, "nested_if", [helper.make_tensor_value_info("x", F32, ["N", WIDTH])],
                              [helper.make_tensor_value_info("y", F32, ["N", WIDTH])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def _layers(depth: int) -> int:
    return 2 ** (depth + 1) - 1  # W0 and one weight per body


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _torch(module: OnnxModule, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x))[0].numpy()


# --------------------------------------------------------------------------------------------
# The trainable form


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(depth=st.integers(1, 3), storages=st.lists(st.sampled_from(STORAGES), min_size=3, max_size=3),
       seed=st.integers(0, 1000), batch=st.integers(1, 5))
def test_nested_ifs_match_onnxruntime_on_every_path(depth, storages, seed, batch):
    model = nested_if(depth, tuple(storages), seed)
    module = OnnxModule(model, discover(model).weights)
    rng = np.random.default_rng(seed)
    for _ in range(6):  # each draw takes its own path through the levels
        x = rng.standard_normal((batch, WIDTH)).astype(np.float32)
        np.testing.assert_allclose(_torch(module, x), _ort(model, x), rtol=1e-5, atol=1e-5)
    assert sum(module.body_runs.values()) == 6 * depth  # every draw went through every level once


def test_both_branches_of_the_shared_weight_model_match_onnxruntime():
    for share_outer in (False, True):
        model = G.if_model(share_outer=share_outer)
        module = OnnxModule(model, discover(model).weights)
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        taken = set()
        for sign in (1.0, -1.0):
            x = np.abs(G.rand((3, 8), 5)) * sign
            expected = session.run(None, {"x": x})
            with torch.no_grad():
                got = module(torch.from_numpy(x))
            for e, g in zip(expected, got):
                np.testing.assert_allclose(g.numpy(), e, rtol=1e-5, atol=1e-6)
            taken |= set(module.body_runs)
        assert taken == {((3, "then_branch"),), ((3, "else_branch"),)}


def test_a_mask_on_a_body_stored_weight_reaches_the_body():
    """Learning masks weights through weight_transforms; a body's own weight must go through it too."""
    model = nested_if(1, ("constant",))
    module = OnnxModule(model, discover(model).weights)
    x = np.abs(G.rand((2, WIDTH), 3))  # sum(x * s0) decides the branch: find which one ran
    dense = _torch(module, x)
    (path,) = module.body_runs
    branch_key = next(k for k, src in module.sources.items() if src.body == path)
    module.weight_transforms[branch_key] = lambda w: torch.zeros_like(w)
    masked = _torch(module, x)
    h = x @ _weight(0, 0)
    # with the branch's weight zeroed the If gives 0 (Relu(0) or 0.5 * 0): the output is h alone
    np.testing.assert_allclose(masked, h, rtol=1e-5, atol=1e-6)
    assert not np.allclose(dense, masked)


def test_gradients_reach_weights_in_the_main_graph_and_in_bodies():
    model = nested_if(2, ("main", "constant", "initializer"))
    module = OnnxModule(model, discover(model).weights)
    x = torch.from_numpy(G.rand((4, WIDTH), 7))
    module(x)[0].square().sum().backward()
    touched = {module.sources[k].name for k in module.prunable_keys
               if module.parameter(k).grad is not None and module.parameter(k).grad.abs().sum() > 0}
    (path,) = [p for p in module.body_runs if len(p) == 1]
    ran = "Wt" if path[0][1] == "then_branch" else "We"
    assert {"W0", ran} <= touched
    assert ({"Wt", "We"} - {ran}).isdisjoint(touched)  # the branch that did not run got nothing
    assert len(touched) == 3  # W0, the outer branch's weight, one inner branch's weight


def test_loop_and_scan_fixtures_match_onnxruntime():
    for model in (G.loop_model(), G.scan_model()):
        module = OnnxModule(model, discover(model).weights)
        x = G.rand((3, 8), 4)
        expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
        with torch.no_grad():
            np.testing.assert_allclose(module(torch.from_numpy(x))[0].numpy(), expected[0], rtol=1e-5, atol=1e-6)
        assert list(module.body_runs) == [((1, "body"),)]


def test_a_graph_with_no_implementation_is_still_refused_by_the_trainable_form():
    model = G.if_model()
    model.graph.node[1].op_type = "ReduceSumMadeUp"
    with pytest.raises(UnsupportedModelError, match=r"ReduceSumMadeUp .*use a data-free method"):
        OnnxModule(model)


# --------------------------------------------------------------------------------------------
# Discovery and write-back


def test_discovery_finds_every_branch_weight_where_it_is_stored():
    model = nested_if(3, ("main", "initializer", "constant"))
    found = discover(model)
    by_name = {w.name: w for w in found.weights}
    paths = [a + b + c for a in "te" for b in "te" for c in "te"]
    expected = {"W0", "Wt", "We"} | {f"W{p[:2]}" for p in paths} | {f"W{p}" for p in paths}
    assert set(by_name) == expected and len(expected) == _layers(3) and not found.skipped
    if_index = len(model.graph.node) - 2
    assert by_name["Wt"].body == () and by_name["Wt"].consumers[0].body == ((if_index, "then_branch"),)
    # level 1 sits in the bodies of the If inside each outer body: two bodies down
    (inner_if,) = [j for j, n in enumerate(next(a.g for a in model.graph.node[if_index].attribute
                                                 if a.name == "else_branch").node) if n.op_type == "If"]
    assert (by_name["Wet"].storage, by_name["Wet"].body) == \
        ("initializer", ((if_index, "else_branch"), (inner_if, "then_branch")))
    assert by_name["Wete"].storage == "constant" and len(by_name["Wete"].body) == 3
    for w in found.weights:
        assert w.tensor(model).name == w.name
        assert w.macs == WIDTH * WIDTH  # per sample: shape inference reaches into the bodies


@pytest.mark.parametrize("method", ["global", "lamp", "uniform", "erk"])
def test_data_free_methods_prune_branch_weights_exactly(method, tmp_path):
    model = nested_if(2, ("constant", "initializer"))
    src = G.save(model, tmp_path / "in.onnx")
    before = src.read_bytes()
    report = sparsify(src, tmp_path / "out.onnx", sparsity=0.6, method=method, report_path=False)
    assert src.read_bytes() == before
    out = onnx.load_model(str(tmp_path / "out.onnx"))
    found = discover(out)
    zeros = sum(int(np.count_nonzero(w.values(out) == 0)) for w in found.weights)
    total = sum(w.size for w in found.weights)
    assert total == _layers(2) * WIDTH * WIDTH and zeros == round(0.6 * total) == report.zero_params
    for name in ("Wt", "Wet"):  # the body-stored ones really changed, in place
        w = next(w for w in found.weights if w.name == name)
        assert np.count_nonzero(w.values(out) == 0) > 0 and w.storage == ("constant" if name == "Wt" else "initializer")
    x = G.rand((4, WIDTH), 9)
    assert _ort(out, x).shape == (4, WIDTH)


def test_fcpts_learns_and_writes_branch_weights_with_an_exact_count(tmp_path):
    model = nested_if(2, ("constant", "main"), by_shape=True)  # every batch takes "t" then "te"
    src = G.save(model, tmp_path / "in.onnx")
    x = np.random.default_rng(0).standard_normal((256, WIDTH)).astype(np.float32)
    out_path = tmp_path / "out.onnx"
    report = sparsify(src, out_path, {"x": x}, sparsity=0.5, learn=LearnOptions(iters=40, batch_size=16, seed=0),
                      report_path=False)
    assert report.method == "fcpts" and report.learning["parity"]["passed"]
    out = onnx.load_model(str(out_path))
    found = discover(out)
    zeros = sum(int(np.count_nonzero(w.values(out) == 0)) for w in found.weights)
    assert zeros == round(0.5 * _layers(2) * WIDTH * WIDTH) == report.zero_params
    # the surviving weights of the Constant in the then-branch were tuned and written in place
    assert report.learning["best_step"] > 0
    tuned = next(w for w in found.weights if w.name == "Wt").values(out)
    original = next(w for w in discover(model).weights if w.name == "Wt").values(model)
    kept = tuned != 0
    assert not np.allclose(tuned[kept], original[kept])
    # the bodies no batch took are named, and a note says what that means
    assert sorted(report.learning["weights_in_untaken_branches"]) == ["We", "Wee", "Wet", "Wtt"]
    assert any("4 weight(s) sit in If branches that no calibration batch took" in n for n in report.notes)


def test_fcpts_runs_where_each_batch_picks_its_branch(tmp_path):
    model = nested_if(2, ("initializer", "constant"))
    src = G.save(model, tmp_path / "in.onnx")
    x = np.random.default_rng(1).standard_normal((96, WIDTH)).astype(np.float32)
    report = sparsify(src, tmp_path / "out.onnx", {"x": x}, sparsity=0.6,
                      learn=LearnOptions(iters=12, batch_size=8, seed=0), report_path=False)
    out = onnx.load_model(str(tmp_path / "out.onnx"))
    zeros = sum(int(np.count_nonzero(w.values(out) == 0)) for w in discover(out).weights)
    assert zeros == round(0.6 * _layers(2) * WIDTH * WIDTH) == report.zero_params
    # batches of 8 go their own ways: over the run every body was taken, and nothing is noted
    assert report.learning["weights_in_untaken_branches"] == []
    assert not any("If branches" in n for n in report.notes)


# --------------------------------------------------------------------------------------------
# A real exporter's If


class _SqueezeCRNN(torch.nn.Module):
    """A CRNN-style recogniser: convolutions to height 1, squeeze(2), a BiLSTM and a Linear per step."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d((4, 1)))
        self.rnn = nn.LSTM(16, 12, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(24, 7)

    def forward(self, x):
        features = self.conv(x).squeeze(2)  # the height is dynamic in the export: torch writes an If
        hidden, _ = self.rnn(features.permute(0, 2, 1))
        return self.fc(hidden)


def _legacy_export(module: torch.nn.Module, example: torch.Tensor, path, opset: int, dynamic_axes: dict) -> onnx.ModelProto:
    """``module`` (in eval mode) through torch's legacy exporter, input x and output y, its
    deprecation warnings silenced; returns the model loaded back."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset, input_names=["x"],
                          output_names=["y"], dynamic_axes=dynamic_axes)
    return onnx.load_model(str(path))


def test_torch_legacy_squeeze_on_a_dynamic_axis_runs_and_is_sparsified(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "crnn.onnx"
    model = _legacy_export(_SqueezeCRNN().eval(), torch.randn(2, 3, 8, 32), path, 13,
                           {"x": {0: "batch", 2: "height", 3: "width"}, "y": {0: "batch", 1: "steps"}})
    assert [n.op_type for n in model.graph.node].count("If") == 1
    x = np.random.default_rng(0).standard_normal((64, 3, 8, 32)).astype(np.float32)
    module = OnnxModule(model, discover(model).weights)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(module(torch.from_numpy(x[:4]))[0].numpy(), session.run(None, {"x": x[:4]})[0],
                                   rtol=1e-4, atol=1e-5)
    report = sparsify(path, tmp_path / "out.onnx", {"x": x}, sparsity=0.6,
                      learn=LearnOptions(iters=10, batch_size=16, seed=0), report_path=False)
    assert report.method == "fcpts" and report.learning["parity"]["passed"]
    assert len(report.layers) == 5  # two convolutions, the LSTM's W and R, the Linear
    out = onnx.load_model(str(tmp_path / "out.onnx"))
    zeros = sum(int(np.count_nonzero(w.values(out) == 0)) for w in discover(out).weights)
    assert zeros == report.zero_params == round(0.6 * report.total_params)


# --------------------------------------------------------------------------------------------
# Loop


def _store(values: np.ndarray, name: str, storage: str, inits: list, body_nodes: list, body_inits: list) -> None:
    """Put a body's weight where ``storage`` says: the main graph, a body initializer or a body Constant."""
    if storage == "main":
        inits.append(numpy_helper.from_array(values, name))
    elif storage == "initializer":
        body_inits.append(numpy_helper.from_array(values, name))
    else:
        body_nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(values, name)))


def loop_graph(trips: str, cond: str, n_scans: int, storage: str, seed: int = 0,
               scans_batch_first: bool = False) -> onnx.ModelProto:
    """x [N, 6] -> h = x @ W0, then a Loop carrying v (from h): v <- tanh(v @ WL) + 0.1 * i.
    ``trips``: "const" (3 iterations at most), "absent", or "computed" (x's width // 2, by
    Shape ops). ``cond``: "absent" (the body's is ignored), "count" (the body continues while
    i < 2: a while loop), or "data" (while mean |v| > 0.05, a value the data decides; only with
    a trip count). ``n_scans`` scan outputs (v * k each iteration), stacked [K, N, 6] by the Loop;
    ``scans_batch_first`` transposes them to [N, K, 6]. ``storage``: where WL is stored."""
    rng = np.random.default_rng(seed)
    wl = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
    inits = [numpy_helper.from_array(_weight(0, seed), "W0")]
    body_nodes, body_inits = [], []
    _store(wl, "WL", storage, inits, body_nodes, body_inits)
    body_nodes += [helper.make_node("MatMul", ["v_in", "WL"], ["mm"], name="loop_mm"),
                   helper.make_node("Tanh", ["mm"], ["t"]),
                   helper.make_node("Cast", ["i"], ["i_f"], to=TensorProto.FLOAT),
                   helper.make_node("Constant", [], ["tenth"], value=numpy_helper.from_array(np.float32(0.1))),
                   helper.make_node("Mul", ["i_f", "tenth"], ["step"]),
                   helper.make_node("Add", ["t", "step"], ["v_out"])]
    if cond == "count":
        body_nodes += [helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.int64(2))),
                       helper.make_node("Less", ["i", "two"], ["cond_out"])]
    elif cond == "data":
        body_nodes += [helper.make_node("Abs", ["v_out"], ["a"]),
                       helper.make_node("ReduceMean", ["a"], ["m"], keepdims=0),
                       helper.make_node("Constant", [], ["lim"], value=numpy_helper.from_array(np.float32(0.05))),
                       helper.make_node("Greater", ["m", "lim"], ["cond_out"])]
    else:
        body_nodes.append(helper.make_node("Identity", ["cond_in"], ["cond_out"]))
    scan_names = []
    for k in range(n_scans):
        body_nodes += [helper.make_node("Constant", [], [f"k{k}"], value=numpy_helper.from_array(np.float32(k + 1))),
                       helper.make_node("Mul", ["v_out", f"k{k}"], [f"scan{k}"])]
        scan_names.append(f"scan{k}")
    body = helper.make_graph(
        body_nodes, "loop_body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", F32, ["N", WIDTH])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", F32, ["N", WIDTH])]
        + [helper.make_tensor_value_info(n, F32, ["N", WIDTH]) for n in scan_names], body_inits)
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["h"], name="mm0")]
    if trips == "const":
        inits.append(numpy_helper.from_array(np.array(3, np.int64), "M"))
    elif trips == "computed":
        inits.append(numpy_helper.from_array(np.array(2, np.int64), "halve"))
        nodes += [helper.make_node("Shape", ["x"], ["shape"], start=1, end=2),
                  helper.make_node("Squeeze", ["shape"], ["width"]),
                  helper.make_node("Div", ["width", "halve"], ["M"])]
    if cond != "absent":
        inits.append(numpy_helper.from_array(np.array(True), "c0"))
    loop_inputs = ["M" if trips != "absent" else "", "c0" if cond != "absent" else "", "h"]
    loop_outputs = ["v", *[f"stacked{k}" for k in range(n_scans)]]
    nodes.append(helper.make_node("Loop", loop_inputs, loop_outputs, name="loop", body=body))
    outputs = [helper.make_tensor_value_info("v", F32, ["N", WIDTH])]
    for k in range(n_scans):
        if scans_batch_first:
            nodes.append(helper.make_node("Transpose", [f"stacked{k}"], [f"scans{k}"], perm=[1, 0, 2]))
            outputs.append(helper.make_tensor_value_info(f"scans{k}", F32, ["N", "K", WIDTH]))
        else:
            outputs.append(helper.make_tensor_value_info(f"stacked{k}", F32, ["K", "N", WIDTH]))
    graph = helper.make_graph(nodes, "loop", [helper.make_tensor_value_info("x", F32, ["N", WIDTH])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


LOOP_KINDS = [(t, c) for t in ("const", "absent", "computed") for c in ("absent", "count", "data")
              if not (t == "absent" and c in ("absent", "data"))]  # those would never end


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(LOOP_KINDS), n_scans=st.integers(0, 2), storage=st.sampled_from(STORAGES),
       seed=st.integers(0, 1000), batch=st.integers(1, 4))
def test_loops_match_onnxruntime(kind, n_scans, storage, seed, batch):
    trips, cond = kind
    model = loop_graph(trips, cond, n_scans, storage, seed)
    found = discover(model)
    assert {w.name for w in found.weights} == {"W0", "WL"} and not found.skipped
    module = OnnxModule(model, found.weights)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    for _ in range(3):
        x = (rng.standard_normal((batch, WIDTH)) * rng.uniform(0.05, 2)).astype(np.float32)
        expected = session.run(None, {"x": x})
        with torch.no_grad():
            got = module(torch.from_numpy(x))
        assert len(got) == len(expected)
        for e, g in zip(expected, got):
            assert g.shape == e.shape
            np.testing.assert_allclose(g.numpy(), e, rtol=1e-5, atol=1e-5)


def test_a_loop_that_runs_no_iteration_returns_its_initial_values_and_empty_scans():
    model = loop_graph("const", "absent", 1, "main")
    next(t for t in model.graph.initializer if t.name == "M").CopyFrom(numpy_helper.from_array(np.array(0, np.int64), "M"))
    body = next(a.g for a in model.graph.node[-1].attribute if a.name == "body")
    for value in body.output[1:]:  # a static shape to make the empty scan output of
        value.type.tensor_type.shape.dim[0].dim_value = 2
    x = G.rand((2, WIDTH), 1)
    module = OnnxModule(model, discover(model).weights)
    with torch.no_grad():
        v, stacked = module(torch.from_numpy(x))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    v_ref, stacked_ref = session.run(None, {"x": x})
    np.testing.assert_allclose(v.numpy(), v_ref, rtol=1e-5, atol=1e-6)
    assert tuple(stacked.shape) == stacked_ref.shape == (0, 2, WIDTH)
    assert not module.body_runs  # the body never ran: its weights learned nothing


@pytest.mark.parametrize("storage", STORAGES)
def test_fcpts_learns_and_writes_loop_body_weights(storage, tmp_path):
    model = loop_graph("const", "data", 1, storage, scans_batch_first=True)
    src = G.save(model, tmp_path / "in.onnx")
    x = np.random.default_rng(0).standard_normal((128, WIDTH)).astype(np.float32)
    report = sparsify(src, tmp_path / "out.onnx", {"x": x}, sparsity=0.5,
                      learn=LearnOptions(iters=20, batch_size=16, seed=0), report_path=False)
    assert report.learning["parity"]["passed"] and report.learning["weights_in_untaken_branches"] == []
    out = onnx.load_model(str(tmp_path / "out.onnx"))
    found = discover(out)
    assert sum(int(np.count_nonzero(w.values(out) == 0)) for w in found.weights) == report.zero_params == 36
    wl = next(w for w in found.weights if w.name == "WL")
    assert wl.storage == ("initializer" if storage != "constant" else "constant")
    assert bool(wl.body) == (storage != "main")
    assert np.count_nonzero(wl.values(out) == 0) > 0


def test_a_loop_that_never_ends_is_stopped_with_the_node_named(monkeypatch):
    import fcpts_onnx.torchform.module as module_code

    monkeypatch.setattr(module_code, "MAX_LOOP_TRIPS", 50)
    model = loop_graph("absent", "absent", 0, "main")  # no trip count, no condition: the spec's endless loop
    module = OnnxModule(model, discover(model).weights)
    with pytest.raises(module_code.NodeExecutionError, match=r"'loop'.*ran 50 iterations"), torch.no_grad():
        module(torch.from_numpy(G.rand((2, WIDTH), 1)))


class _Refine(torch.nn.Module):
    """A scripted refinement loop: the number of steps comes from a shape at run time."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(12, 16)
        self.cell = torch.nn.Linear(16, 16)
        self.out = torch.nn.Linear(16, 5)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        for _ in range(x.shape[1] // 4):
            h = torch.tanh(self.cell(h)) + h
        return self.out(h)


def test_a_scripted_torch_loop_runs_and_its_body_weight_is_learned(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "refine.onnx"
    model = _legacy_export(torch.jit.script(_Refine().eval()), torch.randn(2, 12), path, 15, {"x": {0: "b"}})
    assert [n.op_type for n in model.graph.node].count("Loop") == 1
    cell = next(w for w in discover(model).weights if w.name == "cell.weight")
    assert cell.consumers[0].body  # read inside the Loop's body
    x = np.random.default_rng(0).standard_normal((96, 12)).astype(np.float32)
    report = sparsify(path, tmp_path / "out.onnx", {"x": x}, sparsity=0.6,
                      learn=LearnOptions(iters=20, batch_size=16, seed=0), report_path=False)
    assert report.learning["parity"]["passed"] and report.learning["weights_in_untaken_branches"] == []
    assert report.learning["holdout_loss"]["best"] < report.learning["holdout_loss"]["initial"]
    out = onnx.load_model(str(tmp_path / "out.onnx"))
    assert sum(int(np.count_nonzero(w.values(out) == 0)) for w in discover(out).weights) == report.zero_params \
        == round(0.6 * report.total_params)



# --------------------------------------------------------------------------------------------
# Scan


def scan_graph(n_states: int, in_axis: int, in_reverse: int, out_axis: int, out_reverse: int,
               storage: str, seed: int = 0) -> onnx.ModelProto:
    """x [N, T, 6] scanned over its T axis (``in_axis`` 1, or -2), ``n_states`` carried sums;
    each step emits tanh(x_t @ WS + state) [N, 6], stacked on ``out_axis`` (0, 1 or -1)."""
    rng = np.random.default_rng(seed)
    ws = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
    inits, body_nodes, body_inits = [], [], []
    _store(ws, "WS", storage, inits, body_nodes, body_inits)
    body_nodes.append(helper.make_node("MatMul", ["x_t", "WS"], ["mm"], name="scan_mm"))
    last = "mm"
    state_in = [f"s{k}_in" for k in range(n_states)]
    for k in range(n_states):
        body_nodes += [helper.make_node("Add", [last, state_in[k]], [f"a{k}"])]
        last = f"a{k}"
    body_nodes.append(helper.make_node("Tanh", [last], ["y_t"]))
    for k in range(n_states):
        body_nodes.append(helper.make_node("Add", [state_in[k], "y_t"], [f"s{k}_out"]))
    body = helper.make_graph(
        body_nodes, "scan_body",
        [helper.make_tensor_value_info(n, F32, ["N", WIDTH]) for n in state_in]
        + [helper.make_tensor_value_info("x_t", F32, ["N", WIDTH])],
        [helper.make_tensor_value_info(f"s{k}_out", F32, ["N", WIDTH]) for k in range(n_states)]
        + [helper.make_tensor_value_info("y_t", F32, ["N", WIDTH])], body_inits)
    nodes = [helper.make_node("ReduceSum", ["x", "time_axis"], [f"s{k}_0"], keepdims=0) for k in range(n_states)]
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "time_axis"))
    nodes.append(helper.make_node("Scan", [*(f"s{k}_0" for k in range(n_states)), "x"],
                                  [*(f"s{k}" for k in range(n_states)), "ys"], name="scan", body=body,
                                  num_scan_inputs=1, scan_input_axes=[in_axis], scan_input_directions=[in_reverse],
                                  scan_output_axes=[out_axis], scan_output_directions=[out_reverse]))
    outputs = [helper.make_tensor_value_info(f"s{k}", F32, ["N", WIDTH]) for k in range(n_states)]
    outputs.append(helper.make_tensor_value_info("ys", F32, ["A", "B", "C"]))
    graph = helper.make_graph(nodes, "scan", [helper.make_tensor_value_info("x", F32, ["N", "T", WIDTH])], outputs,
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)], ir_version=8)
    onnx.checker.check_model(model)
    return model


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(n_states=st.integers(0, 2), in_axis=st.sampled_from([1, -2]), in_reverse=st.integers(0, 1),
       out_axis=st.sampled_from([0, 1, -1]), out_reverse=st.integers(0, 1), storage=st.sampled_from(STORAGES),
       seed=st.integers(0, 1000), batch=st.integers(1, 3), steps=st.integers(1, 4))
def test_scans_match_onnxruntime(n_states, in_axis, in_reverse, out_axis, out_reverse, storage, seed, batch, steps):
    model = scan_graph(n_states, in_axis, in_reverse, out_axis, out_reverse, storage, seed)
    found = discover(model)
    assert [w.name for w in found.weights] == ["WS"] and found.weights[0].consumers[0].body
    module = OnnxModule(model, found.weights)
    x = np.random.default_rng(seed).standard_normal((batch, steps, WIDTH)).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    with torch.no_grad():
        got = module(torch.from_numpy(x))
    for e, g in zip(expected, got):
        assert g.shape == e.shape
        np.testing.assert_allclose(g.numpy(), e, rtol=1e-5, atol=1e-5)


def test_fcpts_learns_a_scan_body_weight(tmp_path):
    model = scan_graph(1, 1, 0, 1, 0, "constant")  # ys [N, T, 6]: samples first
    src = G.save(model, tmp_path / "in.onnx")
    x = np.random.default_rng(0).standard_normal((96, 4, WIDTH)).astype(np.float32)
    report = sparsify(src, tmp_path / "out.onnx", {"x": x}, sparsity=0.5,
                      learn=LearnOptions(iters=20, batch_size=16, seed=0), report_path=False)
    assert report.learning["parity"]["passed"] and report.zero_params == 18
    out = onnx.load_model(str(tmp_path / "out.onnx"))
    ws = discover(out).weights[0]
    assert ws.storage == "constant" and ws.body and int(np.count_nonzero(ws.values(out) == 0)) == 18


def carried_weight_loop(handback: str, seed: int = 0) -> onnx.ModelProto:
    """x [N, 6] -> Loop (3 iterations) carrying v (from x) and the weight WL, a main-graph
    initializer: v <- tanh(v @ WL). ``handback``: how the body returns WL for the next
    iteration: "same" (the body's output is its input, as paddle2onnx writes a decoder's
    weights), "identity" (through an Identity), or "scaled" (WL * 0.9: a state, not a weight)."""
    rng = np.random.default_rng(seed)
    wl = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
    body_nodes = [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
                  helper.make_node("MatMul", ["v_in", "w_in"], ["mm"], name="loop_mm"),
                  helper.make_node("Tanh", ["mm"], ["v_out"])]
    w_out = "w_in"
    if handback == "identity":
        body_nodes.append(helper.make_node("Identity", ["w_in"], ["w_out"]))
        w_out = "w_out"
    elif handback == "scaled":
        body_nodes += [helper.make_node("Constant", [], ["decay"], value=numpy_helper.from_array(np.float32(0.9))),
                       helper.make_node("Mul", ["w_in", "decay"], ["w_out"])]
        w_out = "w_out"
    body = helper.make_graph(
        body_nodes, "carried_body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", F32, ["N", WIDTH]), helper.make_tensor_value_info("w_in", F32, [WIDTH, WIDTH])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", F32, ["N", WIDTH]), helper.make_tensor_value_info(w_out, F32, [WIDTH, WIDTH])])
    inits = [numpy_helper.from_array(wl, "WL"), numpy_helper.from_array(np.array(3, np.int64), "M"),
             numpy_helper.from_array(np.array(True), "c0")]
    nodes = [helper.make_node("Loop", ["M", "c0", "x", "WL"], ["v", "w_last"], name="loop", body=body)]
    graph = helper.make_graph(nodes, "carried", [helper.make_tensor_value_info("x", F32, ["N", WIDTH])],
                              [helper.make_tensor_value_info("v", F32, ["N", WIDTH])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("handback", ["same", "identity"])
def test_a_weight_the_loop_carries_unchanged_is_found_learned_and_written(handback, tmp_path):
    """paddle2onnx feeds SLANet's decoder weights (attention, GRU cell, heads: 30% of the model)
    into its Loop as carried values the body hands back unchanged; every iteration multiplies
    by the initial value, so that is the weight to prune, tune and write back."""
    model = carried_weight_loop(handback)
    found = discover(model)
    (wl,) = found.weights
    assert wl.name == "WL" and not wl.body and wl.consumers[0].body  # stored outside, read inside
    module = OnnxModule(model, found.weights)
    x = np.random.default_rng(1).standard_normal((8, WIDTH)).astype(np.float32)
    (expected,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    out = module(torch.from_numpy(x))[0]
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    (weight,) = module.parameters_by_role("weight").values()
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    # the learner's mask goes in where the Loop takes the weight: the deployed network is learned
    mask = torch.from_numpy(np.random.default_rng(2).random((WIDTH, WIDTH)) > 0.5)
    (key,) = module.parameters_by_role("weight")
    module.weight_transforms[key] = lambda w: w * mask
    masked_model = onnx.ModelProto()
    masked_model.CopyFrom(model)
    stored = next(t for t in masked_model.graph.initializer if t.name == "WL")
    stored.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(stored) * mask.numpy(), "WL"))
    (expected,) = ort.InferenceSession(masked_model.SerializeToString(),
                                       providers=["CPUExecutionProvider"]).run(None, {"x": x})
    with torch.no_grad():
        np.testing.assert_allclose(module(torch.from_numpy(x))[0].numpy(), expected, rtol=1e-5, atol=1e-6)
    module.weight_transforms.clear()
    src = G.save(model, tmp_path / "in.onnx")
    data = np.random.default_rng(0).standard_normal((128, WIDTH)).astype(np.float32)
    report = sparsify(src, tmp_path / "out.onnx", {"x": data}, sparsity=0.5,
                      learn=LearnOptions(iters=20, batch_size=16, seed=0), report_path=False)
    assert report.learning["parity"]["passed"]
    written = numpy_helper.to_array(next(t for t in onnx.load_model(str(tmp_path / "out.onnx")).graph.initializer
                                         if t.name == "WL"))
    original = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "WL"))
    assert np.count_nonzero(written == 0) == report.zero_params == 18
    kept = written != 0
    assert not np.allclose(written[kept], original[kept])  # tuned through the loop, not only masked


def test_a_loop_state_the_body_changes_is_not_a_weight():
    """WL * 0.9 each iteration: the MatMul reads a different tensor every time, so pruning the
    initial value would not prune what it multiplies by; it is left alone."""
    found = discover(carried_weight_loop("scaled"))
    assert found.weights == []
