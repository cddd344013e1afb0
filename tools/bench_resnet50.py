"""What sparsity buys on real runtimes: ResNet-50 dense vs 80% and 90% sparse, onnxruntime vs DeepSparse.

    python tools/bench_resnet50.py [--workdir /tmp/fcpts-resnet50] [--threads 2] [--time 10]
                                   [--batch 1,16] [--sparsities 0.8,0.9] [--runtime onnxruntime,deepsparse]

1. Builds the standard ResNet-50 (tools/zoo.py ``resnet50()``, plain torch, seeded random
   weights: the timing does not depend on the values, only on which are zero) and exports it with
   ``torch.onnx.export(..., dynamo=False, opset_version=17)``, batch axis dynamic.
2. Sparsifies it data-free: ``fcpts-onnx optimize --method global --sparsity S`` for each S.
3. Runs ``fcpts-onnx bench`` on dense + sparse models (batch 1 and 16, 2 threads) and prints the
   markdown tables of the README; JSON and PNG go to the work folder.

Models already in the work folder are reused (delete it to rebuild). DeepSparse comes from
``bash tools/setup_deepsparse.sh``; without it the onnxruntime rows are still measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def export_resnet50(path: Path) -> None:
    import torch

    spec = importlib.util.spec_from_file_location("zoo", ROOT / "tools" / "zoo.py")
    zoo = importlib.util.module_from_spec(spec)
    sys.modules["zoo"] = zoo  # dataclasses look their module up there
    spec.loader.exec_module(zoo)
    model = zoo.resnet50().eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    tmp = path.with_name(path.name + ".tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(model, (x,), str(tmp), dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fcpts-resnet50"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--time", type=float, default=10.0, help="seconds per case (default 10)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", default="1,16")
    parser.add_argument("--sparsities", default="0.8,0.9")
    parser.add_argument("--runtime", default="onnxruntime,deepsparse")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    dense = args.workdir / "resnet50.onnx"
    if not dense.exists():
        print(f"exporting ResNet-50 to {dense}", file=sys.stderr, flush=True)
        export_resnet50(dense)
    models = [dense]
    for s in (float(v) for v in args.sparsities.split(",")):
        out = args.workdir / f"resnet50.global{round(s * 100)}.onnx"
        if not out.exists():
            print(f"sparsifying to {s:.0%}: {out}", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, "-m", "fcpts_onnx", "optimize", str(dense), "--method", "global",
                            "--sparsity", str(s), "-o", str(out), "--no-report", "-q"], check=True)
        models.append(out)
    json_path = args.workdir / "bench.json"
    png_path = args.workdir / "bench.png"
    command = [sys.executable, "-m", "fcpts_onnx", "bench", *map(str, models), "--batch", args.batch,
               "--runtime", args.runtime, "--threads", str(args.threads), "--time", str(args.time),
               "--warmup", str(args.warmup), "--json", str(json_path), "--plot", str(png_path), "--markdown"]
    print("+ fcpts-onnx " + " ".join(command[3:]), file=sys.stderr, flush=True)
    done = subprocess.run(command)
    if json_path.exists():
        data = json.loads(json_path.read_text())
        compile_s = [c.get("compile_seconds") for c in data["cases"] if c.get("compile_seconds") is not None]
        if compile_s:
            print(f"\n(DeepSparse compile time per case: {min(compile_s):.1f} to {max(compile_s):.1f} s, "
                  "not included in the latencies)")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
