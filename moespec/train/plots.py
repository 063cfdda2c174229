"""Heat maps (numbers in the cells, colour bars) and metric curves (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def annotate(ax, values: np.ndarray, im, fmt: str = "{:.2f}", fontsize: float = 6.5) -> None:
    """Write each cell's value on the heat map ``im`` (dark text on light cells); NaN: blank."""
    if values.size > 40 * 40:  # too small to read: the colour bar carries the scale
        return
    for (r, c), v in np.ndenumerate(values):
        if not np.isfinite(v):
            continue
        light = sum(im.cmap(im.norm(v))[:3]) / 3 > 0.5
        ax.text(c, r, fmt.format(v), ha="center", va="center", fontsize=fontsize,
                color="black" if light else "white")  # fmt: skip


def heatmap(
    ax,
    values: np.ndarray,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    cmap: str = "viridis",
    vmin: float | None = 0.0,
    vmax: float | None = None,
    xticklabels: list[str] | None = None,
    fmt: str = "{:.2f}",
):
    """One annotated heat-map panel with its colour bar; returns the image."""
    im = ax.imshow(values, cmap=cmap, aspect="auto", vmin=vmin, vmax=vmax)
    rows, cols = values.shape
    ax.set_xticks(range(cols))
    if xticklabels is not None:
        ax.set_xticklabels(xticklabels, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(rows))
    ax.tick_params(labelsize=7)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=8)
    annotate(ax, values, im, fmt)
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=7)
    return im


def save(fig, path: Path) -> Path:
    """Lay out, write the PNG and close the figure."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_load_heatmap(load: np.ndarray, path: Path, step: int | None = None) -> Path:
    """``load`` [layers, experts] as fractions of routed slots; 1/E is perfect balance."""
    layers, experts = load.shape
    fig, ax = plt.subplots(figsize=(1.6 + 0.55 * experts, 1.2 + 0.45 * layers))
    when = f", step {step}" if step is not None else ""
    heatmap(ax, load, xlabel="expert", ylabel="layer", fmt="{:.3f}" if experts <= 16 else "{:.2f}",
            title=f"expert load{when} (share of routed slots; balanced = {1.0 / experts:.3f})")  # fmt: skip
    return save(fig, path)


def plot_domain_heatmap(
    joint: np.ndarray, domains: list[str], path: Path, step: int | None = None
) -> Path:
    """``joint`` [layers, experts, domains] slot counts → P(domain | expert), one panel per
    layer (each row sums to 1)."""
    layers, experts, _ = joint.shape
    fig, axes = plt.subplots(
        1, layers, figsize=(1.0 + (1.6 + 0.6 * len(domains)) * layers, 1.4 + 0.3 * experts),
        squeeze=False,
    )  # fmt: skip
    for i, ax in enumerate(axes[0]):
        counts = np.zeros((experts, len(domains)))  # a domain with no tokens yet: zeros
        seen = min(len(domains), joint.shape[2])
        counts[:, :seen] = joint[i][:, :seen]
        share = counts / np.clip(counts.sum(1, keepdims=True), 1e-12, None)
        heatmap(ax, share, xlabel="domain", ylabel="expert" if i == 0 else "", cmap="magma",
                vmax=1.0, xticklabels=domains, title=f"layer {i}: P(domain | expert)")  # fmt: skip
    when = f", step {step}" if step is not None else ""
    fig.suptitle(f"expert × domain{when}", fontsize=9)
    return save(fig, path)


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
