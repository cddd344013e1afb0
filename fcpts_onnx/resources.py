"""Memory: how much there is, how much a model's declared shapes would take, sizes as text.

Checked before anything large is allocated, so an absurd model or a too-large batch is a
one-line error rather than the kernel's OOM killer (which leaves no message at all).
"""

from __future__ import annotations

import os
import re

import numpy as np
import onnx

from .errors import OptionError, UnsupportedModelError

_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20, "MIB": 2**20,
          "G": 2**30, "GB": 2**30, "GIB": 2**30, "T": 2**40, "TB": 2**40, "TIB": 2**40}


def parse_memory(text: str | int | float) -> int:
    """'8G', '512MiB', '1.5GB' or a number of bytes -> bytes (binary units: G = 2**30)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
        if not match or match.group(2).upper() not in _UNITS:
            raise OptionError(f"--max-memory {text!r}: give a size such as 8G, 512M or 2.5GiB")
        value, unit = float(match.group(1)), match.group(2).upper()
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise OptionError(f"--max-memory {text!r}: must be more than 0 bytes")
    return size


def format_bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def _proc_kib(path: str, field: str) -> int | None:
    """A ``Field:  N kB`` line of a /proc file, in bytes; None where there is none (not Linux)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def resident_bytes() -> int | None:
    """This process's resident memory, None where unknown."""
    return _proc_kib("/proc/self/status", "VmRSS")


def available_memory(device: str = "cpu") -> int:
    """Bytes that can be allocated now: MemAvailable (Linux), else physical memory; the
    device's free memory for CUDA."""
    if str(device).startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    available = _proc_kib("/proc/meminfo", "MemAvailable")
    if available is not None:
        return available
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2**63 - 1  # unknown: do not refuse on a guess


def default_memory_limit(device: str = "cpu") -> int:
    """What the tool allows itself without --max-memory: 80% of what is available now."""
    return int(0.8 * available_memory(device))


def _itemsize(elem_type: int) -> int:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return 4


def _static_elements(value: onnx.ValueInfoProto, batch: int) -> int | None:
    """Elements of a value at ``batch`` (first dim, when dynamic) with its other dims static; None if unknown."""
    if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
        return None
    count = 1
    for i, dim in enumerate(value.type.tensor_type.shape.dim):
        if dim.HasField("dim_value") and dim.dim_value >= 0:
            count *= dim.dim_value
        elif i == 0:
            count *= batch
        else:
            return None
    return count


def largest_declared_value(model: onnx.ModelProto, batch: int) -> tuple[str, int] | None:
    """(name, bytes) of the largest graph input, output or intermediate whose size the
    declared shapes fix (shape inference, first dim taken as ``batch`` when dynamic)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        values = list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output)
    except Exception:  # inference is best effort; the declared inputs and outputs still count
        values = list(model.graph.input) + list(model.graph.output)
    best = None
    for value in values:
        n = _static_elements(value, batch)
        if n is None:
            continue
        size = n * _itemsize(value.type.tensor_type.elem_type)
        if best is None or size > best[1]:
            best = (value.name, size)
    return best


def check_declared_shapes(model: onnx.ModelProto, batch: int, limit: int, path, *, batch_fixed: bool) -> None:
    """Refuse a model one of whose values alone would not fit in ``limit`` bytes at ``batch``."""
    largest = largest_declared_value(model, batch)
    if largest is not None and largest[1] > limit:
        name, size = largest
        lower = "" if batch_fixed else " lower --batch-size,"
        raise UnsupportedModelError(
            f"{path}: tensor {name!r} would take {format_bytes(size)} at batch {batch}, more than the "
            f"{format_bytes(limit)} allowed; check the model's declared shapes (or pin dynamic ones with "
            f"--shape),{lower} or raise --max-memory"
        )
