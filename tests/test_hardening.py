"""Hostile and odd inputs: external data that escapes, absurd shapes, memory limits, precision.

Each case follows the error contract of test_errors (exit 2, one line, nothing written,
input untouched) or, where the input is odd but valid, checks the result itself.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import graphs as G
import numpy as np
import onnx
import pytest
from conftest import save_model
from onnx import TensorProto, helper, numpy_helper
from test_errors import assert_refused, run_main, tree

from fcpts_onnx import onnx_io
from fcpts_onnx.api import sparsify
from fcpts_onnx.errors import OptionError
from fcpts_onnx.learner.options import LearnOptions
from fcpts_onnx.report import format_summary
from fcpts_onnx.resources import format_bytes, parse_memory


def model_in_folder(tmp_path: Path, graph: onnx.GraphProto) -> Path:
    """``graph`` saved as tmp_path/in/model.onnx (a folder of its own, so tests can check it stays untouched)."""
    folder = tmp_path / "in"
    folder.mkdir()
    return save_model(graph, folder / "model.onnx")


# ------------------------------------------------------------------------------------------
# External data that points outside the model's folder
# ------------------------------------------------------------------------------------------


def external_model(tmp_path: Path, location: str, place_data_at: Path | None) -> Path:
    """mixed() with every tensor in one external file whose recorded location is ``location``;
    the data itself is moved to ``place_data_at`` (None: left missing)."""
    folder = tmp_path / "in"
    folder.mkdir(exist_ok=True)
    path = G.save(G.mixed(), folder / "model.onnx", external=True, location="w.data")
    model = onnx.load_model(str(path), load_external_data=False)
    for t in onnx_io._all_tensors(model.graph):
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, str(path))
    data = folder / "w.data"
    if place_data_at is None:
        data.unlink()
    elif place_data_at != data:
        place_data_at.parent.mkdir(parents=True, exist_ok=True)
        data.rename(place_data_at)
    return path


def test_external_data_path_traversal_refused(tmp_path, capfd):
    model = external_model(tmp_path, "../secret.data", tmp_path / "secret.data")
    (tmp_path / "out").mkdir()
    assert_refused(["optimize", model, "-o", tmp_path / "out" / "m.onnx"], capfd, tmp_path,
                   "points outside the model's folder", "../secret.data")


def test_external_data_absolute_path_refused(tmp_path, capfd):
    target = tmp_path / "elsewhere" / "w.data"
    model = external_model(tmp_path, str(target), target)
    (tmp_path / "out").mkdir()
    assert_refused(["optimize", model, "-o", tmp_path / "out" / "m.onnx"], capfd, tmp_path,
                   "absolute path")


def test_external_data_symlink_pointing_out_refused(tmp_path, capfd):
    outside = tmp_path / "elsewhere" / "w.data"
    model = external_model(tmp_path, "w.data", outside)
    (model.parent / "w.data").symlink_to(outside)
    (tmp_path / "out").mkdir()
    assert_refused(["optimize", model, "-o", tmp_path / "out" / "m.onnx"], capfd, tmp_path,
                   "points outside the model's folder")


def test_external_data_symlink_inside_folder_refused(tmp_path, capfd):
    """onnx reads no external data through links, even ones that stay inside: say so, in one line."""
    folder = tmp_path / "in"
    real = folder / "data" / "real.data"
    model = external_model(tmp_path, "w.data", real)
    (folder / "w.data").symlink_to(real)
    (tmp_path / "out").mkdir()
    assert_refused(["optimize", model, "-o", tmp_path / "out" / "m.onnx"], capfd, tmp_path,
                   "symbolic link", "put the real file next to the model")


def test_external_data_missing_refused(tmp_path, capfd):
    model = external_model(tmp_path, "w.data", None)
    (tmp_path / "out").mkdir()
    assert_refused(["optimize", model, "-o", tmp_path / "out" / "m.onnx"], capfd, tmp_path, "missing")


def test_output_past_protobuf_limit_switches_to_external_data(tmp_path, monkeypatch):
    """A model whose tensors exceed protobuf's 2 GiB limit is written with external data.

    The limit is lowered to 1 KiB so a small model crosses it; the path is the same."""
    monkeypatch.setattr(onnx_io, "_PROTOBUF_LIMIT", 1024)
    src = G.save(G.mixed(), tmp_path / "in.onnx")
    out = tmp_path / "out.onnx"
    report = sparsify(src, out, sparsity=0.5, method="global", report_path=False)
    assert (tmp_path / "out.onnx.data").is_file()
    bare = onnx.load_model(str(out), load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in bare.graph.initializer)
    assert report.zero_params == report.required_zeros


# ------------------------------------------------------------------------------------------
# Absurd declared shapes and the memory limit
# ------------------------------------------------------------------------------------------


def absurd_input_model(tmp_path: Path) -> Path:
    """Conv on x[1, 3, 200000, 200000]: 480 GB for the input alone."""
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="conv")]
    graph = helper.make_graph(nodes, "absurd", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                            [1, 3, 200000, 200000])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 199998, 199998])],
                              [numpy_helper.from_array(G.rand((4, 3, 3, 3)), "W")])
    return model_in_folder(tmp_path, graph)


def absurd_intermediate_model(tmp_path: Path) -> Path:
    """x[1, 8] -> MatMul W[8, 8] -> Expand to [1, 100000, 100000, 8]: small input, absurd intermediate."""
    shape = numpy_helper.from_array(np.array([1, 100000, 100000, 8], np.int64), "shape")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"),
             helper.make_node("Expand", ["h", "shape"], ["y"], name="expand")]
    graph = helper.make_graph(nodes, "absurd", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b", "c", "d"])],
                              [numpy_helper.from_array(G.rand((8, 8)), "W"), shape])
    return model_in_folder(tmp_path, graph)


@pytest.mark.parametrize("build, name", [(absurd_input_model, "'y'"), (absurd_intermediate_model, "'y'")])
def test_absurd_declared_shapes_refused_before_allocating(tmp_path, capfd, build, name):
    model = build(tmp_path)
    (tmp_path / "out").mkdir()
    start = time.perf_counter()
    line = assert_refused(["optimize", model, "-o", tmp_path / "out" / "m.onnx"], capfd, tmp_path,
                          name, "would take", "GiB", "--max-memory")
    assert time.perf_counter() - start < 20, line


def test_max_memory_refuses_a_model_that_fits_the_machine(tmp_path, capfd):
    """The same check under an explicit limit: a 1.5 MB activation against 1 MiB."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1000, 400])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1000, 400])],
                              [numpy_helper.from_array(G.rand((400, 400)), "W")])
    model = model_in_folder(tmp_path, graph)
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "m.onnx"
    assert_refused(["optimize", model, "-o", out, "--max-memory", "1M"], capfd, tmp_path, "1 MiB allowed")
    code, _, err, _ = run_main(["optimize", model, "-o", out, "--max-memory", "64M", "--quiet"], capfd)
    assert code == 0, err


