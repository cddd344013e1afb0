"""Every bad input to `fcpts-onnx optimize`: exit 2, one line on stderr, no traceback, nothing written."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import matmul_conv_graph, save_model
from onnx import TensorProto, helper, numpy_helper

from fcpts_onnx.cli import main


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
PRUNABLE = 4 * 3 * 3 * 3 + 64 * 5  # weights of the conftest model


def tree(root: Path) -> dict[str, str]:
    """Every file and folder under root (hidden ones included) -> content hash ('dir' for folders)."""
    entries = {}
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            entries[os.path.relpath(os.path.join(folder, d), root)] = "dir"
        for f in files:
            path = os.path.join(folder, f)
            try:
                entries[os.path.relpath(path, root)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            except PermissionError:
                entries[os.path.relpath(path, root)] = f"unreadable {os.stat(path).st_mtime_ns}"
    return entries


def run_main(argv: list[str], capfd) -> tuple[int, str, str, bool]:
    """main(argv) in-process -> (exit status, stdout, stderr, raised SystemExit)."""
    try:
        code, exited = main([str(a) for a in argv]), False
    except SystemExit as exc:  # argparse errors
        code, exited = exc.code, True
    out, err = capfd.readouterr()
    return code, out, err, exited


def assert_refused(argv, capfd, root: Path, *needles: str, argparse_error: bool = False) -> str:
    """Run the CLI and check the error contract; return the error line."""
    before = tree(root)
    code, out, err, exited = run_main(argv, capfd)
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    assert tree(root) == before, "the failed run left files behind or changed one"
    if argparse_error:
        assert exited and "error:" in err
        return err
    assert not exited
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fcpts-onnx: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    return out


def optimize(model: Path, out_dir: Path, *extra) -> list:
    return ["optimize", model, "-o", out_dir / "m.sparse.onnx", *extra]


# ------------------------------------------------------------------------------------------
# The model argument
# ------------------------------------------------------------------------------------------


def test_missing_model(tmp_path, out_dir, capfd):
    assert_refused(optimize(tmp_path / "nope.onnx", out_dir), capfd, tmp_path, "nope.onnx", "no such file")


def test_folder_as_model(tmp_path, out_dir, capfd):
    (tmp_path / "model_dir").mkdir()
    assert_refused(optimize(tmp_path / "model_dir", out_dir), capfd, tmp_path, "model_dir", "folder")


@pytest.mark.skipif(IS_ROOT, reason="root reads files whatever their mode")
def test_unreadable_model(tiny_model, out_dir, capfd, tmp_path):
    tiny_model.chmod(0)
    try:
        assert_refused(optimize(tiny_model, out_dir), capfd, tmp_path, "permission denied")
    finally:
        tiny_model.chmod(0o644)


def test_unreadable_model_simulated(tiny_model, out_dir, capfd, tmp_path, monkeypatch):
    """The same refusal where the suite runs as root: the read itself fails with EACCES."""
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tiny_model))
    monkeypatch.setattr(onnx, "load_model", denied)
    assert_refused(optimize(tiny_model, out_dir), capfd, tmp_path, "permission denied")


@pytest.mark.parametrize("content", [
    pytest.param(np.random.default_rng(0).bytes(4096), id="random-bytes"),
    pytest.param(np.random.default_rng(1).bytes(37), id="random-bytes-short"),
    pytest.param(b"This is a text file, not a model.\nSecond line.\n", id="text"),
    pytest.param(b"", id="empty"),
    pytest.param(b"\x00" * 64, id="nul-bytes"),
])
def test_not_an_onnx_file(tmp_path, out_dir, capfd, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    assert_refused(optimize(path, out_dir), capfd, tmp_path, "bad.onnx", "not an ONNX model")


def test_nothing_prunable(tmp_path, out_dir, capfd):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    model = save_model(graph, tmp_path / "relu.onnx")
    assert_refused(optimize(model, out_dir), capfd, tmp_path, "nothing to prune")


def _with_second_input(tmp_path, name: str, dims: list) -> Path:
    graph = matmul_conv_graph()
    graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1  # x [1, 3, 6, 6]
    graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))
    graph.output.append(helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, dims))
    graph.node.append(helper.make_node("Identity", [name], [f"{name}_out"]))
    return save_model(graph, tmp_path / "stateful.onnx")


def test_a_setting_input_cannot_be_made_up(tmp_path, out_dir, capfd):
    model = _with_second_input(tmp_path, "sr", [])  # a sample rate fed as an input
    for method in ("fcpts", "lamp"):
        assert_refused(optimize(model, out_dir, "--calib", "random", "--method", method), capfd, tmp_path,
                       "'sr' is a setting", "0-d array")
    # the parity check batches the same way: the same line, not onnxruntime's complaint about a
    # vector fed where the graph declares a scalar
    assert_refused(["inspect", model, "--parity"], capfd, tmp_path, "'sr' is a setting", "0-d array")


def test_a_state_whose_samples_are_not_first_is_ambiguous_without_batch_axis(tmp_path, out_dir, capfd):
    model = _with_second_input(tmp_path, "state", [2, None, None])  # x's batch is fixed at 1: which axis?
    assert_refused(optimize(model, out_dir, "--calib", "random"), capfd, tmp_path,
                   "stateful.onnx", "'state'", "--batch-axis state=AXIS")
    assert_refused(["inspect", model, "--parity"], capfd, tmp_path, "--batch-axis state=AXIS")
    assert_refused(optimize(model, out_dir, "--calib", "random", "--batch-axis", "state=3"), capfd, tmp_path,
                   "--batch-axis state=3", "has 3 axes")
    assert_refused(optimize(model, out_dir, "--calib", "random", "--batch-axis", "state"), capfd, tmp_path,
                   "NAME=AXIS", argparse_error=True)


def test_matmul_of_two_activations_is_nothing_prunable(tmp_path, out_dir, capfd):
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["y"])], "mm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [4, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
    )
    model = save_model(graph, tmp_path / "mm.onnx")
    assert_refused(optimize(model, out_dir), capfd, tmp_path, "nothing to prune")


def quantized_matmul_integer() -> onnx.GraphProto:
    w = np.random.default_rng(0).integers(0, 255, (4, 3)).astype(np.uint8)
    return helper.make_graph(
        [helper.make_node("MatMulInteger", ["x", "W"], ["y"])], "q",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, ["N", 3])],
        initializer=[numpy_helper.from_array(w, "W")],
    )


def quantized_qlinear_conv() -> onnx.GraphProto:
    w = np.random.default_rng(0).integers(0, 255, (2, 1, 3, 3)).astype(np.uint8)
    inits = [
        numpy_helper.from_array(np.array(0.1, np.float32), "xs"),
        numpy_helper.from_array(np.array(128, np.uint8), "xz"),
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(np.array(0.05, np.float32), "ws"),
        numpy_helper.from_array(np.array(128, np.uint8), "wz"),
        numpy_helper.from_array(np.array(0.2, np.float32), "ys"),
        numpy_helper.from_array(np.array(128, np.uint8), "yz"),
    ]
    return helper.make_graph(
        [helper.make_node("QLinearConv", ["x", "xs", "xz", "W", "ws", "wz", "ys", "yz"], ["y"])], "q",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 1, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, 2, 3, 3])],
        initializer=inits,
    )


@pytest.mark.parametrize("build, op", [(quantized_matmul_integer, "MatMulInteger"),
                                       (quantized_qlinear_conv, "QLinearConv")])
def test_quantized_model(tmp_path, out_dir, capfd, build, op):
    model = save_model(build(), tmp_path / "q.onnx")
    assert_refused(optimize(model, out_dir), capfd, tmp_path, "already quantized", op)


# ------------------------------------------------------------------------------------------
# Options
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.2", "nan", "inf", "0%", "100%", "150%"])
def test_sparsity_out_of_range(tiny_model, out_dir, capfd, tmp_path, value):
    assert_refused(optimize(tiny_model, out_dir, f"--sparsity={value}"), capfd, tmp_path,
                   "--sparsity", "between 0 and 1")


def test_negative_sparsity_as_separate_argument(tiny_model, out_dir, capfd, tmp_path):
    assert_refused(optimize(tiny_model, out_dir, "--sparsity", "-0.2"), capfd, tmp_path, "--sparsity", "-0.2")


@pytest.mark.parametrize("value", ["abc", "", "%", "0.5.5"])
def test_sparsity_not_a_number(tiny_model, out_dir, capfd, tmp_path, value):
    err = assert_refused(optimize(tiny_model, out_dir, f"--sparsity={value}"), capfd, tmp_path,
                         argparse_error=True)
    assert "--sparsity" in err


@pytest.mark.parametrize("value", ["0", "-1", "1.01", "nan"])
def test_max_layer_sparsity_out_of_range(tiny_model, out_dir, capfd, tmp_path, value):
    assert_refused(optimize(tiny_model, out_dir, f"--max-layer-sparsity={value}"), capfd, tmp_path,
                   "--max-layer-sparsity")


def test_batch_size_zero(tiny_model, out_dir, capfd, tmp_path):
    assert_refused(optimize(tiny_model, out_dir, "--batch-size", "0"), capfd, tmp_path, "--batch-size")


@pytest.mark.parametrize("device", ["gpu", "cuda0", "CUDA", "cpu:0", ""])
def test_device_not_understood(tiny_model, out_dir, capfd, tmp_path, device):
    assert_refused(optimize(tiny_model, out_dir, "--method", "lamp", "--no-reconstruct", "--device", device),
                   capfd, tmp_path, "--device must be cpu, cuda or cuda:N")


@pytest.mark.skipif(torch_cuda_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_refused_before_any_work(tiny_model, out_dir, capfd, tmp_path, device):
    # was an internal error: the GPU's free memory was read before the device was checked
    assert_refused(optimize(tiny_model, out_dir, "--calib", "random", "--device", device), capfd, tmp_path,
                   "--device cuda asked for, but torch sees no CUDA device; use --device cpu")


def test_unknown_method(tiny_model, out_dir, capfd, tmp_path):
    err = assert_refused(optimize(tiny_model, out_dir, "--method", "magnitude"), capfd, tmp_path,
                         argparse_error=True)
    assert "magnitude" in err and "global" in err


@pytest.mark.parametrize("pattern", ["(", "[a-", "*conv", "(?P<x"])
def test_invalid_exclude_regex(tiny_model, out_dir, capfd, tmp_path, pattern):
    assert_refused(optimize(tiny_model, out_dir, f"--exclude={pattern}"), capfd, tmp_path,
                   "--exclude", "regular expression")


def test_exclude_everything_leaves_nothing_to_prune(tiny_model, out_dir, capfd, tmp_path):
    assert_refused(optimize(tiny_model, out_dir, "--exclude", "."), capfd, tmp_path,
                   "nothing to prune", "--exclude")


def test_unknown_op_types(tiny_model, out_dir, capfd, tmp_path):
    assert_refused(optimize(tiny_model, out_dir, "--op-types", "Relu"), capfd, tmp_path, "--op-types", "Relu")


def test_shape_with_calib(tiny_model, out_dir, capfd, tmp_path):
    np.savez(tmp_path / "c.npz", x=np.zeros((2, 3, 6, 6), np.float32))
    assert_refused(optimize(tiny_model, out_dir, "--calib", tmp_path / "c.npz", "--shape", "x=2,3,6,6"),
                   capfd, tmp_path, "--shape")


def test_target_below_existing_zeros(tmp_path, out_dir, capfd):
    model = save_model(matmul_conv_graph(zero_fraction=0.9), tmp_path / "sparse.onnx")
    assert_refused(optimize(model, out_dir, "--sparsity", "0.5"), capfd, tmp_path,
                   "already", "zeros", "--sparsity")


def test_target_above_layer_caps(tiny_model, out_dir, capfd, tmp_path):
    assert_refused(optimize(tiny_model, out_dir, "--sparsity", "0.8", "--max-layer-sparsity", "0.5"),
                   capfd, tmp_path, "out of reach", "--max-layer-sparsity")


# ------------------------------------------------------------------------------------------
# Calibration data
# ------------------------------------------------------------------------------------------


def x(n=4, *rest, dtype=np.float32):
    return np.random.default_rng(0).standard_normal((n, *(rest or (3, 6, 6)))).astype(dtype)


@pytest.mark.parametrize("arrays, needles", [
    pytest.param({"input": x()}, ["'input'", "rename"], id="wrong-name"),
    pytest.param({"x": x(), "extra": x()}, ["'extra'"], id="extra-key"),
    pytest.param({"x": x(4, 3, 7, 7)}, ["'x'", "axis 2 must be 6"], id="wrong-shape"),
    pytest.param({"x": x(4, 3, 6)}, ["'x'", "rank 4"], id="wrong-rank"),
    pytest.param({"x": x(dtype=np.float64)}, ["'x'", "float64", ".astype('float32')"], id="wrong-dtype"),
    pytest.param({"x": np.zeros((0, 3, 6, 6), np.float32)}, ["'x'", "no samples"], id="no-samples"),
])
def test_calibration_mismatch(tiny_model, out_dir, capfd, tmp_path, arrays, needles):
    np.savez(tmp_path / "calib.npz", **arrays)
    assert_refused(optimize(tiny_model, out_dir, "--calib", tmp_path / "calib.npz"), capfd, tmp_path, *needles)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_calibration_non_finite(tiny_model, out_dir, capfd, tmp_path, bad):
    data = x()
    data[1, 2, 3, 4] = bad
    np.save(tmp_path / "calib.npy", data)
    assert_refused(optimize(tiny_model, out_dir, "--calib", tmp_path / "calib.npy"), capfd, tmp_path,
                   "'x'", "NaN or infinite")


def test_calibration_file_problems(tiny_model, out_dir, capfd, tmp_path):
    assert_refused(optimize(tiny_model, out_dir, "--calib", tmp_path / "none.npz"), capfd, tmp_path,
                   "no such calibration file")
    (tmp_path / "c.txt").write_text("1 2 3")
    assert_refused(optimize(tiny_model, out_dir, "--calib", tmp_path / "c.txt"), capfd, tmp_path,
                   "unsupported calibration file type")
    (tmp_path / "c.npz").write_bytes(b"garbage" * 50)
    assert_refused(optimize(tiny_model, out_dir, "--calib", tmp_path / "c.npz"), capfd, tmp_path,
                   "not a readable .npz")
    np.save(tmp_path / "obj.npy", np.array([None, 1], dtype=object), allow_pickle=True)
    assert_refused(optimize(tiny_model, out_dir, "--calib", tmp_path / "obj.npy"), capfd, tmp_path,
                   "object array")


# ------------------------------------------------------------------------------------------
# Output paths
# ------------------------------------------------------------------------------------------


def test_output_equal_to_input(tiny_model, capfd, tmp_path):
    assert_refused(["optimize", tiny_model, "-o", tiny_model], capfd, tmp_path, "overwrite the input")
    # the same file spelled differently
    other = tiny_model.parent / ".." / tiny_model.parent.name / tiny_model.name
    assert_refused(["optimize", tiny_model, "-o", other], capfd, tmp_path, "overwrite the input")


def test_output_symlink_to_input(tiny_model, capfd, tmp_path):
    link = tmp_path / "link.onnx"
    link.symlink_to(tiny_model)
    assert_refused(["optimize", tiny_model, "-o", link], capfd, tmp_path, "overwrite the input")


def test_output_into_missing_folder(tiny_model, capfd, tmp_path):
    assert_refused(["optimize", tiny_model, "-o", tmp_path / "no" / "such" / "m.onnx"], capfd, tmp_path,
                   "does not exist")


def test_output_is_a_folder(tiny_model, out_dir, capfd, tmp_path):
    assert_refused(["optimize", tiny_model, "-o", out_dir], capfd, tmp_path, "is a folder")


@pytest.mark.skipif(IS_ROOT, reason="root writes into read-only folders")
def test_output_into_unwritable_folder(tiny_model, out_dir, capfd, tmp_path):
    out_dir.chmod(0o555)
    try:
        assert_refused(optimize(tiny_model, out_dir), capfd, tmp_path, "not writable")
    finally:
        out_dir.chmod(0o755)


def test_output_into_unwritable_folder_simulated(tiny_model, out_dir, capfd, tmp_path, monkeypatch):
    """The same refusal where the suite runs as root: os.access reports the folder read-only."""
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == out_dir else real_access(p, mode, **kw))
    assert_refused(optimize(tiny_model, out_dir), capfd, tmp_path, "not writable")


def test_report_into_missing_folder(tiny_model, out_dir, capfd, tmp_path):
    assert_refused(optimize(tiny_model, out_dir, "--report", tmp_path / "no" / "r.json"), capfd, tmp_path,
                   "does not exist")


def test_report_over_the_input_or_output(tiny_model, out_dir, capfd, tmp_path):
    assert_refused(optimize(tiny_model, out_dir, "--report", tiny_model), capfd, tmp_path, "overwrite")
    assert_refused(optimize(tiny_model, out_dir, "--report", out_dir / "m.sparse.onnx"), capfd, tmp_path,
                   "overwrite")


def test_report_is_a_folder(tiny_model, out_dir, capfd, tmp_path):
    assert_refused(optimize(tiny_model, out_dir, "--report", out_dir), capfd, tmp_path, "is a folder")


# ------------------------------------------------------------------------------------------
# Subprocess: what a shell user sees
# ------------------------------------------------------------------------------------------


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fcpts_onnx", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_subprocess_errors(tmp_path, tiny_model):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x96\x01garbage")
    before = tree(tmp_path)
    for args in (["optimize", tmp_path / "missing.onnx"], ["optimize", junk],
                 ["optimize", tiny_model, "--sparsity", "1.5"]):
        proc = cli(*args)
        assert proc.returncode == 2, proc
        assert "Traceback" not in proc.stderr + proc.stdout
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("fcpts-onnx: error: "), proc.stderr
    proc = cli("optimize", tiny_model, "--sparsity", "abc")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "usage:" in proc.stderr
    assert tree(tmp_path) == before


# ------------------------------------------------------------------------------------------
# A successful run, for contrast
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["global", "uniform", "erk", "lamp"])
def test_successful_run(tiny_model, out_dir, capfd, tmp_path, method):
    sparsity = 0.73
    np.savez(tmp_path / "calib.npz", x=x(5))
    input_hash = hashlib.sha256(tiny_model.read_bytes()).hexdigest()
    required = math.floor(sparsity * PRUNABLE + 0.5)
    code, out, err, exited = run_main(
        optimize(tiny_model, out_dir, "--sparsity", sparsity, "--method", method,
                 "--calib", tmp_path / "calib.npz"), capfd)
    assert (code, exited) == (0, False), err
    assert err == "" and "Traceback" not in out
    assert f"report: {out_dir / 'm.sparse.report.json'}" in out
    assert sorted(os.listdir(out_dir)) == ["m.sparse.onnx", "m.sparse.report.json"]  # no temp left
    assert hashlib.sha256(tiny_model.read_bytes()).hexdigest() == input_hash

    report = json.loads((out_dir / "m.sparse.report.json").read_text())
    assert report["achieved_sparsity"] == required / PRUNABLE
    assert report["zero_params"] == required and report["total_params"] == PRUNABLE
    assert report["method"] == method

    written = onnx.load(str(out_dir / "m.sparse.onnx"))
    zeros = sum(int(np.count_nonzero(numpy_helper.to_array(t) == 0)) for t in written.graph.initializer)
    assert zeros == required


def test_inspect_parity_on_generated_inputs_that_do_not_fit_says_how_to_give_sizes(tmp_path, capfd):
    """A spectrogram front end (openwakeword's melspectrogram) convolves a dynamic-length signal
    with a 64-wide kernel: the generated 32 samples are too short for onnxruntime. The refusal
    names --shape and --calib, as optimize's does."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 1, 64)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "frontend",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, "samples"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, "frames"])], [w])
    path = save_model(graph, tmp_path / "mel.onnx")
    line = assert_refused(["inspect", path, "--parity"], capfd, tmp_path, "onnxruntime cannot run", "--shape",
                          "--calib")
    assert "generated" in line
    code, out, err, _ = run_main(["inspect", path, "--parity", "--shape", "x=2,1,256"], capfd)
    assert code == 0 and "pass" in out, (out, err)
