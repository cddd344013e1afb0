"""If graphs and streaming inputs (a state batched on axis 1, a scalar setting) learned with
--device cuda, beside the same runs on the CPU: exact counts, parity, held-out loss.

    python tools/gpu_control_flow.py [SILERO.onnx ...]

Uses the test suite's model builders (tests/test_control_flow.py, tests/test_batch_layout.py)
and, where given, silero-vad exports (tools/real_models.py fetches them) on synthetic 16 kHz
chunks. Prints one line per run; exits non-zero if a count is not exact or parity fails.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tools")]

from real_models import _audio_calib  # noqa: E402
from test_batch_layout import streaming_data, streaming_model  # noqa: E402
from test_control_flow import WIDTH, nested_if  # noqa: E402

from fcpts_onnx import sparsify  # noqa: E402
from fcpts_onnx.learner.options import LearnOptions  # noqa: E402


def run(name: str, path: Path, calib, device: str, out: Path) -> bool:
    start = time.perf_counter()
    report = sparsify(path, out, calib, sparsity=0.5, device=device, report_path=False,
                      learn=LearnOptions(iters=30, seed=0))
    learning = report.learning
    ok = report.zero_params == report.required_zeros and learning["parity"]["passed"]
    print(f"{name:28s} {device:5s} zeros {report.zero_params}/{report.total_params} "
          f"(asked {report.required_zeros}) parity {learning['parity']['passed']} "
          f"held-out {learning['holdout_loss']['initial']:.4g} -> {learning['holdout_loss']['best']:.4g} "
          f"untaken {len(learning['weights_in_untaken_branches'])} {time.perf_counter() - start:.1f} s", flush=True)
    return ok


def main(argv: list[str]) -> int:
    devices = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    good = True
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cases = []
        model = nested_if(2, ("constant", "main"), by_shape=True)
        onnx.save(model, work / "nested_if.onnx")
        x = np.random.default_rng(0).standard_normal((256, WIDTH)).astype(np.float32)
        cases.append(("nested If (shape conditions)", work / "nested_if.onnx", {"x": x}))
        model = nested_if(2, ("initializer", "constant"))
        onnx.save(model, work / "nested_if_data.onnx")
        cases.append(("nested If (data conditions)", work / "nested_if_data.onnx", {"x": x}))
        model = streaming_model(state_axis=1, rank=3)
        onnx.save(model, work / "streaming.onnx")
        cases.append(("state on axis 1 + a setting", work / "streaming.onnx", streaming_data(model, 256)))
        for path in map(Path, argv):
            width = 576 if "openvino" in path.name else 512
            rate = None if "openvino" in path.name or "half" in path.name else 16000
            data = work / f"{path.stem}.npz"
            _audio_calib(width, rate, n=128)(data)
            cases.append((path.stem, path, str(data)))
        for name, path, calib in cases:
            for device in devices:
                good &= run(name, path, calib, device, work / f"{path.stem}.{device}.onnx")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
