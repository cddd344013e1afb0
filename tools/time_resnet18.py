"""Wall time of `fcpts-onnx optimize` with default settings on a ResNet-18 at 224x224, 256 samples.

    python tools/time_resnet18.py [--workdir /tmp/fcpts-resnet18] [--sparsity 0.8] [-- EXTRA OPTIMIZE FLAGS]

The issue's time bar: a ResNet-18-shaped model at 224x224 with 256 calibration samples under
10 minutes on this 2-core CPU, default settings. The model is the standard ResNet-18
(tools/zoo.py ``resnet18()``, plain torch, seeded random weights: step time does not depend
on the values) exported with the legacy exporter at opset 17, batch axis dynamic. The
calibration set is 256 smooth random images (low-frequency noise, unit variance), so the
numbers are timings only, not accuracy.

Prints the command's wall time, the stage times from its JSON report, the learner's steps and
seconds per step, and writes everything to WORKDIR/timing.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))


def export_resnet18(path: Path) -> None:
    import torch
    import zoo

    model = zoo.resnet18().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zoo.export(model, (torch.randn(1, 3, 224, 224),), path, dynamo=False, opset=17,
                   input_names=["input"], dynamic_axes={"input": {0: "batch"}})


def smooth_images(count: int, size: int, seed: int) -> np.ndarray:
    """Low-frequency noise images: upsampled 14x14 noise, normalised per image."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(count, 3, 14, 14, generator=gen)
    images = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    images = (images - images.mean(dim=(1, 2, 3), keepdim=True)) / images.std(dim=(1, 2, 3), keepdim=True)
    return images.numpy().astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fcpts-resnet18"))
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("extra", nargs="*", help="extra optimize flags, after --")
    args = parser.parse_args(argv)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    model = work / "resnet18.onnx"
    calib = work / f"calib{args.samples}.npz"
    if not model.exists():
        export_resnet18(model)
    if not calib.exists():
        np.savez(calib, input=smooth_images(args.samples, 224, seed=0))
    out = work / "resnet18.sparse.onnx"
    report = work / "resnet18.sparse.report.json"
    cmd = [sys.executable, "-m", "fcpts_onnx", "optimize", str(model), "--calib", str(calib),
           "--sparsity", str(args.sparsity), "-o", str(out), "--report", str(report), *args.extra]
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - start
    data = json.loads(report.read_text())
    learning = data.get("learning") or {}
    result = {"wall_s": round(wall, 1), "timings_s": data.get("timings_s"),
              "steps": learning.get("steps"), "step_time_s": learning.get("step_time_s"),
              "learn_s": learning.get("seconds"), "achieved_sparsity": data.get("achieved_sparsity"),
              "command": cmd}
    (work / "timing.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
