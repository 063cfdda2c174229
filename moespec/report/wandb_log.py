"""``moespec-report --wandb``: the figures and one table row per (model, layer, expert).

The report joins the wandb run of its first target when that run directory recorded one
(``wandb_run_id``); otherwise it starts a run of its own. Offline unless ``WANDB_MODE`` says.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

COLUMNS = ["model", "layer", "expert", "load", "near_dead", "top_by_share", "top_by_lift"]


def expert_rows(report: dict[str, Any]) -> list[list[Any]]:
    """One row per model, layer and expert: load, near-dead flag, top tokens as text."""
    rows = []
    for m in report["models"]:
        for layer in m["layers"]:
            for ex in layer["experts"]:
                e = ex["expert"]
                rows.append([
                    m["name"], layer["layer"], e, layer["load"][e], e in layer["near_dead"],
                    " ".join(repr(r["text"]) for r in ex["top_by_share"]),
                    " ".join(repr(r["text"]) for r in ex["top_by_lift"]),
                ])  # fmt: skip
    return rows


def log_report(report: dict[str, Any], figures: dict[str, list[Path]], out: Path) -> str:
    """Log the figures and the expert table; returns the wandb run's directory."""
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    first = Path(report["models"][0]["path"])
    id_file = first / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    run = wandb.init(
        id=run_id, resume="allow" if run_id else None, project="moespec", job_type="report",
        name=None if run_id else "report", dir=str(out),
        mode=os.environ.get("WANDB_MODE") or "offline", reinit="finish_previous",
    )  # fmt: skip
    images = {f"report/{p.stem}": wandb.Image(str(p)) for ps in figures.values() for p in ps}
    table = wandb.Table(columns=COLUMNS, data=expert_rows(report))
    means = {f"report/{m['name']}/{k}": v for m in report["models"] for k, v in m["mean"].items()}
    run.log({**images, "report/experts": table, **means})
    where = str(Path(run.dir).parent)
    run.finish()
    return where
