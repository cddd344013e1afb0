"""fcpts-onnx bench, the DeepSparse worker protocol, and --store sparse (sparse_initializer).

Fast: tiny models built in tmp_path, a few timed iterations per case. The DeepSparse worker
protocol is tested with stand-in workers (small Python scripts speaking the same JSON, run
with sys.executable); the real DeepSparse is used only where its venv exists.
"""

from __future__ import annotations

import ast
import json
import os
import sys
import textwrap
from pathlib import Path

import graphs
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import matmul_conv_graph, save_model
from onnx import TensorProto, helper, numpy_helper

from fcpts_onnx import sparsify
from fcpts_onnx.bench import BenchError, Budget, DeepSparseRunner, OnnxRuntimeRunner, WorkerError, benchmark
from fcpts_onnx.bench import core as bench_core
from fcpts_onnx.bench.inputs import InputSource
from fcpts_onnx.bench.protocol import WORKER, call_worker
from fcpts_onnx.bench.runners import DEFAULT_VENV, ENV_PYTHON, ROOT
from fcpts_onnx.cli import main
from fcpts_onnx.discovery import discover
from fcpts_onnx.learner.options import LearnOptions
from fcpts_onnx.sparse_storage import densify, sparse_to_dense, stored_values, to_sparse_storage, worthwhile
from fcpts_onnx.verify import count_zeros_in_file

FAST = Budget(warmup=1, iterations=3, seconds=None)
CASE_FIELDS = {
    "model", "model_index", "runtime", "engine", "batch_size", "threads", "num_cores", "num_streams", "scenario",
    "warmup_iterations", "status", "note", "iterations", "seconds_ran", "items_per_sec", "median_latency_ms",
    "mean_latency_ms", "std_latency_ms", "min_latency_ms", "p90_latency_ms", "p99_latency_ms",
    "speedup_vs_dense", "speedup_vs_onnxruntime_dense", "max_rel_diff_vs_onnxruntime",
}


@pytest.fixture(autouse=True)
def _no_real_deepsparse_by_default(monkeypatch, tmp_path):
    """Tests choose their DeepSparse explicitly: point the default at nothing."""
    monkeypatch.setenv(ENV_PYTHON, str(tmp_path / "no-deepsparse" / "bin" / "python"))


@pytest.fixture
def pair(tmp_path) -> tuple[Path, Path]:
    """(dense, 90% sparse) copies of the Conv + MatMul model, batch axis dynamic."""
    dense = save_model(matmul_conv_graph(), tmp_path / "dense.onnx")
    sparse = tmp_path / "sparse.onnx"
    sparsify(dense, sparse, sparsity=0.9, method="global", report_path=False)
    return dense, sparse


def write_worker(tmp_path: Path, body: str, name: str = "worker.py") -> Path:
    """A stand-in worker: ``body`` runs with ``request`` (dict or None for --probe) and ``reply(dict)``."""
    path = tmp_path / name
    path.write_text(textwrap.dedent("""\
        import json, os, sys
        LOG = os.environ.get("FAKE_WORKER_LOG")
        def reply(obj):
            sys.stdout.write(json.dumps(obj) + "\\n")
        probe = "--probe" in sys.argv
        request = None if probe else json.loads(sys.stdin.read())
        if LOG and not probe:
            with open(LOG, "a") as f:
                f.write(json.dumps(request) + "\\n")
        """) + textwrap.dedent(body))
    return path


GOOD_WORKER = """
if probe:
    reply({"protocol": 1, "ok": True, "deepsparse_version": "0.fake", "onnx_version": "1.14.1"})
else:
    import numpy as np
    data = np.load(request["inputs"]["npz"])
    assert data["x"].shape[0] == request["batch_size"]
    reply({"protocol": 1, "ok": True, "engine": "deepsparse 0.fake", "latencies_ms": [4.0, 2.0, 3.0],
           "num_cores": request["num_cores"], "num_streams": 1, "compile_seconds": 0.1,
           "fraction_of_supported_ops": 1.0})
"""


def stand_in(tmp_path: Path, body: str = GOOD_WORKER, name: str = "worker.py") -> DeepSparseRunner:
    return DeepSparseRunner(python=sys.executable, worker=write_worker(tmp_path, body, name))


# ---------------------------------------------------------------------------------------------
# bench on onnxruntime


