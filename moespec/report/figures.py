"""The report's PNG figures, drawn from the numbers of ``report.json`` alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..routing.metric_table import shown_in
from ..train.plots import heatmap, plot_domain_heatmap, plot_load_heatmap, plt, save

#: Layer-wise summary panels: (metric of ``layers[i].metrics``, title).
SUMMARY_METRICS = tuple((m.name, m.title) for m in shown_in("report_figure"))


def _panels(layers: list[dict[str, Any]], key: str, path: Path, title: str, **style: Any) -> Path:
    """One E×E heat map per layer of ``layers[i][key]``."""
    n = len(layers)
    e = len(layers[0][key])
    fig, axes = plt.subplots(1, n, figsize=(0.6 + (1.4 + 0.42 * e) * n, 1.2 + 0.4 * e),
                             squeeze=False)  # fmt: skip
    for ax, layer in zip(axes[0], layers):
        values = np.array([[np.nan if v is None else v for v in r] for r in layer[key]], float)
        heatmap(ax, values, xlabel="expert", ylabel="expert", title=f"layer {layer['layer']}",
                **style)  # fmt: skip
    fig.suptitle(title, fontsize=9)
    return save(fig, path)


def model_figures(model: dict[str, Any], out: Path, prefix: str, domains: list[str]) -> list[Path]:
    """Load, expert × domain, co-activation and similarity figures of one model."""
    layers = model["layers"]
    paths = [plot_load_heatmap(np.array([ly["load"] for ly in layers]), out / f"{prefix}_load.png")]
    if domains and "domain_slots" in layers[0]:
        joint = np.array([ly["domain_slots"] for ly in layers], dtype=float)
        paths.append(plot_domain_heatmap(joint, domains, out / f"{prefix}_expert_domain.png"))
    paths.append(
        _panels(
            layers,
            "coactivation",
            out / f"{prefix}_coactivation.png",
            "co-activation: share of tokens routed to both experts (diagonal: to the expert)",
            cmap="Blues",
            fmt="{:.2f}",
        )  # fmt: skip
    )
    paths.append(
        _panels(
            layers,
            "similarity",
            out / f"{prefix}_similarity.png",
            "output similarity: mean cos of two experts' outputs on the tokens they share",
            cmap="coolwarm",
            vmin=-1.0,
            vmax=1.0,
            fmt="{:.2f}",
        )  # fmt: skip
    )
    return paths


def summary_figure(models: list[dict[str, Any]], path: Path) -> Path:
    """Layer-wise summary: one panel per metric, one line per model."""
    present = [(k, t) for k, t in SUMMARY_METRICS
               if any(k in ly["metrics"] for m in models for ly in m["layers"])]  # fmt: skip
    cols = min(3, len(present))
    rows = -(-len(present) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 2.8 * rows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, present):
        for m in models:
            xs = [ly["layer"] for ly in m["layers"] if key in ly["metrics"]]
            ys = [ly["metrics"][key] for ly in m["layers"] if key in ly["metrics"]]
            ax.plot(xs, ys, marker="o", label=m["name"])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("layer", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    return save(fig, path)
