"""Heat maps of expert load and expert×domain routing (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def plot_load_heatmap(load: np.ndarray, path: Path, step: int) -> Path:
    """``load`` [layers, experts] as fractions of routed slots; 1/E is perfect balance."""
    layers, experts = load.shape
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * experts, 1.0 + 0.4 * layers))
    im = ax.imshow(load, cmap="viridis", aspect="auto", vmin=0.0)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(experts))
    ax.set_yticks(range(layers))
    ax.set_title(f"expert load, step {step} (balanced = {1.0 / experts:.3f})", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_domain_heatmap(joint: np.ndarray, domains: list[str], path: Path, step: int) -> Path:
    """``joint`` [layers, experts, domains] slot counts → P(domain | expert), one panel per layer."""
    layers, experts, _ = joint.shape
    fig, axes = plt.subplots(
        1, layers, figsize=(1.2 + 1.1 * len(domains) * layers, 1.2 + 0.3 * experts), squeeze=False
    )
    for i, ax in enumerate(axes[0]):
        counts = joint[i][:, : len(domains)]
        share = counts / np.clip(counts.sum(1, keepdims=True), 1e-12, None)
        ax.imshow(share, cmap="magma", aspect="auto", vmin=0.0, vmax=1.0)
        ax.set_title(f"layer {i}", fontsize=8)
        ax.set_xticks(range(len(domains)))
        ax.set_xticklabels(domains, rotation=45, fontsize=7)
        ax.set_yticks(range(experts))
        if i == 0:
            ax.set_ylabel("expert  (rows: P(domain | expert))", fontsize=8)
    fig.suptitle(f"expert × domain, step {step}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_metric_curves(
    curves: dict[str, list[tuple[str, list[int], list[float]]]], path: Path
) -> Path:
    """``curves[metric]`` = [(run label, steps, values)]: one panel per metric, a line per run."""
    if not curves:
        raise ValueError("no metric to plot: none of the runs logged one")
    cols = min(3, len(curves))
    rows = -(-len(curves) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (metric, lines) in zip(axes.flat, curves.items()):
        for label, steps, values in lines:
            if steps:
                ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=label)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in list(axes.flat)[len(curves) :]:
        ax.axis("off")
    seen: dict[str, object] = {}  # one legend entry per run, from whichever panel has it
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    handles, labels = list(seen.values()), list(seen)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), fontsize=8)
    fig.tight_layout(rect=(0, 0.04 + 0.03 * ((len(labels) - 1) // 3), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