def test_bench_onnxruntime_produces_every_field(pair, tmp_path):
    dense, sparse = pair
    result = benchmark([dense, sparse], batch_sizes=[1, 4], runtimes=["onnxruntime"], threads=1, budget=FAST)
    data = json.loads(json.dumps(result.to_dict()))  # JSON-ready
    assert len(data["cases"]) == 4 and not result.failed
    for case in data["cases"]:
        assert CASE_FIELDS <= set(case), CASE_FIELDS - set(case)
        assert case["status"] == "ok" and case["iterations"] == 3 and case["runtime"] == "onnxruntime"
        assert case["engine"].startswith("onnxruntime ") and "CPUExecutionProvider" in case["engine"]
        assert 0 < case["min_latency_ms"] <= case["median_latency_ms"] <= case["p90_latency_ms"] <= case[
            "p99_latency_ms"]
        assert case["items_per_sec"] == pytest.approx(
            case["batch_size"] * case["iterations"] / case["seconds_ran"], rel=1e-3)
        assert case["speedup_vs_dense"] > 0 and case["speedup_vs_onnxruntime_dense"] > 0
        assert case["max_rel_diff_vs_onnxruntime"] is None  # the baseline itself
    dense_cases = [c for c in data["cases"] if c["model_index"] == 0]
    assert all(c["speedup_vs_dense"] == 1.0 == c["speedup_vs_onnxruntime_dense"] for c in dense_cases)
    assert {c["batch_size"] for c in data["cases"]} == {1, 4}

    d_model, s_model = data["models"]
    assert d_model["role"] == "dense reference" and s_model["storage"] == "dense"
    for m in (d_model, s_model):
        assert set(m["sizes"]) == {"file_bytes", "zip_bytes", "sparse_initializer_bytes",
                                   "sparse_initializer_zip_bytes", "sparse_weights"}
        assert m["sizes"]["file_bytes"] == Path(m["path"]).stat().st_size
    assert d_model["macs"]["macs"] == d_model["macs"]["nonzero_macs"] == 108 * 16 + 320
    assert s_model["macs"]["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert s_model["macs"]["nonzero_macs"] < 0.2 * s_model["macs"]["macs"]
    assert [r["name"] for r in s_model["macs"]["layers"]] == ["W1", "W2"]
    assert all({"macs", "nonzero_macs", "sparsity", "params", "zeros"} <= set(r) for r in s_model["macs"]["layers"])
    # 90% zeros: the sparse form and the zip are smaller than the dense file
    assert s_model["sizes"]["sparse_initializer_bytes"] < s_model["sizes"]["file_bytes"]
    assert s_model["sizes"]["zip_bytes"] < d_model["sizes"]["zip_bytes"]
    assert d_model["sizes"]["sparse_weights"] == 0 and s_model["sizes"]["sparse_weights"] == 2

    table = result.format_table()
    assert "about 1.0x" in table and "onnxruntime" in table and "vs ORT dense" in table
    assert "setup_deepsparse.sh" not in table  # deepsparse was not asked for
    assert "| model |" in result.format_markdown()


def test_bench_cli_json_plot_and_one_line_notes(pair, tmp_path, capfd):
    dense, sparse = pair
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    code = main(["bench", str(dense), str(sparse), "--runtime", "onnxruntime,deepsparse", "--iterations", "2",
                 "--warmup", "0", "--batch", "1,2", "--threads", "1", "--json", str(out), "--plot", str(png), "-q"])
    stdout, stderr = capfd.readouterr()
    assert code == 0, stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(out.read_text())
    assert {c["runtime"] for c in data["cases"]} == {"onnxruntime"}
    ds = [r for r in data["runtimes"] if r["name"] == "deepsparse"][0]
    assert not ds["available"]
    # the missing DeepSparse is one line that says how to set it up; the other runtime still ran
    setup = [line for line in stdout.splitlines() if "setup_deepsparse.sh" in line]
    assert len(setup) == 1 and setup[0].startswith("note: deepsparse is not set up")
    assert f"bash {ROOT / 'tools' / 'setup_deepsparse.sh'}" in setup[0]
    assert "about 1.0x" in stdout


def test_bench_json_to_stdout(pair, capfd):
    dense, _ = pair
    code = main(["bench", str(dense), "--runtime", "onnxruntime", "--iterations", "1", "--warmup", "0",
                 "--batch", "1", "--json", "-"])
    stdout, _ = capfd.readouterr()
    assert code == 0
    assert json.loads(stdout)["cases"][0]["batch_size"] == 1


def test_bench_time_budget(pair):
    dense, _ = pair
    result = benchmark([dense], batch_sizes=[1], runtimes=["onnxruntime"],
                       budget=Budget(warmup=0, seconds=0.05, min_iterations=3))
    case = result.cases[0]
    assert case["iterations"] >= 3 and case["seconds_ran"] > 0


@pytest.mark.parametrize("argv, needle", [
    (["--runtime", "tensorrt"], "--runtime tensorrt unknown"),
    (["--iterations", "0"], "--iterations must be a positive integer"),
    (["--time", "-1"], "--time must be a positive"),
    (["--threads", "0"], "--threads must be a positive integer"),
    (["--shape", "nope=1,3,6,6"], "not an input of the model"),
    (["--json", "/no/such/folder/x.json"], "does not exist"),
])
def test_bench_cli_errors_are_one_line(pair, capfd, argv, needle):
    dense, _ = pair
    code = main(["bench", str(dense), *argv])
    out, err = capfd.readouterr()
    assert code == 2, (out, err)
    assert err.startswith("fcpts-onnx: error: ") and err.count("\n") == 1 and needle in err, err
    assert "Traceback" not in err


def test_bench_missing_model_is_one_line(tmp_path, capfd):
    code = main(["bench", str(tmp_path / "missing.onnx"), "--runtime", "onnxruntime"])
    _, err = capfd.readouterr()
    assert code == 2 and err.count("\n") == 1 and "no such file" in err


# ---------------------------------------------------------------------------------------------
# inputs


def test_inputs_repeat_or_cut_calibration(tmp_path):
    model = helper.make_model(matmul_conv_graph(), opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(0).standard_normal((3, 3, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    source = InputSource(model, calib=tmp_path / "c.npz")
    eight = source.feed(8)["x"]
    assert eight.shape == (8, 3, 6, 6) and np.array_equal(eight[3:6], x) and np.array_equal(eight[6:], x[:2])
    assert np.array_equal(source.feed(2)["x"], x[:2])
    assert "repeated or cut" in source.describe()


def test_inputs_dynamic_dims_need_shape(tmp_path):
    graph = matmul_conv_graph()
    dims = graph.input[0].type.tensor_type.shape.dim
    dims[2].Clear()
    dims[2].dim_param = "H"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(BenchError, match=r"--shape x=1,3,N,6") as info:
        InputSource(model)
    assert "\n" not in str(info.value)
    source = InputSource(model, shapes={"x": (7, 3, 6, 6)})
    assert source.feed(5)["x"].shape == (5, 3, 6, 6)  # batch from --batch, the rest from --shape
    assert source.batch_dynamic_shapes()


def test_fixed_batch_model_runs_at_other_batches_or_says_why(tmp_path):
    fixed = graphs.save(graphs.conv(batch=1), tmp_path / "conv_b1.onnx")  # nothing inside fixes the batch
    result = benchmark([fixed], batch_sizes=[1, 3], runtimes=["onnxruntime"], budget=FAST)
    assert [c["status"] for c in result.cases] == ["ok", "ok"]
    assert result.cases[1]["batch_made_dynamic"] is True

    # a Reshape to a constant [1, -1] really fixes the batch: that case is skipped with the reason
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["f"], name="reshape"),
             helper.make_node("MatMul", ["f", "W"], ["y"], name="mm")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(np.array([1, -1], np.int64), "shape"),
         numpy_helper.from_array(np.ones((8, 3), np.float32), "W")])
    path = save_model(graph, tmp_path / "reshape_b1.onnx")
    result = benchmark([path], batch_sizes=[1, 4], runtimes=["onnxruntime"], budget=FAST)
    ok, skipped = result.cases
    assert ok["status"] == "ok" and skipped["status"] == "skipped"
    assert "batch is fixed at 1" in skipped["note"] and "dynamic batch axis" in skipped["note"]
    assert "skipped: reshape_b1.onnx on onnxruntime at batch 4" in result.format_table()


# ---------------------------------------------------------------------------------------------
# the DeepSparse worker protocol, with stand-in workers


def test_stand_in_worker_speaks_the_protocol(pair, tmp_path, monkeypatch):
    dense, sparse = pair
    log = tmp_path / "requests.jsonl"
    monkeypatch.setenv("FAKE_WORKER_LOG", str(log))
    runner = stand_in(tmp_path)
    result = benchmark([dense, sparse], batch_sizes=[1, 2], threads=2, budget=Budget(warmup=2, iterations=3),
                       runners=[OnnxRuntimeRunner(), runner])
    ds = [c for c in result.cases if c["runtime"] == "deepsparse"]
    assert len(ds) == 4 and all(c["status"] == "ok" for c in ds)
    assert all(c["median_latency_ms"] == 3.0 and c["p99_latency_ms"] == pytest.approx(3.98) for c in ds)
    assert all(c["engine"] == "deepsparse 0.fake" and c["num_cores"] == 2 for c in ds)
    assert all(c["speedup_vs_dense"] == 1.0 for c in ds)
    assert all(c["speedup_vs_onnxruntime_dense"] > 0 for c in ds)
    assert ds[1]["items_per_sec"] == pytest.approx(1 * 3 / 0.009)
    requests = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(requests) == 4
    first = requests[0]
    assert first["protocol"] == 1 and first["batch_size"] == 1 and first["num_cores"] == 2
    assert first["iterations"] == 3 and first["warmup"] == 2
    assert Path(first["model"]).name == dense.name and Path(first["model"]) != dense  # a private copy
    assert first["inputs"]["npz"].endswith(".npz") and first["override_input_shapes"] is False
    info = [r for r in result.runtimes if r["name"] == "deepsparse"][0]
    assert info["available"] and info["version"] == "0.fake"
    assert any("sparse CPU kernels" in n for n in result.notes)


def test_worker_never_gets_the_users_file(pair, tmp_path):
    """DeepSparse saves input-shape overrides into the file it is given: it must get a copy."""
    dense, sparse = pair
    stored = tmp_path / "stored.onnx"
    sparsify(dense, stored, sparsity=0.9, method="global", report_path=False, store="sparse")
    before = {p: p.read_bytes() for p in (dense, sparse, stored)}
    vandal = GOOD_WORKER.replace("    data = np.load", """    import onnx
    m = onnx.load(request["model"])
    assert not m.graph.sparse_initializer  # DeepSparse gets dense storage
    open(request["model"], "wb").write(b"overwritten")
    data = np.load""")
    result = benchmark([dense, sparse, stored], batch_sizes=[1, 2], budget=FAST,
                       runners=[OnnxRuntimeRunner(), stand_in(tmp_path, vandal)])
    assert all(c["status"] == "ok" for c in result.cases), [c["note"] for c in result.cases]
    assert {p: p.read_bytes() for p in before} == before


def test_worker_environment_disables_analytics(tmp_path):
    worker = write_worker(tmp_path, """
reply({"protocol": 1, "ok": True, "env": os.environ.get("NM_DISABLE_ANALYTICS")})
""")
    reply = call_worker([sys.executable, str(worker)], None, timeout=30, probe=True)
    assert reply["env"] == "1"


@pytest.mark.parametrize("body, needle", [
    ("sys.stderr.write('Illegal instruction (core dumped)\\n'); sys.exit(3)",
     "exited with status 3 without a reply: Illegal instruction (core dumped)"),
    ("import os; os.kill(os.getpid(), 9)", "was killed by signal 9 without a reply"),
    ("print('hello, this is not JSON'); sys.exit(0)", "replied with something that is not JSON: 'hello, this is not"),
    ("print('[1, 2, 3]')", "JSON that is not a worker reply"),
    ("reply({'protocol': 1, 'ok': False, 'error': 'RuntimeError: NM: error: bad model\\nsecond line'}); sys.exit(1)",
     "deepsparse worker: RuntimeError: NM: error: bad model second line"),
    ("reply({'protocol': 7, 'ok': True, 'latencies_ms': [1.0]})", "speaks protocol 7, expected 1"),
    ("reply({'protocol': 1, 'ok': True, 'latencies_ms': []})", "replied without latencies"),
])
def test_broken_workers_give_one_line_errors(tmp_path, body, needle):
    worker = write_worker(tmp_path, body)
    with pytest.raises(WorkerError) as info:
        call_worker([sys.executable, str(worker)], {"model": "m.onnx"}, timeout=30)
    message = str(info.value)
    assert needle in message and "\n" not in message and len(message) < 500, message


def test_worker_timeout_is_one_line(tmp_path):
    worker = write_worker(tmp_path, "import time; time.sleep(30)")
    with pytest.raises(WorkerError, match=r"gave no reply within 0.5 s and was stopped"):
        call_worker([sys.executable, str(worker)], {}, timeout=0.5)


def test_crashing_worker_fails_its_cases_not_the_bench(pair, tmp_path, capfd):
    dense, sparse = pair
    crash = """
if probe:
    reply({"protocol": 1, "ok": True, "deepsparse_version": "0.fake"})
else:
    sys.stderr.write("Segmentation fault\\n"); sys.exit(139)
"""
    result = benchmark([dense, sparse], batch_sizes=[1], budget=FAST,
                       runners=[OnnxRuntimeRunner(), stand_in(tmp_path, crash)])
    ds = [c for c in result.cases if c["runtime"] == "deepsparse"]
    assert [c["status"] for c in ds] == ["failed", "failed"] and len(result.failed) == 2
    assert all("exited with status 139 without a reply: Segmentation fault" in c["note"] for c in ds)
    assert all(c["status"] == "ok" for c in result.cases if c["runtime"] == "onnxruntime")
    table = result.format_table()
    assert "failed: dense.onnx on deepsparse at batch 1: deepsparse worker exited with status 139" in table

    # the CLI prints the table and exits 1 when a case failed; the interpreter given is a script
    # that runs the crashing worker whatever it is asked to run
    fake_python = tmp_path / "fake-python"
    fake_python.write_text(f"#!/bin/sh\nshift\nexec {sys.executable} {tmp_path / 'worker.py'} \"$@\"\n")
    fake_python.chmod(0o755)
    code = main(["bench", str(dense), "--deepsparse-python", str(fake_python), "--runtime", "onnxruntime,deepsparse",
                 "--iterations", "1", "--batch", "1", "-q"])
    out, err = capfd.readouterr()
    assert code == 1 and "Traceback" not in out + err
    assert "failed: dense.onnx on deepsparse at batch 1" in out


def test_deepsparse_not_set_up(tmp_path, pair):
    missing = tmp_path / "nowhere" / "bin" / "python"
    info = DeepSparseRunner(python=missing).probe()
    assert not info.available
    assert info.note == (f"deepsparse is not set up ({missing} does not exist); set it up with: "
                         f"bash {ROOT / 'tools' / 'setup_deepsparse.sh'}")
    # an interpreter without deepsparse: the real worker answers, in one line, that it cannot import it
    info = DeepSparseRunner(python=sys.executable).probe()
    assert not info.available and "No module named 'deepsparse'" in info.note and "\n" not in info.note
    assert info.note.endswith("setup_deepsparse.sh")
    # only deepsparse asked for, and it is missing: a one-line error
    dense, _ = pair
    with pytest.raises(BenchError, match="no runtime to benchmark on: deepsparse is not set up"):
        benchmark([dense], runtimes=["deepsparse"], budget=FAST, deepsparse_python=missing)


def test_default_interpreter_is_the_venv_or_the_env_var(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_PYTHON)
    runner = DeepSparseRunner()
    assert runner.python.parent.parent.name == DEFAULT_VENV
    monkeypatch.setenv(ENV_PYTHON, "/opt/ds/bin/python")
    assert DeepSparseRunner().python == Path("/opt/ds/bin/python")
    assert DeepSparseRunner(python="/x/python").python == Path("/x/python")


def test_deepsparse_refuses_ir10_and_opset18_before_running(tmp_path, pair, monkeypatch):
    dense, _ = pair
    m = helper.make_model(matmul_conv_graph(), opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    onnx.checker.check_model(m)
    new = tmp_path / "dynamo_style.onnx"
    onnx.save_model(m, str(new))
    log = tmp_path / "requests.jsonl"
    monkeypatch.setenv("FAKE_WORKER_LOG", str(log))
    result = benchmark([dense, new], batch_sizes=[1], budget=FAST,
                       runners=[OnnxRuntimeRunner(), stand_in(tmp_path)])
    refused = [c for c in result.cases if c["model"] == "dynamo_style.onnx" and c["runtime"] == "deepsparse"][0]
    assert refused["status"] == "skipped"
    assert "IR 10 opset 18" in refused["note"] and "dynamo=False, opset_version=17" in refused["note"]
    assert [Path(json.loads(x)["model"]).name for x in log.read_text().splitlines()] == [dense.name]  # never sent
    ran = [c for c in result.cases if c["model"] == "dynamo_style.onnx" and c["runtime"] == "onnxruntime"][0]
    assert ran["status"] == "ok" and not result.failed
    assert "skipped: dynamo_style.onnx on deepsparse at batch 1: DeepSparse 1.8 reads ONNX IR <= 9" in \
        result.format_table()
    # opset 18 alone is refused too
    m.ir_version = 8
    onnx.save_model(m, str(new))
    assert "opset 18" in DeepSparseRunner(python=sys.executable).refusal(
        bench_core.load_model(new))


def test_worker_imports_nothing_from_fcpts_onnx():
    tree = ast.parse(WORKER.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("fcpts_onnx")
        if isinstance(node, ast.Import):
            assert not any(a.name.startswith("fcpts_onnx") for a in node.names)


def test_real_worker_without_deepsparse_replies_in_json(tmp_path):
    """The shipped worker, run by an interpreter without deepsparse, still answers by the protocol."""
    with pytest.raises(WorkerError, match=r"deepsparse worker: ModuleNotFoundError: No module named 'deepsparse'"):
        call_worker([sys.executable, str(WORKER)], {"model": "m.onnx", "batch_size": 1,
                                                    "inputs": {"generate": []}}, timeout=60)


def _real_deepsparse() -> Path | None:
    python = ROOT / DEFAULT_VENV / "bin" / "python"
    return python if python.exists() else None


@pytest.mark.skipif(_real_deepsparse() is None, reason="DeepSparse venv not set up (bash tools/setup_deepsparse.sh)")
def test_real_deepsparse_runs_and_matches_onnxruntime(pair, tmp_path):
    dense, sparse = pair
    stored = tmp_path / "stored.onnx"
    sparsify(dense, stored, sparsity=0.9, method="global", report_path=False, store="sparse")
    before = {p: p.read_bytes() for p in (dense, sparse, stored)}
    result = benchmark([dense, sparse, stored], batch_sizes=[2, 3], threads=1, budget=FAST,
                       runtimes=["onnxruntime", "deepsparse"], deepsparse_python=_real_deepsparse())
    ds = [c for c in result.cases if c["runtime"] == "deepsparse"]
    assert all(c["status"] == "ok" for c in result.cases), [c["note"] for c in result.cases]
    assert {p: p.read_bytes() for p in before} == before
    assert all(c["max_rel_diff_vs_onnxruntime"] < 1e-4 for c in ds)
    assert all(c["engine"] == "deepsparse 1.8.0" and c["compile_seconds"] > 0 for c in ds)


@pytest.mark.skipif(_real_deepsparse() is None, reason="DeepSparse venv not set up (bash tools/setup_deepsparse.sh)")
def test_real_deepsparse_with_dynamic_dims_leaves_the_file_alone(tmp_path):
    """Dynamic H, W: DeepSparse is told the shapes and rewrites its model file; ours stays as it was."""
    w = np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 1, 1, 1])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, "H", "W"])], [numpy_helper.from_array(w, "W")])
    path = save_model(graph, tmp_path / "dyn.onnx")
    before = path.read_bytes()
    result = benchmark([path], batch_sizes=[1, 4], threads=1, budget=FAST, input_shapes={"x": (1, 3, 10, 12)},
                       runtimes=["onnxruntime", "deepsparse"], deepsparse_python=_real_deepsparse())
    assert all(c["status"] == "ok" for c in result.cases), [c["note"] for c in result.cases]
    assert path.read_bytes() == before
    assert all(c["max_rel_diff_vs_onnxruntime"] < 1e-4 for c in result.cases if c["runtime"] == "deepsparse")


