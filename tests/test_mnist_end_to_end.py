"""End to end on the bundled real model: the MNIST CNN of digit-recognizer-py.

Labelled accuracy on the 4488-image evaluation split (never used for calibration) is the
ground truth here; onnxruntime runs every model.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from fcpts_onnx import inspect_model, sparsify
from fcpts_onnx.learner.options import DEFAULT_TIME_BUDGET

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "models" / "mnist_cnn"


def _evaluate():
    spec = importlib.util.spec_from_file_location("mnist_eval", ROOT / "tools" / "mnist_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.evaluate


evaluate = _evaluate()


@pytest.fixture(scope="module")
def dense_accuracy() -> float:
    return evaluate(BUNDLE / "mnist_cnn.onnx")


def test_bundled_model_is_the_real_pretrained_cnn(dense_accuracy):
    info = inspect_model(BUNDLE / "mnist_cnn.onnx")
    assert [layer["op_type"] for layer in info["layers"]] == ["Conv", "Conv", "Conv", "Gemm", "Gemm"]
    assert info["prunable_params"] == 389_920
    assert info["global_sparsity"] == 0.0
    assert dense_accuracy > 0.995  # a pretrained network, not random weights


@pytest.fixture(scope="module")
def sparse_models(tmp_path_factory):
    """Every data-free allocator at 50% and 80%, written once for the tests below."""
    out_dir = tmp_path_factory.mktemp("mnist")
    results = {}
    for method in ("uniform", "global", "erk", "lamp"):
        for s in (0.5, 0.8):
            out = out_dir / f"{method}_{s}.onnx"
            report = sparsify(BUNDLE / "mnist_cnn.onnx", out, BUNDLE / "calib.npz", sparsity=s, method=method,
                              report_path=False)
            results[method, s] = (out, report, evaluate(out))
    return results


def test_every_allocator_hits_the_target_exactly_in_the_file(sparse_models):
    for (method, s), (out, report, _) in sparse_models.items():
        model = onnx.load(out)
        zeros = sum(int(np.count_nonzero(onnx.numpy_helper.to_array(t) == 0))
                    for t in model.graph.initializer if t.name.endswith("weight"))
        assert zeros == int(np.floor(s * 389_920 + 0.5)), (method, s)
        assert report.zero_params == zeros
        meta = {p.key: p.value for p in model.metadata_props}
        assert meta["fcpts_onnx.method"] == method
        assert float(meta["fcpts_onnx.target_sparsity"]) == s


def test_accuracy_follows_the_known_ranking(sparse_models, dense_accuracy):
    acc = {key: value[2] for key, value in sparse_models.items()}
    # 50% costs a well-trained CNN almost nothing, whatever the allocation.
    for method in ("uniform", "global", "erk", "lamp"):
        assert acc[method, 0.5] > dense_accuracy - 0.01, method
    # At 80%, pruning the 288-weight first conv as hard as the rest (uniform) hurts badly;
    # layer-adaptive allocations keep the accuracy.
    assert acc["lamp", 0.8] > 0.98
    assert acc["global", 0.8] > 0.95
    assert acc["uniform", 0.8] < acc["global", 0.8] - 0.1


def test_report_fidelity_matches_an_independent_measurement(sparse_models):
    out, report, _ = sparse_models["global", 0.8]
    import onnxruntime as ort

    calib = np.load(BUNDLE / "calib.npz")["input"]
    dense = ort.InferenceSession(str(BUNDLE / "mnist_cnn.onnx")).run(None, {"input": calib})[0]
    sparse = ort.InferenceSession(str(out)).run(None, {"input": calib})[0]
    agreement = float(np.mean(dense.argmax(1) == sparse.argmax(1)))
    (logits,) = report.fidelity
    assert logits["top1_agreement"] == pytest.approx(agreement)
    assert logits["nmse"] == pytest.approx(float(((sparse - dense) ** 2).sum() / (dense**2).sum()), rel=1e-6)
    assert report.calibration["n_samples"] == 512


def test_readme_first_command_runs(tmp_path):
    """The README's first command, minus the install, on a copy of the bundle."""
    readme = (ROOT / "README.md").read_text()
    command = next(line for line in readme.splitlines()
                   if line.startswith("pip install") and "&& fcpts-onnx optimize" in line)
    optimize = command.split("&& ", 1)[1]
    shutil.copytree(BUNDLE, tmp_path / "models" / "mnist_cnn")
    args = optimize.split()[1:]
    # Alone it takes under a minute; on a loaded machine the run sizes itself to its time
    # budget (DEFAULT_TIME_BUDGET, 300 steps at most), so the limit sits above that budget:
    # with two benchmarks beside it the run passed 300 s once.
    result = subprocess.run([sys.executable, "-m", "fcpts_onnx", *args], cwd=tmp_path, capture_output=True,
                            text=True, timeout=DEFAULT_TIME_BUDGET + 180)
    assert result.returncode == 0, result.stderr
    assert "global sparsity: 90.0000%" in result.stdout
    out = tmp_path / "models" / "mnist_cnn" / "mnist_cnn.sparse.onnx"
    report = json.loads(out.with_name("mnist_cnn.sparse.report.json").read_text())
    assert report["achieved_sparsity"] == pytest.approx(0.9, abs=1 / 389_920)
    assert report["method"] == "fcpts" and report["learning"]["parity"]["passed"]
    assert (tmp_path / "models" / "mnist_cnn" / "mnist_cnn.sparse.allocation.png").stat().st_size > 10_000
    import hashlib

    copied_input = tmp_path / "models" / "mnist_cnn" / "mnist_cnn.onnx"
    assert report["input_sha256"] == hashlib.sha256(copied_input.read_bytes()).hexdigest()
    assert report["output_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert evaluate(out) > 0.98


def test_fcpts_beats_uniform_by_a_clear_margin_at_80_percent(tmp_path):
    """The learned allocation, even short and without reconstruction, is far above uniform's 59%."""
    from fcpts_onnx.learner.options import LearnOptions

    out = tmp_path / "fcpts.onnx"
    report = sparsify(BUNDLE / "mnist_cnn.onnx", out, BUNDLE / "calib.npz", sparsity=0.8, method="fcpts",
                      reconstruct=False, learn=LearnOptions(iters=40, seed=0), report_path=False)
    uniform_out = tmp_path / "uniform.onnx"
    sparsify(BUNDLE / "mnist_cnn.onnx", uniform_out, BUNDLE / "calib.npz", sparsity=0.8, method="uniform",
             report_path=False)
    fcpts_acc, uniform_acc = evaluate(out), evaluate(uniform_out)
    assert report.zero_params == int(np.floor(0.8 * 389_920 + 0.5))
    assert fcpts_acc > uniform_acc + 0.2, (fcpts_acc, uniform_acc)
    learning = report.learning
    assert learning["holdout_samples"] == 51 and learning["train_samples"] == 461
    assert learning["parity"]["passed"]
    # the allocation moved away from its ERK start, and the report shows both
    assert learning["final_sparsity"] != learning["initial_sparsity"]
    assert report.calibration["held_out_samples"] == 51  # fidelity only on samples never learned on
    # an allocation-only run ends with pair exchanges on the learning split's exact loss
    refined = learning["refinement"]
    # Whether the sweeps converge before their deadline depends on the machine's load (a CI run
    # beside two benchmarks stopped at 175 evaluations), so only that they ran is asserted.
    assert refined["evaluations"] > 0
    assert refined["train_loss"]["after"] <= refined["train_loss"]["before"]


def test_the_allocation_ceiling_tool_scores_an_allocation_as_the_written_model_does(sparse_models):
    """tools/mnist_allocation_ceiling.py feeds masked weights to one session instead of writing
    a model per candidate; at LAMP's counts it must give the outputs of the file sparsify wrote."""
    import onnxruntime as ort

    sys.path.insert(0, str(ROOT / "tools"))
    try:
        spec = importlib.util.spec_from_file_location("mnist_allocation_ceiling",
                                                      ROOT / "tools" / "mnist_allocation_ceiling.py")
        ceiling = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ceiling)
        from fcpts_onnx.masks import zero_smallest

        model, names, originals, _, lamp = ceiling.mnist_allocation(0.8)
        fed = ceiling.WeightsAsInputs(model, names)
        x = np.load(BUNDLE / "calib.npz")["input"][:64]
        got = fed.logp({n: zero_smallest(originals[n], int(k)) for n, k in zip(names, lamp)}, x)
        written = ort.InferenceSession(str(sparse_models["lamp", 0.8][0]), providers=["CPUExecutionProvider"])
        z = written.run(None, {"input": x})[0].astype(np.float64)
        want = z - z.max(1, keepdims=True)
        want -= np.log(np.exp(want).sum(1, keepdims=True))
        np.testing.assert_allclose(got, want, atol=1e-5)
        dense = fed.logp(originals, x)
        assert ceiling.per_image_kl(dense, got).mean() > 1e-4  # the pruned weights were fed, not the originals
    finally:
        sys.path.remove(str(ROOT / "tools"))