@pytest.mark.parametrize("text", ["lots", "5 G B", "0", "8Q", "1e3G"])
def test_max_memory_bad_values(tiny_model, tmp_path, capfd, text):
    (tmp_path / "out").mkdir()
    assert_refused(["optimize", tiny_model, "-o", tmp_path / "out" / "m.onnx", "--max-memory", text],
                   capfd, tmp_path, "--max-memory")


@pytest.mark.parametrize("text, expected", [("8G", 8 * 2**30), ("512M", 512 * 2**20), ("1.5GiB", int(1.5 * 2**30)),
                                            ("100", 100), ("2kb", 2048), (4096, 4096)])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


def test_parse_memory_refuses_nonsense():
    with pytest.raises(OptionError):
        parse_memory("")


def test_format_bytes():
    assert format_bytes(3 * 2**30) == "3 GiB" and format_bytes(1536) == "1.5 KiB" and format_bytes(12) == "12 B"


def mnist_like_model(tmp_path: Path) -> Path:
    """x[N,1,28,28] -> Conv 16 3x3 -> Relu -> Flatten -> MatMul [10816, 10]: about 43 KB of activations a sample."""
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flatten", axis=1),
             helper.make_node("MatMul", ["f", "W2"], ["y"], name="fc")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 28, 28])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
                              [numpy_helper.from_array(G.rand((16, 1, 3, 3)), "W1"),
                               numpy_helper.from_array(G.rand((16 * 26 * 26, 10)) * 0.01, "W2")])
    return model_in_folder(tmp_path, graph)