# ---------------------------------------------------------------------------------------------
# --store sparse: sparse_initializer


def _ort_outputs(path: Path, feed: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


@pytest.mark.parametrize("build, feed", [
    (lambda: helper.make_model(matmul_conv_graph(), opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
     {"x": np.random.default_rng(1).standard_normal((5, 3, 6, 6)).astype(np.float32)}),
    (graphs.mixed, {"x": np.random.default_rng(1).standard_normal((2, 3, 6, 6)).astype(np.float32)}),
    (graphs.fp16_model, {"x": np.random.default_rng(1).standard_normal((2, 3, 6, 6)).astype(np.float16)}),
])
def test_sparse_initializer_loads_in_onnxruntime_with_identical_outputs(tmp_path, build, feed):
    source = graphs.save(build(), tmp_path / "in.onnx")
    dense_out, sparse_out = tmp_path / "dense.onnx", tmp_path / "sparse.onnx"
    dense_report = sparsify(source, dense_out, sparsity=0.85, method="global", report_path=False)
    report = sparsify(source, sparse_out, sparsity=0.85, method="global", report_path=False, store="sparse")
    assert report.zero_params == dense_report.zero_params
    written = onnx.load(str(sparse_out))
    onnx.checker.check_model(written)
    onnx.checker.check_model(str(sparse_out))
    found = discover(onnx.load(str(source))).weights
    sparse_names = {s.values.name for s in written.graph.sparse_initializer}
    constants = [n for n in written.graph.node if n.op_type == "Constant"
                 and any(a.name == "sparse_value" for a in n.attribute)]
    dense_model = onnx.load(str(dense_out))
    expected = set()
    for w in found:  # sparse where (value, int64 index) pairs take fewer bytes than the dense tensor
        values = stored_values(dense_model, w)
        if worthwhile(values.size, int(np.count_nonzero(values)), values.dtype.itemsize):
            expected.add(w.name)
    assert expected and sparse_names | {n.output[0] for n in constants} == expected
    assert not sparse_names & {t.name for t in written.graph.initializer}
    for s in written.graph.sparse_initializer:
        indices = numpy_helper.to_array(s.indices)
        assert s.indices.data_type == TensorProto.INT64 and indices.ndim == 1
        assert np.all(np.diff(indices) > 0)  # ascending, no duplicates: the spec's linearized form
        assert numpy_helper.to_array(s.values).ndim == 1 and np.all(numpy_helper.to_array(s.values) != 0)
    # onnxruntime loads it and computes exactly what the dense-stored file computes
    for a, b in zip(_ort_outputs(dense_out, feed), _ort_outputs(sparse_out, feed)):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    # zeros counted in the file, through the sparse form, are exact and the values are the dense file's
    counts = count_zeros_in_file(sparse_out, found)
    assert sum(z for z, _ in counts.values()) == report.zero_params
    for w in found:
        assert np.array_equal(stored_values(written, w), stored_values(dense_model, w))
    assert {p.key: p.value for p in written.metadata_props}["fcpts_onnx.store"] == "sparse"
    assert any("--store sparse:" in n for n in report.notes)
    assert sparse_out.stat().st_size < dense_out.stat().st_size


def test_sparse_storage_only_where_worthwhile_and_round_trips():
    rng = np.random.default_rng(0)
    w_half = rng.standard_normal((16, 16)).astype(np.float32)
    w_half[:, ::2] = 0  # 50% zeros: 8 + 4 bytes per non-zero is more than 4 per element
    w_sparse = rng.standard_normal((16, 16)).astype(np.float32)
    w_sparse[:, 1:] = 0
    nodes = [helper.make_node("MatMul", ["x", "A"], ["h"], name="a"), helper.make_node("MatMul", ["h", "B"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])],
                              [numpy_helper.from_array(w_half, "A"), numpy_helper.from_array(w_sparse, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    weights = discover(model).weights
    summary = to_sparse_storage(model, weights)
    assert summary.converted == ["B"] and summary.kept_dense == ["A"]
    assert summary.dense_bytes == 1024 and summary.sparse_bytes == 16 * 12
    assert np.array_equal(sparse_to_dense(model.graph.sparse_initializer[0]), w_sparse)
    back = densify(model)
    assert not back.graph.sparse_initializer
    assert np.array_equal(numpy_helper.to_array([t for t in back.graph.initializer if t.name == "B"][0]), w_sparse)
    # COO ([NNZ, rank]) indices are read too
    coo = helper.make_sparse_tensor(numpy_helper.from_array(np.array([5.0, 7.0], np.float32), "C"),
                                    numpy_helper.from_array(np.array([[0, 1], [2, 0]], np.int64), ""), [3, 2])
    assert np.array_equal(sparse_to_dense(coo), np.array([[0, 5], [0, 0], [7, 0]], np.float32))


def test_optimize_store_sparse_end_to_end(tiny_model, tmp_path, capfd):
    out = tmp_path / "out.onnx"
    code = main(["optimize", str(tiny_model), "--sparsity", "0.9", "--method", "global", "--store", "sparse",
                 "-o", str(out)])
    stdout, stderr = capfd.readouterr()
    assert code == 0, stderr
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert report["options"]["store"] == "sparse"
    assert report["zero_params"] == round(0.9 * 428)
    assert any(n.startswith("--store sparse: 2 of 2 pruned weights") for n in report["notes"])
    assert "--store sparse: 2 of 2" in stdout
    written = onnx.load(str(out))
    assert {s.values.name for s in written.graph.sparse_initializer} == {"W1", "W2"}
    assert not written.graph.initializer
    # inspect / bench read it back (both densify in memory)
    from fcpts_onnx import inspect_model

    info = inspect_model(out)
    assert info["prunable_zeros"] == report["zero_params"] and info["metadata"]["fcpts_onnx.store"] == "sparse"
    result = benchmark([tiny_model, out], batch_sizes=[1], runtimes=["onnxruntime"], budget=FAST)
    assert result.models[1]["storage"] == "sparse_initializer"
    assert result.models[1]["macs"]["zero_params"] == report["zero_params"]
    assert result.models[1]["sizes"]["file_bytes"] == out.stat().st_size


def test_a_sparse_stored_file_is_re_optimized_as_its_dense_tensors(tiny_model, tmp_path):
    """Re-optimizing a --store sparse output (to a higher target, with learning) reads its sparse
    initializers as the dense tensors they stand for: its zeros stay zeros, the input file is
    untouched, and the new file says how it is stored."""
    stored = tmp_path / "stored.onnx"
    sparsify(tiny_model, stored, sparsity=0.9, method="global", report_path=False, store="sparse")
    assert onnx.load(str(stored)).graph.sparse_initializer
    before = stored.read_bytes()
    feed = {"x": np.random.default_rng(2).standard_normal((24, 3, 6, 6)).astype(np.float32)}
    again = tmp_path / "again.onnx"
    report = sparsify(stored, again, feed, sparsity=0.95, method="fcpts", report_path=False,
                      learn=LearnOptions(iters=3))
    assert stored.read_bytes() == before
    written = onnx.load(str(again))
    assert not written.graph.sparse_initializer
    assert report.zero_params == round(0.95 * 428)
    assert sum(layer.zeros_before for layer in report.layers) == round(0.9 * 428)
    old = {w.name: stored_values(onnx.load(str(stored)), w) for w in discover(onnx.load(str(tiny_model))).weights}
    new = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    assert all(np.all(new[name][values == 0] == 0) for name, values in old.items())
    assert {p.key: p.value for p in written.metadata_props}["fcpts_onnx.store"] == "dense"


def test_store_option_is_validated(tiny_model, tmp_path, capfd):
    with pytest.raises(Exception, match="--store must be one of dense, sparse"):
        sparsify(tiny_model, tmp_path / "o.onnx", sparsity=0.5, method="global", store="coo")
    with pytest.raises(SystemExit) as info:
        main(["optimize", str(tiny_model), "--store", "coo"])
    assert info.value.code == 2
    assert "invalid choice" in capfd.readouterr().err


# ---------------------------------------------------------------------------------------------
# optimize --bench


def test_optimize_bench_adds_a_bench_section(tiny_model, tmp_path, capfd, monkeypatch):
    monkeypatch.setattr(bench_core, "OPTIMIZE_BUDGET", Budget(warmup=0, iterations=2, seconds=None))
    out = tmp_path / "out.onnx"
    code = main(["optimize", str(tiny_model), "--sparsity", "0.8", "--method", "global", "--bench", "-o", str(out)])
    stdout, stderr = capfd.readouterr()
    assert code == 0, stderr
    report = json.loads((tmp_path / "out.report.json").read_text())
    bench = report["bench"]
    assert [m["path"] for m in bench["models"]] == [str(tiny_model), str(out)]
    ort_cases = [c for c in bench["cases"] if c["runtime"] == "onnxruntime"]
    assert sorted(c["batch_size"] for c in ort_cases) == [1, 1, 16, 16]
    assert all(c["status"] == "ok" and c["iterations"] == 2 for c in ort_cases)
    assert bench["models"][1]["macs"]["sparsity"] == pytest.approx(0.8, abs=2e-3)
    # the table carries the bench too, with the plain onnxruntime note and the DeepSparse setup line
    assert "latency per batch" in stdout and "about 1.0x" in stdout and "setup_deepsparse.sh" in stdout
    # --json prints the same report with the bench key
    code = main(["optimize", str(tiny_model), "--sparsity", "0.8", "--method", "global", "--bench",
                 "-o", str(tmp_path / "o2.onnx"), "--json"])
    stdout, _ = capfd.readouterr()
    assert code == 0 and "bench" in json.loads(stdout)


def test_optimize_bench_uses_the_shape_given(tmp_path, capfd, monkeypatch):
    monkeypatch.setattr(bench_core, "OPTIMIZE_BUDGET", Budget(warmup=0, iterations=1, seconds=None))
    graph = matmul_conv_graph()
    dims = graph.input[0].type.tensor_type.shape.dim
    dims[2].Clear()
    dims[2].dim_param = "H"
    dims[3].Clear()
    dims[3].dim_param = "W"
    # dynamic H, W: optimize verifies on generated inputs with --shape; bench gets the same shape
    model = save_model(graph, tmp_path / "dyn.onnx")
    code = main(["optimize", str(model), "--sparsity", "0.5", "--method", "global", "--bench", "--shape",
                 "x=2,3,6,6", "-o", str(tmp_path / "o.onnx"), "-q"])
    assert code == 0
    report = json.loads((tmp_path / "o.report.json").read_text())
    assert report["bench"]["cases"] and report["bench"]["inputs"]["source"] == "generated"


def test_worker_file_is_in_the_package():
    assert WORKER.exists() and WORKER.parent.name == "bench"
    assert os.access(WORKER, os.R_OK)
