"""``--plot PNG``: speedup over onnxruntime dense per batch size, one bar per model and runtime."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import OptionError
from ..plots import save_figure


def plot_speedups(data: dict, path: str | os.PathLike) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise OptionError("--plot needs matplotlib: pip install matplotlib") from None
    import numpy as np

    path = Path(path)
    batches = data["options"]["batch_sizes"]
    key = "speedup_vs_onnxruntime_dense"
    if not any(c.get(key) is not None for c in data["cases"]):
        key = "speedup_vs_dense"
    series: list[tuple[str, list[float]]] = []
    for m in data["models"]:
        for r in data["runtimes"]:
            if not r["available"]:
                continue
            values = []
            for b in batches:
                hit = [c for c in data["cases"] if c["model"] == m["label"] and c["runtime"] == r["name"]
                       and c["batch_size"] == b and c["status"] == "ok"]
                values.append(hit[0].get(key) or 0.0 if hit else 0.0)
            if any(values):
                series.append((f"{m['label']} ({m['macs']['sparsity']:.0%}) on {r['name']}", values))
    x = np.arange(len(batches))
    width = 0.8 / max(1, len(series))
    rows = (len(series) + 1) // 2
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 + 0.45 * len(series) * len(batches)), 4.2 + 0.22 * rows), dpi=110)
    cmap = plt.get_cmap("tab20")
    for i, (label, values) in enumerate(series):
        offset = (i - (len(series) - 1) / 2) * width
        bars = ax.bar(x + offset, values, width, label=label, color=cmap(i % 20))
        ax.bar_label(bars, labels=[f"{v:.2f}x" if v else "" for v in values], fontsize=7, padding=2)
    ax.axhline(1.0, color="k", linestyle="--", linewidth=1)
    ax.set_xticks(x)
    ax.set_xticklabels([f"batch {b}" for b in batches])
    ax.set_ylabel("speedup vs onnxruntime dense" if key.endswith("onnxruntime_dense") else "speedup vs dense")
    threads = data["options"]["threads"]
    ax.set_title(f"{data['machine']['cpu']}, {threads or 'default'} thread(s), median latency", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncols=2, frameon=False)
    ax.set_ylim(0, max([1.2] + [v * 1.15 for _, vs in series for v in vs]))
    fig.tight_layout()
    return save_figure(fig, path)