def test_max_memory_shrinks_the_learning_batch(tmp_path):
    model = mnist_like_model(tmp_path)
    calib = {"x": np.random.default_rng(0).standard_normal((96, 1, 28, 28)).astype(np.float32)}
    learn = LearnOptions(iters=3)
    roomy = sparsify(model, tmp_path / "a.onnx", calib, sparsity=0.5, learn=learn, report_path=False)
    plan = roomy.learning["memory"]
    assert plan["batch_size"] == 64 and plan["per_sample_bytes"] > 0
    # room for the parameters' state and about 10 samples
    limit = plan["fixed_bytes"] + 10 * plan["per_sample_bytes"] + plan["per_sample_bytes"] // 2
    tight = sparsify(model, tmp_path / "b.onnx", calib, sparsity=0.5, learn=learn, report_path=False,
                     max_memory=limit)
    assert tight.learning["memory"]["batch_size"] == 10
    assert tight.learning["options"]["batch_size"] is None  # not given: the default, 64, is the largest
    assert tight.learning["memory"]["requested_batch_size"] == 64  # what was asked, beside what was used
    assert tight.learning["batch_size"] == 10 and tight.learning["batch_choice"] is None  # --iters: no choice
    assert any("learning batch 10 instead of 64" in note for note in tight.notes)
    assert tight.zero_params == tight.required_zeros


def test_max_memory_below_one_sample_refused(tmp_path, capfd):
    model = mnist_like_model(tmp_path)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((40, 1, 28, 28)).astype(np.float32))
    (tmp_path / "out").mkdir()
    # enough for onnxruntime's largest tensor at batch 64 (2.8 MB), not for learning's state
    assert_refused(["optimize", model, "--calib", calib, "-o", tmp_path / "out" / "m.onnx", "--max-memory", "3M",
                    "--iters", "2"], capfd, tmp_path, "even at batch 1", "--max-memory")


def test_memory_estimate_counts_activations_per_sample():
    """The measured per-sample cost grows with the activations, not with the batch."""
    import torch

    from fcpts_onnx.learner.memory import plan_batch

    class Net(torch.nn.Module):
        def __init__(self, width):
            super().__init__()
            self.fc = torch.nn.Linear(32, width)

        def run(self, feed, batch_first=False):
            return {"y": torch.relu(self.fc(feed["x"])) * 2}

    x = torch.randn(8, 32)
    narrow = plan_batch(Net(100), {"x": x}, 64, 2**40)
    wide = plan_batch(Net(1000), {"x": x}, 64, 2**40)
    assert 5 < wide.per_sample_bytes / narrow.per_sample_bytes < 15
    assert narrow.batch_size == 64
    assert plan_batch(Net(1000), {"x": x}, 64, wide.fixed_bytes + 3 * wide.per_sample_bytes).batch_size == 3


# ------------------------------------------------------------------------------------------
# Precision: fp16/bf16 round trips, subnormal and tiny weights, existing zeros
# ------------------------------------------------------------------------------------------


def subnormal_model(tmp_path: Path) -> Path:
    """W[64, 5] float32 with subnormal (1e-40), tiny (1e-30) and normal values, plus exact zeros."""
    w = G.rand((64, 5))
    flat = w.reshape(-1)
    flat[:40] = np.float32(1e-40) * np.sign(flat[:40])  # subnormal
    flat[40:80] = np.float32(1e-30) * np.sign(flat[40:80])
    flat[80:100] = 0.0
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
                              [numpy_helper.from_array(w, "W")])
    return model_in_folder(tmp_path, graph)


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.9])
def test_subnormal_and_tiny_weights_pruned_first_and_counted(tmp_path, sparsity):
    model = subnormal_model(tmp_path)
    out = tmp_path / "out.onnx"
    report = sparsify(model, out, sparsity=sparsity, method="global", report_path=False)
    w = numpy_helper.to_array(onnx.load(str(out)).graph.initializer[0]).reshape(-1)
    assert int((w == 0).sum()) == round(sparsity * 320) == report.zero_params
    kept = np.abs(w[w != 0])
    pruned_from = np.abs(numpy_helper.to_array(onnx.load(str(model)).graph.initializer[0]).reshape(-1))[w == 0]
    assert pruned_from.max() <= kept.min()  # smallest magnitudes went first, subnormals included


