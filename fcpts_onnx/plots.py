"""Pictures where a picture says more: the per-layer sparsity allocation."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import OptionError, OutputError
from .report import layer_label


def plot_allocation(report, path: str | os.PathLike) -> Path:
    """Bar chart of each layer's sparsity: final (in the file), learned, ERK start, uniform.

    Layers are in graph order; bar width is constant, and the layer's share of the prunable
    weights is drawn as a grey line so big layers stand out.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise OptionError("--plot needs matplotlib: pip install matplotlib") from None
    import numpy as np

    path = Path(path)
    layers = report.layers
    n = len(layers)
    x = np.arange(n)
    series = [("final (written)", [r.sparsity for r in layers], "#1f77b4")]
    learning = report.learning or {}
    if learning.get("learned_sparsity"):
        series.append(("learned (before projection)", learning["learned_sparsity"], "#ff7f0e"))
    if learning.get("initial_sparsity"):
        series.append((f"start ({learning.get('initial_allocation', 'initial')})", learning["initial_sparsity"],
                       "#2ca02c"))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(8, 0.28 * n + 3), 4.8), dpi=110)
    for i, (label, values, color) in enumerate(series):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=label, color=color)
    ax.axhline(report.target_sparsity, color="k", linestyle="--", linewidth=1,
               label=f"uniform = target {report.target_sparsity:.0%}")
    share = np.array([r.params for r in layers], dtype=float) / max(1, report.total_params)
    ax2 = ax.twinx()
    ax2.plot(x, share, color="0.5", marker=".", linewidth=1, label="share of prunable weights")
    ax2.set_ylabel("share of prunable weights", color="0.4")
    ax2.set_ylim(0, max(share.max() * 1.15, 0.05) if n else 1)
    ax.set_ylim(0, 1.0)
    ax.set_ylabel("layer sparsity")
    ax.set_xticks(x)
    labels = [layer_label(r.name, r.nodes) for r in layers]
    ax.set_xticklabels([n if len(n) <= 28 else "..." + n[-25:] for n in labels],
                       rotation=70, ha="right", fontsize=7)
    title = f"{Path(report.input_path).name}: {report.method} at {report.achieved_sparsity:.1%} global sparsity"
    ax.set_title(title, fontsize=10)
    handles = ax.get_legend_handles_labels()
    handles2 = ax2.get_legend_handles_labels()
    ax.legend(handles[0] + handles2[0], handles[1] + handles2[1], fontsize=7, loc="upper left", ncols=2)
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Write a matplotlib figure atomically (temp file + rename) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write the plot ({exc.strerror or exc})") from None
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
