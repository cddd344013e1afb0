"""A scikit-learn MLPClassifier exported by skl2onnx (tests/data/skl2onnx, made by
tools/export_sklearn.py: trained on scikit-learn's bundled digits, scikit-learn 1.9.1,
skl2onnx 1.20.0).

skl2onnx adds the class labels as an output (ArgMax, then an ai.onnx.ml ArrayFeatureExtractor
over the classes), stores each layer's bias as [1, N], and by default returns the
probabilities through a ZipMap, which is no tensor.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from fcpts_onnx import sparsify
from fcpts_onnx.cli import main
from fcpts_onnx.learner.options import LearnOptions

DATA = Path(__file__).parent / "data" / "skl2onnx"


def test_a_sklearn_mlp_without_zipmap_is_sparsified_with_its_biases_tuned(tmp_path):
    source = DATA / "mlp_digits_nozipmap.onnx"
    before = hashlib.sha256(source.read_bytes()).hexdigest()
    rng = np.random.default_rng(0)
    # digits are 64 pixels in [0, 1]; blocky random images stand in for them
    calib = {"X": (rng.random((240, 64)) < 0.35).astype(np.float32) * rng.random((240, 64)).astype(np.float32)}
    out = tmp_path / "mlp.sparse.onnx"
    report = sparsify(source, out, calib, sparsity=0.7, method="fcpts", reconstruct=True,
                      learn=LearnOptions(iters=20, seed=0), report_path=False)
    assert hashlib.sha256(source.read_bytes()).hexdigest() == before
    assert report.zero_params == report.required_zeros == round(0.7 * (64 * 64 + 64 * 32 + 32 * 10))
    original = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(source)).graph.initializer}
    written = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer}
    for name in ("intercepts", "intercepts1", "intercepts2"):  # [1, N]: biases, tuned
        assert written[name].shape == original[name].shape
        assert not np.array_equal(written[name], original[name]), name
    assert np.array_equal(written["classes"], original["classes"])
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    labels, probabilities = session.run(["label", "probabilities"], {"X": calib["X"][:8]})
    assert labels.dtype == np.int64 and np.array_equal(labels, probabilities.argmax(1))
    fidelity = {f["name"]: f for f in report.fidelity}
    assert fidelity["label"]["exact_match"] is not None and fidelity["probabilities"]["kl"] is not None


def test_the_default_zipmap_export_is_refused_in_one_line_that_says_how_to_export(tmp_path, capfd):
    source = DATA / "mlp_digits.onnx"
    np.savez(tmp_path / "calib.npz", X=np.zeros((16, 64), np.float32))
    out = tmp_path / "out.onnx"
    code = main(["optimize", str(source), "--calib", str(tmp_path / "calib.npz"), "-o", str(out), "--quiet"])
    err = capfd.readouterr().err
    assert code == 2 and not out.exists()
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "ZipMap" in err and "'zipmap': False" in err