def test_subnormal_weights_survive_the_learner(tmp_path):
    """Kept subnormal weights are not flushed to zero on the way through torch (the count stays exact)."""
    model = subnormal_model(tmp_path)
    calib = {"x": np.random.default_rng(0).standard_normal((40, 64)).astype(np.float32)}
    report = sparsify(model, tmp_path / "out.onnx", calib, sparsity=0.2, method="global", reconstruct=True,
                      learn=LearnOptions(iters=2), report_path=False)
    assert report.zero_params == report.required_zeros == 64


@pytest.mark.parametrize("build", [G.fp16_model, G.mixed, G.bf16_cast_matmul])
@pytest.mark.parametrize("method, learn", [("global", False), ("fcpts", True)])
def test_half_precision_round_trip(tmp_path, build, method, learn):
    """fp16 weights stay fp16, bf16 storage cast up to float stays bf16 (and fp32 fp32),
    data-free and learned (on generated inputs).

    Graphs that compute in bf16 do not run on onnxruntime's CPU provider (no bf16 MatMul or
    Conv kernel), so they are refused at the dense reference; test_writeback covers their
    write-back."""
    src = G.save(build(), tmp_path / "in.onnx")
    out = tmp_path / "out.onnx"
    report = sparsify(src, out, "random" if learn else None, sparsity=0.5, method=method,
                      learn=LearnOptions(iters=3), report_path=False)
    before = {t.name: t.data_type for t in onnx.load(str(src)).graph.initializer}
    after = {t.name: t.data_type for t in onnx.load(str(out)).graph.initializer}
    assert before == after
    assert report.zero_params == report.required_zeros


# ------------------------------------------------------------------------------------------
# Internal errors still end in one line
# ------------------------------------------------------------------------------------------


