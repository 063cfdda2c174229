"""Heat map of head scores with the selected heads marked."""

from __future__ import annotations

from pathlib import Path

from .selection import HeadProfile


def save_heatmap(profile: HeadProfile, path: str | Path) -> Path:
    """Write a PNG of the [layer, head] scores; P marks perception heads, R reasoning heads."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import patheffects

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    layers, heads = profile.num_layers, profile.num_heads
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * heads + 2), max(3.0, 0.3 * layers + 1.5)))
    image = ax.imshow(profile.scores.numpy(), aspect="auto", cmap="viridis", vmin=0.0)
    fig.colorbar(image, ax=ax, label="attention mass on context")
    outline = [patheffects.withStroke(linewidth=2, foreground="black")]
    for label, cls, color in (("P", "perception", "white"), ("R", "reasoning", "red")):
        for layer, head in profile.heads.get(cls, []):
            ax.text(
                head,
                layer,
                label,
                ha="center",
                va="center",
                color=color,
                fontsize=7,
                weight="bold",
                path_effects=outline,
            )
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    n_p, n_r = len(profile.heads.get("perception", [])), len(profile.heads.get("reasoning", []))
    ax.set_title(f"{profile.model_type}: {n_p} perception (P), {n_r} reasoning (R) heads")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
