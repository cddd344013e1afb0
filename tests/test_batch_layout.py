"""Graphs that do not keep every input's samples on its first axis: a streaming state
[2, batch, 128] beside a signal [batch, 512] (silero-vad), an LSTM's h0/c0 [layers, batch,
hidden], and scalar settings (a sample rate). Where the samples are is read from the graph
(or --batch-axis), the data is given as the graph takes it, and every run (onnxruntime's,
the trainable form's) sees it that way; onnxruntime is the oracle."""

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
from fcpts_onnx.calibration import InputSpec, infer_layout, load_calibration, static_batch_of
from fcpts_onnx.cli import main
from fcpts_onnx.discovery import discover
from fcpts_onnx.errors import CalibrationError, OptionError, UnsupportedModelError
from fcpts_onnx.learner.options import LearnOptions
from fcpts_onnx.torchform.module import OnnxModule
from fcpts_onnx.verify import output_batch_axes, run_onnxruntime

F32 = TensorProto.FLOAT


def spec(name: str, *dims) -> InputSpec:
    return InputSpec(name, np.dtype("float32"), tuple(dims))


@pytest.mark.parametrize("specs, expected, fixed", [
    # silero-vad as spox writes it: nothing named; the state's one dynamic axis holds the samples
    ([spec("input", None, None), spec("state", 2, None, 128), InputSpec("sr", np.dtype("int64"), ())],
     {"state": 1, "sr": None}, None),
    # torch names the batch: the state keeps it where the name is
    ([spec("input", "batch", "seq"), spec("state", 2, "batch", 128)], {"state": 1}, None),
    # an LSTM's initial state, one layer: [1, batch, hidden] beside x [batch, T, F]
    ([spec("x", "B", "T", 8), spec("h0", 1, "B", 16), spec("c0", 1, "B", 16)], {"h0": 1, "c0": 1}, None),
    # a state fixed at [1, 1, H] beside a dynamic signal: the graph runs at batch 1, as before
    ([spec("signal", "N", 576), spec("state", 1, 1, 64)], {}, 1),
    # every first axis fixed, at different sizes (silero's OpenVINO export): the size all share
    ([spec("input", 1, 576), spec("state", 2, 1, 128)], {"state": 1}, 1),
    # an input fixed at 1 whose dynamic axis is not the batch the others name: batch 1, as before
    ([spec("x", "B", 3), spec("a", 1, "seq")], {}, 1),
    # time-major: every input names its batch once, none on its first axis
    ([spec("x", 5, "batch", 16), spec("h0", 2, "batch", 48), spec("c0", 2, "batch", 48)],
     {"x": 1, "h0": 1, "c0": 1}, None),
    ([spec("x", "T", "batch", 16), spec("h0", 2, "batch", 48)], {"x": 1, "h0": 1}, None),
    # several names in every input: the one called batch
    ([spec("ids", "seq", "batch_size"), spec("mask", "seq", "batch_size")], {"ids": 1, "mask": 1}, None),
    # nothing unusual, whatever the names (ddddocr's recogniser: one input [1, 1, 64, image_width])
    ([spec("input1", 1, 1, 64, "image_width")], {}, 1),
    ([spec("a", 1, "len"), spec("b", 1, "len")], {}, 1),
    ([spec("x", "N", 3, "H", "W"), spec("y", "N", 3, "H", "W")], {}, None),
    ([spec("x", "N", 3, 32, 32)], {}, None),
    ([spec("input_ids", "batch", "seq"), spec("attention_mask", "batch", "seq")], {}, None),
    ([spec("x", 4, 3), spec("y", 4, 5)], {}, 4),
])
def test_where_the_samples_are_is_read_from_the_graph(specs, expected, fixed):
    layout = infer_layout(specs)
    assert dict(layout.inputs) == expected
    assert static_batch_of(specs, layout) == fixed