def test_internal_error_is_one_line_with_a_way_to_the_traceback(tiny_model, tmp_path, capfd, monkeypatch):
    import fcpts_onnx.api as api

    def broken(*args, **kwargs):
        raise ZeroDivisionError("simulated bug")

    monkeypatch.setattr(api, "discover_or_refuse", broken)
    (tmp_path / "out").mkdir()
    before = tree(tmp_path)
    code, out, err, _ = run_main(["optimize", tiny_model, "-o", tmp_path / "out" / "m.onnx"], capfd)
    assert code == 3 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "internal error: ZeroDivisionError: simulated bug" in err and "FCPTS_ONNX_DEBUG=1" in err
    assert tree(tmp_path) == before
    monkeypatch.setenv("FCPTS_ONNX_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        run_main(["optimize", tiny_model, "-o", tmp_path / "out" / "m.onnx"], capfd)


def test_report_records_memory_plan(tmp_path):
    model = mnist_like_model(tmp_path)
    calib = {"x": np.random.default_rng(0).standard_normal((40, 1, 28, 28)).astype(np.float32)}
    report_path = tmp_path / "r.json"
    sparsify(model, tmp_path / "o.onnx", calib, sparsity=0.5, learn=LearnOptions(iters=2), report_path=report_path)
    memory = json.loads(report_path.read_text())["learning"]["memory"]
    assert memory["estimated_peak_bytes"] <= memory["limit_bytes"]
    assert os.path.getsize(report_path) > 0


def test_report_that_cannot_be_written_keeps_the_model_and_says_so(tiny_model, tmp_path, capfd, monkeypatch):
    """Disk full while writing the report: the verified model stays, one line says where it is."""
    import errno

    real_write_text = Path.write_text

    def full_disk(self, *args, **kwargs):
        if ".report.json.tmp" in self.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "m.onnx"
    code, _, err, _ = run_main(["optimize", tiny_model, "-o", out, "--quiet"], capfd)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "cannot write the report (No space left on device)" in err and str(out) in err
    assert out.is_file() and sorted(p.name for p in out.parent.iterdir()) == ["m.onnx"]


def test_graph_computing_in_bf16_is_refused_with_onnxruntimes_reason(tmp_path, capfd):
    """onnxruntime's CPU provider has no bf16 MatMul: the dense reference cannot run; one line says so."""
    folder = tmp_path / "in"
    folder.mkdir()
    model = G.save(G.bf16_matmul(), folder / "model.onnx")
    (tmp_path / "out").mkdir()
    assert_refused(["optimize", model, "-o", tmp_path / "out" / "m.onnx"], capfd, tmp_path,
                   "onnxruntime cannot load the input model", "MatMul")


@pytest.mark.parametrize("data_type, needles", [
    (TensorProto.FLOAT16, ["holds 4096 bytes", "[16, 64] as FLOAT16 need 2048", "re-export"]),
    (99, ["unknown data type (99)", "re-export"]),
])
def test_tensor_bytes_that_do_not_match_the_declared_type_refused(tmp_path, capfd, data_type, needles):
    """onnx.checker accepts both; the tool must not fail later in numpy."""
    m = G.mixed()
    next(t for t in m.graph.initializer if t.name == "W1").data_type = data_type
    folder = tmp_path / "in"
    folder.mkdir()
    model = G.save(m, folder / "model.onnx")
    (tmp_path / "out").mkdir()
    assert_refused(["optimize", model, "-o", tmp_path / "out" / "m.onnx"], capfd, tmp_path, "'W1'", *needles)
    assert_refused(["inspect", model], capfd, tmp_path, "'W1'", *needles)


def test_batch_size_sizes_the_declared_shape_check(tmp_path, capfd):
    """x[N, 1000, 1000] -> MatMul: 4 MB a sample. At the default batch 64 (256 MB) a 64 MiB limit
    refuses and says to lower --batch-size; --batch-size 8 (32 MB) fits."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1000, 1000])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1000, 4])],
                              [numpy_helper.from_array(G.rand((1000, 4)), "W")])
    model = model_in_folder(tmp_path, graph)
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "m.onnx"
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((8, 1000, 1000)).astype(np.float32))
    assert_refused(["optimize", model, "-o", out, "--max-memory", "64M", "--method", "global"], capfd, tmp_path,
                   "at batch 64", "lower --batch-size")
    code, _, err, _ = run_main(["optimize", model, "-o", out, "--max-memory", "64M", "--method", "global",
                                "--batch-size", "8", "--calib", calib, "--quiet"], capfd)
    assert code == 0, err


def test_memory_plan_runs_a_fixed_batch_graph_only_at_its_batch():
    """A graph whose Reshape bakes in batch 2 cannot run one sample: the plan measures at 2."""
    import torch

    from fcpts_onnx.learner.memory import plan_batch

    class FixedBatch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(12, 4)

        def run(self, feed, batch_first=False):
            return {"y": self.fc(feed["x"].reshape(2, 12))}  # fails for any batch but 2

    plan = plan_batch(FixedBatch(), {"x": torch.randn(6, 3, 4)}, 64, 2**40, fixed_batch=2)
    assert plan.batch_size == 2 and plan.per_sample_bytes > 0


def test_name_that_is_not_utf8_refused(tmp_path, capfd):
    """Found by the fuzzer: a flipped byte in a node name made onnx.checker's message undecodable."""
    from test_fuzz import mutant

    folder = tmp_path / "in"
    folder.mkdir()
    model = folder / "model.onnx"
    model.write_bytes(mutant("mixed", "flip_bytes", 42))
    (tmp_path / "out").mkdir()
    assert_refused(["optimize", model, "-o", tmp_path / "out" / "m.onnx"], capfd, tmp_path, "not valid UTF-8")


def test_a_run_sized_by_time_says_which_batch_it_took_and_how_to_repeat_it(tmp_path, monkeypatch):
    from fcpts_onnx.learner.fcpts import Learner

    # steps timed at 0.1 s a sample: 64 would fit about 59 of the default steps in 420 s, 16 about 236
    monkeypatch.setattr(Learner, "_probe", lambda self, best, learn: [0.1 * self.options.batch_size] * 3)
    model = mnist_like_model(tmp_path)
    calib = {"x": np.random.default_rng(0).standard_normal((96, 1, 28, 28)).astype(np.float32)}
    report = sparsify(model, tmp_path / "a.onnx", calib, sparsity=0.5, method="global", reconstruct=True,
                      report_path=False)
    learning = report.learning
    assert learning["batch_size"] == 16 and learning["memory"]["batch_size"] == 64
    assert learning["batch_choice"] == {"largest": 64, "chosen": 16, "wanted_steps": 300, "probe_step_s": {"16": 1.6}}
    note = next(n for n in report.notes if n.startswith("learning batch 16 instead of 64"))
    assert "1.6 s at batch 16" in note and "default schedule's 300 steps in the time budget" in note
    assert f"--iters {learning['repeat_iters']} --batch-size 16 repeats this run" in note
    assert 200 < learning["steps"] <= 240 and learning["limited_by_default_budget"]
    assert "batch 16)" in format_summary(report)  # the learning line names the batch it learned on
