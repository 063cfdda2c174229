"""Expert output overlap of training runs, per step and per layer, from their metrics.jsonl.

    python scripts/plot_layer_overlap.py runs/a runs/b --out docs/img/overlap.png

Left: ``routing/output_overlap`` (the mean over layers) against the step. Right: each layer's
``layer{i}/routing/output_overlap`` at each run's last logged step. Prints the per-layer values
as a table, so the figure's numbers can be quoted.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from moespec.train.run_metrics import CompareError, load_run  # noqa: E402

_LAYER = re.compile(r"^layer(\d+)/routing/output_overlap$")


def read_rows(run: Path) -> list[dict]:
    """The rows of ``run``'s history (as ``moespec-compare`` reads it) that carry the overlap."""
    rows = [r for r in load_run(run).history if "routing/output_overlap" in r]
    if not rows:
        raise CompareError(f"{run / 'metrics.jsonl'}: no row has routing/output_overlap")
    return rows


def per_layer(row: dict) -> list[float]:
    """``layer{i}/routing/output_overlap`` of one row, ordered by layer."""
    found = {int(m.group(1)): v for k, v in row.items() if (m := _LAYER.match(k))}
    return [found[i] for i in sorted(found)]


def plot(runs: dict[str, list[dict]], out: Path) -> None:
    """Write the two-panel figure for ``runs`` (label -> rows) to ``out``."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for label, rows in runs.items():
        left.plot(
            [r["step"] for r in rows],
            [r["routing/output_overlap"] for r in rows],
            "o-",
            label=label,
        )
        layers = per_layer(rows[-1])
        right.plot(range(len(layers)), layers, "o-", label=f"{label} (step {rows[-1]['step']})")
    left.set(xlabel="step", ylabel="output overlap (mean of layers)", title="expert output overlap")
    right.set(xlabel="layer", ylabel="output overlap", title="per layer, last step")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "runs", nargs="+", type=Path, help="run directories (label = directory name)"
    )
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = parser.parse_args(argv)
    try:
        runs = {run.name: read_rows(run) for run in args.runs}
    except CompareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    plot(runs, args.out)
    for label, rows in runs.items():
        values = " ".join(f"{v:.4f}" for v in per_layer(rows[-1]))
        print(f"{label} step {rows[-1]['step']}: {values}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
