"""Speed and memory of the trainable form against the native torch module it was exported from.

    python tools/bench_torchform.py [--batch 32] [--size 224] [--threads 2] [--repeats 3] [--json OUT]

ResNet-50 (plain torch definition in tools/zoo.py, random weights), exported with the legacy
exporter at opset 17. Measures, on this machine:
- conversion (load + discovery + OnnxModule) and the parity check on a batch of 8, in seconds;
- forward+backward time per batch, executor vs native, interleaved in one process, medians;
- peak memory of one forward+backward, each in its own subprocess: growth of the peak RSS
  (VmHWM, reset just before the step) over the RSS with weights and inputs allocated.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))


def _export(path: Path, size: int) -> None:
    import torch
    import zoo

    model = zoo.resnet50()
    zoo.export(model, (torch.randn(1, 3, size, size),), path, dynamo=False, opset=17,
               dynamic_axes={"input_0": {0: "batch"}})


def _native(size: int):
    import zoo

    return zoo.resnet50()


def _executor(path: Path):
    import onnx

    from fcpts_onnx.discovery import discover
    from fcpts_onnx.torchform import OnnxModule

    model = onnx.load(str(path))
    return OnnxModule(model, prunable=discover(model).weights), model


def _step(module, x, executor: bool) -> float:
    start = time.perf_counter()
    out = module(x)[0] if executor else module(x)
    out.float().pow(2).mean().backward()
    module.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def _memory_child(kind: str, path: str, batch: int, size: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    module = _executor(Path(path))[0] if kind == "executor" else _native(size)
    module.train(False)
    for p in module.parameters():
        p.requires_grad_(True)
    x = torch.randn(batch, 3, size, size)
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
    _step(module, x, kind == "executor")
    peak = _status_kib("VmHWM")
    print(json.dumps({"kind": kind, "growth_mib": (peak - before) / 1024}))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--memory-child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        _memory_child(args.memory_child[0], args.memory_child[1], args.batch, args.size, args.threads)
        return 0

    import numpy as np
    import torch

    from fcpts_onnx.torchform.parity import check_parity

    torch.set_num_threads(args.threads)
    results: dict = {"model": "resnet50 (tools/zoo.py), legacy exporter, opset 17", "batch": args.batch,
                     "size": args.size, "threads": args.threads}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "resnet50.onnx"
        _export(path, args.size)
        start = time.perf_counter()
        executor, proto = _executor(path)
        results["conversion_s"] = time.perf_counter() - start
        dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
        parity_batch = dim0.dim_value if dim0.HasField("dim_value") else 8
        shape = (parity_batch, 3, args.size, args.size)
        feeds = {proto.graph.input[0].name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
        results["parity_batch"] = parity_batch
        start = time.perf_counter()
        parity = check_parity(proto, executor, feeds)
        results["parity_s"] = time.perf_counter() - start
        results["parity_relative_diff"] = max(o.relative_diff for o in parity.outputs)
        results["conversion_plus_parity_s"] = results["conversion_s"] + results["parity_s"]

        native = _native(args.size)
        for m in (native, executor):
            m.train(False)
            for p in m.parameters():
                p.requires_grad_(True)
        x = torch.randn(args.batch, 3, args.size, args.size)
        _step(native, x, False)  # warm-up both
        _step(executor, x, True)
        native_t, exec_t = [], []
        for _ in range(args.repeats):
            native_t.append(_step(native, x, False))
            exec_t.append(_step(executor, x, True))
        results["native_fwd_bwd_s"] = statistics.median(native_t)
        results["executor_fwd_bwd_s"] = statistics.median(exec_t)
        results["time_ratio"] = results["executor_fwd_bwd_s"] / results["native_fwd_bwd_s"]
        del native, executor

        growth = {}
        for kind in ("native", "executor"):
            out = subprocess.run([sys.executable, __file__, "--memory-child", kind, str(path), "--batch",
                                  str(args.batch), "--size", str(args.size), "--threads", str(args.threads)],
                                 capture_output=True, text=True, check=True)
            growth[kind] = json.loads(out.stdout.strip().splitlines()[-1])["growth_mib"]
        results["native_peak_growth_mib"] = growth["native"]
        results["executor_peak_growth_mib"] = growth["executor"]
        results["memory_ratio"] = growth["executor"] / growth["native"]

    for key, value in results.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
