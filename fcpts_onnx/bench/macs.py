"""Multiply-accumulates per inference (batch 1): all of them, and those on non-zero weights.

Reuses discovery's prunable weights and MAC counts (``assign_macs``); the non-zero MACs of a
layer are its MACs times its weight density, as the optimize report counts them.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx

from ..discovery import Discovery, assign_macs, discover
from ..errors import FcptsError


def find_weights(model: onnx.ModelProto) -> tuple[Discovery | None, str | None]:
    """The prunable weights of ``model`` (densified), or None and why not."""
    try:
        return discover(model), None
    except FcptsError as exc:
        return None, str(exc)


def macs_summary(model: onnx.ModelProto, found: Discovery | None, feed: Mapping[str, np.ndarray],
                 items: int = 1) -> dict:
    """Per-layer and total MACs per item plus weight sparsity. ``feed`` holds ``items`` items per
    input: 1, or a graph's fixed batch (onnxruntime runs such a graph at no other batch, and
    its MACs are counted for the whole batch, then divided)."""
    layers = []
    if found is not None and found.weights:
        assign_macs(model, found.weights, {k: v.shape for k, v in feed.items()}, feed=feed)
        for w in found.weights:
            if w.macs is not None:
                w.macs //= items
            values = w.values(model)
            zeros = int(np.count_nonzero(values.reshape(-1) == 0))
            density = (w.size - zeros) / w.size
            layers.append({
                "name": w.name, "op_type": w.op_type, "shape": list(w.shape), "params": w.size, "zeros": zeros,
                "sparsity": zeros / w.size, "macs": w.macs,
                "nonzero_macs": None if w.macs is None else int(round(w.macs * density)),
            })
    params = sum(r["params"] for r in layers)
    zeros = sum(r["zeros"] for r in layers)
    known = bool(layers) and all(r["macs"] is not None for r in layers)
    return {
        "prunable_params": params,
        "zero_params": zeros,
        "sparsity": zeros / params if params else 0.0,
        "macs": sum(r["macs"] for r in layers) if known else None,
        "nonzero_macs": sum(r["nonzero_macs"] for r in layers) if known else None,
        "layers": layers,
    }
