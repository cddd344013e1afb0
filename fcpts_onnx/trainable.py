"""Building the trainable form of a loaded model and proving it exact before use."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .calibration import CalibrationSet, static_batch
from .discovery import Discovery
from .errors import OptionError, UnsupportedModelError
from .onnx_io import LoadedModel

PARITY_SAMPLES = 8  # a batch is enough to catch a wrong op; the whole set would cost time


@dataclass
class Trainable:
    """The module, the device it lives on, and the parity check that cleared it."""

    module: object  # torchform.OnnxModule (typed loosely so torch stays an optional import)
    device: str
    parity: object  # torchform.parity.ParityResult


def resolve_device(device: str) -> str:
    import torch

    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise OptionError(f"--device {device!r} is not understood; use cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    return device


@contextmanager
def full_float32() -> Iterator[None]:
    """Float32 matmuls and convolutions at full precision inside, the caller's settings after.

    On a GPU with tensor cores torch may compute float32 convolutions (cuDNN's default) and,
    where the caller allowed it, matmuls in TF32, which keeps 10 mantissa bits: about 1e-3
    relative error, ten times the parity tolerance, and not what onnxruntime's float32
    kernels compute. The parity check and the learner both run inside this.
    """
    import torch

    b = torch.backends
    if hasattr(b.cuda.matmul, "fp32_precision"):  # torch >= 2.9; mixing in allow_tf32 is refused there
        targets = [b.cuda.matmul, b.cudnn.conv, b.cudnn.rnn]
        saved = [t.fp32_precision for t in targets]
        try:
            for t in targets:
                t.fp32_precision = "ieee"
            yield
        finally:
            for t, value in zip(targets, saved):
                t.fp32_precision = value
    else:
        saved = (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32)
        try:
            b.cuda.matmul.allow_tf32 = b.cudnn.allow_tf32 = False
            yield
        finally:
            b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = saved


@contextmanager
def deterministic_cudnn() -> Iterator[None]:
    """cuDNN picks deterministic convolution algorithms inside (a seed repeats a run on a GPU
    as on the CPU); the caller's setting after. No effect on the CPU."""
    import torch

    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def convert_and_check(loaded: LoadedModel, found: Discovery, calibration: CalibrationSet, *,
                      device: str = "cpu", parity_samples: int = PARITY_SAMPLES) -> Trainable:
    """Convert, move to ``device``, and check parity on a calibration batch (not raising on failure)."""
    try:
        from .torchform import OnnxModule
        from .torchform.parity import check_parity
    except ImportError as exc:  # torch missing
        raise UnsupportedModelError(
            f"the trainable form needs PyTorch ({exc}); install it with: pip install torch==2.13.0"
        ) from None
    from .torchform.module import NodeExecutionError

    device = resolve_device(device)
    module = OnnxModule(loaded.model, prunable=found.weights).to(device)
    module.eval()
    # a graph exported with a fixed batch runs only at that batch
    batch = calibration.take(slice(0, static_batch(loaded.model, calibration.layout) or parity_samples)).feed()
    module.set_batch_layout(calibration.layout, calibration.settings)
    try:
        with full_float32():
            parity = check_parity(loaded.model, module, batch, device=device)
    except NodeExecutionError as exc:
        raise UnsupportedModelError(
            f"the trainable form cannot run this model: {exc}; use a data-free method without "
            "reconstruction, and report the model"
        ) from None
    return Trainable(module, device, parity)


def build_trainable(loaded: LoadedModel, found: Discovery, calibration: CalibrationSet, *,
                    device: str = "cpu", parity_samples: int = PARITY_SAMPLES) -> Trainable:
    """The trainable form, refused with the first divergent node unless it matches onnxruntime."""
    trainable = convert_and_check(loaded, found, calibration, device=device, parity_samples=parity_samples)
    parity = trainable.parity
    if not parity.passed:
        raise UnsupportedModelError(
            f"the trainable form does not reproduce onnxruntime: {parity.summary()}{divergence_text(parity)}; "
            "use a data-free method without reconstruction, and report the model"
        )
    return trainable


def divergence_text(parity) -> str:
    d = parity.first_divergence
    if not d:
        return ""
    return (f"; first divergent node {d['node']!r} ({d['op_type']}, output {d['output']!r}, "
            f"relative diff {d['relative_diff']:.2e})")


def parameter_table(module) -> list[dict]:
    """The trainable parameters and the ONNX tensors they write back to."""
    rows = []
    for key, source in module.sources.items():
        p = module.parameter(key)
        rows.append({"name": source.name, "role": source.role, "shape": list(p.shape),
                     "stored_dtype": source.dtype, "storage": source.storage, "params": int(p.numel())})
    return rows
