"""How close the learner's memory plan (--max-memory) comes to the memory a run really takes.

    python tools/bench_memory_plan.py [--workdir /tmp/fcpts-resnet18] [--batches 8,16,64] [--iters 12]

ResNet-18 at 224x224 (the model and 256 samples of tools/time_resnet18.py). For each batch
size, one subprocess runs ``sparsify(..., method="fcpts", iters=N)`` and reports:
- the plan from the report (``learning.memory``: fixed bytes, bytes per sample, estimate);
- the growth of the process's peak RSS (VmHWM) over its RSS when the plan was made (what the
  plan is about: learning), and over its RSS just before the call (the whole run: data
  copies, onnxruntime sessions, model protos too).
The estimate is meant to be an upper bound that is not wildly loose. Measure with the start
trials running (the default 12 steps): with 3 steps there were none, and their memory (one
trial kept for the run to continue, and, before, the previous trial's optimizer moments and
a copy of the unseen samples) was never measured; the peak then went past the plan.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def measure(model: Path, calib: Path, batch: int, iters: int) -> dict:
    import numpy as np

    from fcpts_onnx import sparsify
    from fcpts_onnx.learner.options import LearnOptions

    data = dict(np.load(calib))
    import torch  # noqa: F401  (imported before the baseline so its libraries are not counted)

    base = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    out = Path(model).with_name(f"mem-{batch}.onnx")
    report = sparsify(model, out, data, sparsity=0.8, method="fcpts", report_path=False,
                      learn=LearnOptions(iters=iters, batch_size=batch))
    peak = _status_kib("VmHWM")
    plan = report.learning["memory"]
    return {"batch": plan["batch_size"], "measured_growth_mib": round((peak - base) / 1024),
            "growth_after_plan_mib": round((peak * 1024 - plan["rss_at_plan_bytes"]) / 2**20),
            "estimated_mib": round(plan["estimated_peak_bytes"] / 2**20),
            "fixed_mib": round(plan["fixed_bytes"] / 2**20),
            "per_sample_mib": round(plan["per_sample_bytes"] / 2**20, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fcpts-resnet18"))
    parser.add_argument("--batches", default="8,16,64")
    parser.add_argument("--iters", type=int, default=12,
                        help="learning steps; from 8 the start trials run (2 steps for each of 4 candidates)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child: measure this batch
    args = parser.parse_args(argv)
    model, calib = args.workdir / "resnet18.onnx", args.workdir / "calib256.npz"
    if args.one:
        print(json.dumps(measure(model, calib, args.one, args.iters)))
        return 0
    if not model.exists() or not calib.exists():
        sys.path.insert(0, str(ROOT / "tools"))
        import time_resnet18

        args.workdir.mkdir(parents=True, exist_ok=True)
        time_resnet18.export_resnet18(model)
        import numpy as np

        np.savez(calib, input=time_resnet18.smooth_images(256, 224, seed=0))
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        done = subprocess.run([sys.executable, __file__, "--workdir", str(args.workdir), "--iters", str(args.iters),
                               "--one", str(batch)], check=True, capture_output=True, text=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    print("\n| batch | plan: fixed + per sample | plan estimate | peak growth after the plan | "
          "peak growth over the whole run |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['fixed_mib']} MiB + {r['per_sample_mib']} MiB | {r['estimated_mib']} MiB "
              f"| {r['growth_after_plan_mib']} MiB | {r['measured_growth_mib']} MiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
