"""Ctrl-C during learning stops cleanly: exit 130, one line, no output file, input untouched."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "models" / "mnist_cnn"


def test_ctrl_c_during_learning_leaves_nothing(tmp_path):
    model = tmp_path / "m.onnx"
    shutil.copy(BUNDLE / "mnist_cnn.onnx", model)
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fcpts_onnx", "optimize", str(model), "--calib", str(BUNDLE / "calib.npz"),
         "--iters", "100000", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    # wait until learning has started: the parity check and teacher pass take a few seconds
    time.sleep(12)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines() == ["fcpts-onnx: interrupted; no output was written"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert hashlib.sha256(model.read_bytes()).hexdigest() == digest
