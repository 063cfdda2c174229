"""Heat maps of expert load and expert×domain routing (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


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