def test_where_the_graph_does_not_say_the_option_does():
    specs = [spec("input", None, 10), spec("state", 2, None, None)]  # two dynamic axes, nothing named
    with pytest.raises(UnsupportedModelError, match=r"input 'state'.*--batch-axis state=AXIS"):
        infer_layout(specs)
    assert dict(infer_layout(specs, {"state": 1}).inputs) == {"state": 1}
    with pytest.raises(OptionError, match="'nope', not among the model's inputs"):
        infer_layout(specs, {"nope": 1})
    with pytest.raises(OptionError, match="has 3 axes"):
        infer_layout(specs, {"state": 3})


# --------------------------------------------------------------------------------------------
# A streaming model


def streaming_model(state_axis: int = 1, rank: int = 3, fixed_batch: int | None = None) -> onnx.ModelProto:
    """x [B, 6] -> h = Relu(x @ W) [B, 4]; state with its samples on ``state_axis`` (rank ``rank``,
    every other axis 2 wide, the last 4): y = (h + state summed over its other axes but the last)
    * gain, gain a scalar input (a setting); stateN = state + h broadcast, samples where state has them."""
    batch = fixed_batch if fixed_batch else "B"
    state_dims = [2] * rank
    state_dims[-1] = 4
    state_dims[state_axis] = batch
    others = [a for a in range(rank - 1) if a != state_axis]
    perm = [state_axis, *others, rank - 1]  # samples first, then the rest
    inverse = list(np.argsort(perm))
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"], name="mm"),
             helper.make_node("Relu", ["mm"], ["h"]),
             helper.make_node("Transpose", ["state"], ["state_bf"], perm=perm),
             helper.make_node("ReduceSum", ["state_bf", "other_axes"], ["state_sum"], keepdims=0, noop_with_empty_axes=1),
             helper.make_node("Add", ["h", "state_sum"], ["pre"]),
             helper.make_node("Mul", ["pre", "gain"], ["y"]),
             helper.make_node("Reshape", ["h", "h_shape"], ["h_b"]),
             helper.make_node("Add", ["state_bf", "h_b"], ["new_bf"]),
             helper.make_node("Transpose", ["new_bf"], ["stateN"], perm=[int(i) for i in inverse])]
    inits = [numpy_helper.from_array(np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32), "W"),
             numpy_helper.from_array(np.arange(1, rank - 1, dtype=np.int64), "other_axes"),
             numpy_helper.from_array(np.array([0] + [1] * (rank - 2) + [4], np.int64), "h_shape")]
    graph = helper.make_graph(
        nodes, "streaming",
        [helper.make_tensor_value_info("x", F32, [batch, 6]), helper.make_tensor_value_info("state", F32, state_dims),
         helper.make_tensor_value_info("gain", F32, [])],
        [helper.make_tensor_value_info("y", F32, [batch, 4]), helper.make_tensor_value_info("stateN", F32, state_dims)],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def streaming_data(model: onnx.ModelProto, n: int, seed: int = 0, gain: float = 1.5,
                   state_axis: int = 1) -> dict[str, np.ndarray]:
    """Calibration data as the graph takes it: samples on the state's own axis, gain one value."""
    rng = np.random.default_rng(seed)
    state = next(i for i in model.graph.input if i.name == "state")
    dims = [n if a == state_axis else d.dim_value for a, d in enumerate(state.type.tensor_type.shape.dim)]
    return {"x": rng.standard_normal((n, 6)).astype(np.float32), "state": rng.standard_normal(dims).astype(np.float32),
            "gain": np.array(gain, np.float32)}


def _per_sample_reference(model: onnx.ModelProto, data: dict[str, np.ndarray], state_axis: int) -> dict[str, list]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = {"y": [], "stateN": []}
    for i in range(data["x"].shape[0]):
        feed = {"x": data["x"][i:i + 1], "state": np.take(data["state"], [i], axis=state_axis), "gain": data["gain"]}
        y, state_n = session.run(["y", "stateN"], feed)
        out["y"].append(y[0])
        out["stateN"].append(np.take(state_n, 0, axis=state_axis))
    return out


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(rank=st.integers(2, 4), data=st.data(), n=st.integers(2, 9), batch=st.integers(1, 4))
def test_onnxruntime_and_the_trainable_form_see_each_sample_where_the_graph_keeps_it(tmp_path_factory, rank, data, n,
                                                                                     batch):
    state_axis = data.draw(st.integers(0, rank - 2))
    model = streaming_model(state_axis, rank)
    path = tmp_path_factory.mktemp("layout") / "m.onnx"
    onnx.save(model, path)
    raw = streaming_data(model, n, seed=n, state_axis=state_axis)
    calibration = load_calibration(raw, model, infer_layout(
        [spec("x", "B", 6), spec("state", *[d.dim_param or d.dim_value for d in model.graph.input[1].type.tensor_type.shape.dim]),
         InputSpec("gain", np.dtype("float32"), ())]))
    assert dict(calibration.layout.inputs) == ({"state": state_axis} if state_axis else {}) | {"gain": None}
    assert calibration.arrays["state"].shape[0] == n and "gain" not in calibration.arrays
    calibration.layout = output_batch_axes(path, calibration, None)
    assert dict(calibration.layout.outputs) == ({"stateN": state_axis} if state_axis else {})
    expected = _per_sample_reference(model, raw, state_axis)
    # onnxruntime over batches: every output samples first, each sample where it belongs
    dense = run_onnxruntime(path, calibration, batch, what="input model")
    np.testing.assert_allclose(dense["y"], np.stack(expected["y"]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dense["stateN"], np.stack(expected["stateN"]), rtol=1e-5, atol=1e-6)
    # the trainable form, fed samples first as the learner keeps them
    module = OnnxModule(model, discover(model).weights)
    module.set_batch_layout(calibration.layout, calibration.settings)
    with torch.no_grad():
        ours = module.run({k: torch.from_numpy(v) for k, v in calibration.arrays.items()}, batch_first=True)
    np.testing.assert_allclose(ours["y"].numpy(), dense["y"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours["stateN"].numpy(), dense["stateN"], rtol=1e-5, atol=1e-6)


def test_a_streaming_model_is_learned_on_and_written_with_an_exact_count(tmp_path):
    model = streaming_model(state_axis=1, rank=3)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    raw = streaming_data(model, 96)
    report = sparsify(path, tmp_path / "out.onnx", raw, sparsity=0.5, learn=LearnOptions(iters=10, batch_size=16, seed=0),
                      report_path=False)
    assert report.method == "fcpts" and report.learning["parity"]["passed"]
    assert report.zero_params == 12
    assert report.calibration["batch_axes"] == {"inputs": {"state": 1, "gain": None}, "outputs": {"stateN": 1}}
    assert report.calibration["inputs"]["state"][0] == [2, 96, 4]  # as the graph takes it
    assert {f["name"] for f in report.fidelity} == {"y", "stateN"}
    out = onnx.load_model(str(tmp_path / "out.onnx"))
    assert int(np.count_nonzero(numpy_helper.to_array(out.graph.initializer[0]) == 0)) == 12


def test_a_fixed_batch_streaming_model_learns_at_its_batch(tmp_path):
    model = streaming_model(state_axis=1, rank=3, fixed_batch=1)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    report = sparsify(path, tmp_path / "out.onnx", streaming_data(model, 40), sparsity=0.5, method="lamp",
                      reconstruct=True, learn=LearnOptions(iters=4, seed=0), report_path=False)
    assert report.learning["batch_size"] == 1 and report.zero_params == 12
    assert report.calibration["batch_axes"]["inputs"] == {"state": 1, "gain": None}


# --------------------------------------------------------------------------------------------
# What the data must say


def test_calibration_batches_are_stacked_on_each_inputs_own_axis():
    model = streaming_model(state_axis=1, rank=3)
    layout = infer_layout([spec("x", "B", 6), spec("state", 2, "B", 4), InputSpec("gain", np.dtype("float32"), ())])
    raw = streaming_data(model, 6)
    feeds = [{"x": raw["x"][i:i + 3], "state": raw["state"][:, i:i + 3], "gain": raw["gain"]} for i in (0, 3)]
    calibration = load_calibration(feeds, model, layout)
    np.testing.assert_array_equal(calibration.arrays["state"], np.moveaxis(raw["state"], 1, 0))
    np.testing.assert_array_equal(calibration.feed()["state"], raw["state"])
    assert calibration.feed()["gain"] == np.float32(1.5)
    feeds[1]["gain"] = np.array(2.0, np.float32)
    with pytest.raises(CalibrationError, match="'gain' is a setting .* different values"):
        load_calibration(feeds, model, layout)


@pytest.mark.parametrize("change, needle", [
    (lambda d: d | {"gain": np.full(8, 1.5, np.float32)}, "'gain' is a setting the model takes as a scalar"),
    (lambda d: d | {"state": d["state"][:, :5]}, "different sample counts"),
    (lambda d: d | {"state": np.moveaxis(d["state"], 1, 0)}, "axis 0 must be 2"),
])
def test_data_that_does_not_fit_the_layout_is_refused(change, needle):
    model = streaming_model(state_axis=1, rank=3)
    with pytest.raises(CalibrationError, match=needle):
        load_calibration(change(streaming_data(model, 8)), model)


def test_random_inputs_cannot_choose_a_setting(tmp_path, capfd):
    path = tmp_path / "m.onnx"
    onnx.save(streaming_model(), path)
    code = main(["optimize", str(path), "--calib", "random", "-o", str(tmp_path / "o.onnx"), "--quiet"])
    err = capfd.readouterr().err
    assert code == 2 and "'gain' is a setting" in err and "0-d array" in err and "Traceback" not in err
    assert not (tmp_path / "o.onnx").exists()


def test_the_cli_takes_batch_axis_where_the_graph_does_not_say(tmp_path, capfd):
    # the state's two middle axes are both dynamic and unnamed: the option says which holds the samples
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"]),
         helper.make_node("ReduceSum", ["state", "ax"], ["s"], keepdims=0),
         helper.make_node("Add", ["y", "s"], ["z"])], "g",
        [helper.make_tensor_value_info("x", F32, [None, 4]), helper.make_tensor_value_info("state", F32, [3, None, None])],
        [helper.make_tensor_value_info("z", F32, [None, 2])],
        [numpy_helper.from_array(np.ones((4, 2), np.float32), "W"), numpy_helper.from_array(np.array([0]), "ax")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((20, 4)).astype(np.float32),
             state=rng.standard_normal((3, 20, 2)).astype(np.float32))
    argv = ["optimize", str(path), "--calib", str(tmp_path / "c.npz"), "--method", "global", "--quiet"]
    assert main([*argv, "-o", str(tmp_path / "o.onnx")]) == 2
    err = capfd.readouterr().err
    assert "--batch-axis state=AXIS" in err and err.count("\n") == 1
    assert main([*argv, "-o", str(tmp_path / "o.onnx"), "--batch-axis", "state=1"]) == 0
    assert (tmp_path / "o.onnx").exists()
    assert main(["inspect", str(path), "--parity", "--calib", str(tmp_path / "c.npz"), "--batch-axis", "state=1"]) == 0
    # random inputs sized by --shape, the state's samples on its axis 1
    assert main(["optimize", str(path), "--calib", "random", "--shape", "x=16,4", "--shape", "state=3,16,2",
                 "--batch-axis", "state=1", "--iters", "2", "--quiet", "-o", str(tmp_path / "r.onnx")]) == 0


def test_bench_runs_a_streaming_model_on_its_calibration_data_only(tmp_path, capfd):
    model = streaming_model(state_axis=1, rank=3)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    np.savez(tmp_path / "c.npz", **streaming_data(model, 8))
    bench = ["bench", str(path), "--batch", "1,4", "--iterations", "3", "--warmup", "1", "--runtime", "onnxruntime"]
    assert main([*bench, "--calib", str(tmp_path / "c.npz")]) == 0
    out = capfd.readouterr().out
    assert out.count("onnxruntime") >= 2 and "skipped" not in out
    assert main(bench) == 2
    err = capfd.readouterr().err
    assert "'gain' (a setting)" in err and "'state' (axis 1)" in err and "--calib" in err


def test_an_output_with_no_sample_axis_is_refused(tmp_path):
    """Beside a state batched on axis 1, an output summed over every sample cannot be split per sample."""
    model = streaming_model(state_axis=1, rank=3)
    model.graph.node.append(helper.make_node("ReduceSum", ["y"], ["total"], keepdims=1))
    model.graph.output.append(helper.make_tensor_value_info("total", F32, [1, 1]))
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    with pytest.raises(UnsupportedModelError, match=r"output 'total' has shape \[1, 1\] for one sample and \[1, 1\]"):
        sparsify(path, tmp_path / "out.onnx", streaming_data(model, 16), sparsity=0.5, method="global",
                 report_path=False)
    assert not (tmp_path / "out.onnx").exists()


class _TimeMajorLM(torch.nn.Module):
    """A torch LSTM language model with its state as inputs, time-major as nn.LSTM defaults to."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Linear(8, 16)
        self.rnn = torch.nn.LSTM(16, 24, num_layers=2)
        self.out = torch.nn.Linear(24, 5)

    def forward(self, x, h0, c0):  # x [T, batch, 8], h0 and c0 [2, batch, 24]
        y, (h, c) = self.rnn(torch.relu(self.emb(x)), (h0, c0))
        return self.out(y), h, c


def test_a_time_major_torch_lstm_with_its_state_as_inputs(tmp_path):
    import warnings

    torch.manual_seed(0)
    path = tmp_path / "lm.onnx"
    axes = {name: {1: "batch"} for name in ("x", "h0", "c0", "y", "h", "c")} | {"x": {0: "steps", 1: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_TimeMajorLM().eval(), (torch.randn(4, 3, 8), torch.zeros(2, 3, 24), torch.zeros(2, 3, 24)),
                          str(path), dynamo=False, opset_version=14, input_names=["x", "h0", "c0"],
                          output_names=["y", "h", "c"], dynamic_axes=axes)
    rng = np.random.default_rng(0)
    n = 80
    data = {"x": rng.standard_normal((4, n, 8)).astype(np.float32),
            "h0": (0.1 * rng.standard_normal((2, n, 24))).astype(np.float32),
            "c0": (0.1 * rng.standard_normal((2, n, 24))).astype(np.float32)}
    report = sparsify(path, tmp_path / "out.onnx", data, sparsity=0.6, learn=LearnOptions(iters=20, seed=0),
                      report_path=False)
    assert report.calibration["batch_axes"] == {"inputs": {"x": 1, "h0": 1, "c0": 1},
                                                "outputs": {"y": 1, "h": 1, "c": 1}}
    assert report.learning["parity"]["passed"] and report.zero_params == round(0.6 * report.total_params)
    assert report.learning["holdout_loss"]["best"] < report.learning["holdout_loss"]["initial"]
    # per sample: the sparse model's outputs for sample i are the dense model's on sample i alone
    session = ort.InferenceSession(str(tmp_path / "out.onnx"), providers=["CPUExecutionProvider"])
    whole = session.run(None, data)
    one = session.run(None, {k: v[:, 7:8] for k, v in data.items()})
    for a, b in zip(whole, one):
        np.testing.assert_allclose(a[:, 7:8], b, rtol=1e-4, atol=1e-5)
