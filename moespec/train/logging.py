"""Rank-0 logging: wandb (offline unless configured), metrics.jsonl, heat-map PNGs."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("moespec")


_PER_LAYER = re.compile(r"(^|/)layer\d+/")


def run_level(metrics: dict[str, float]) -> dict[str, float]:
    """The run-level entries of a metrics row (``group/name``; no step, nothing per layer
    such as ``layer{i}/...`` or ``val/layer{i}/...``)."""
    return {k: v for k, v in metrics.items() if "/" in k and not _PER_LAYER.search(k)}


class MetricsLogger:
    """Writes one JSON object per logged step to ``metrics.jsonl`` and mirrors it to wandb."""

    def __init__(
        self,
        run_dir: Path,
        wandb_cfg: Any,
        config: dict[str, Any],
        run_name: str,
        enabled: bool,
        *,
        resume: bool = False,
    ) -> None:
        self.enabled = enabled
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        self.plot_dir = run_dir / "plots"
        self.wandb = None
        self.wandb_dir: Path | None = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._drop_partial_line()
        if wandb_cfg.enabled:
            self._init_wandb(wandb_cfg, config, run_name, resume)

    def _init_wandb(self, cfg: Any, config: dict[str, Any], run_name: str, resume: bool) -> None:
        import wandb

        mode = cfg.mode or os.environ.get("WANDB_MODE") or "offline"
        os.environ.setdefault("WANDB_SILENT", "true")
        # A resumed run continues the wandb run of its run directory; a fresh one starts anew.
        id_file = self.run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
        self.wandb = wandb.init(
            id=run_id,
            resume="allow" if run_id else None,
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name or run_name,
            tags=list(cfg.tags),
            group=cfg.group,
            config=config,
            dir=str(self.run_dir),
            mode=mode,
            reinit="finish_previous",
        )
        self.wandb_dir = Path(self.wandb.dir).parent if self.wandb is not None else None
        if run_id is None and self.wandb is not None:
            id_file.write_text(self.wandb.id + "\n")
        log.info("wandb run %s (%s) in %s", self.wandb.name, mode, self.wandb_dir)

    def _drop_partial_line(self) -> None:
        """A run killed while appending leaves half a line; cut it before appending more."""
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with self.path.open("r+b") as fh:
                fh.truncate(data.rfind(b"\n") + 1)
            log.warning("dropped the half-written last line of %s", self.path)

    def rewind(self, step: int) -> int:
        """Resuming at ``step``: rows logged after it (by a continuation that was abandoned)
        move to ``metrics.superseded.jsonl``, so ``metrics.jsonl`` holds one history. Returns
        how many rows moved."""
        if not self.enabled or not self.path.is_file():
            return 0
        keep, moved = [], []
        for line in self.path.read_text().splitlines(keepends=True):
            (moved if json.loads(line).get("step", 0) > step else keep).append(line)
        if moved:
            from .checkpoint import atomic_write_text

            with (self.run_dir / "metrics.superseded.jsonl").open("a") as fh:
                fh.writelines(moved)
            atomic_write_text(self.path, "".join(keep))
        return len(moved)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append ``metrics`` for ``step``."""
        if not self.enabled:
            return
        row = {
            "step": step,
            **{k: (float(v) if isinstance(v, int | float) else v) for k, v in metrics.items()},
        }
        with self.path.open("a") as fh:
            fh.write(json.dumps(row, allow_nan=True) + "\n")
        if self.wandb is not None:
            self.wandb.log(
                {k: v for k, v in metrics.items() if isinstance(v, int | float)}, step=step
            )

    def alert(self, step: int, text: str) -> None:
        """A routing alarm: console warning, metrics row and wandb alert."""
        log.warning("step %d: %s", step, text)
        if not self.enabled:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps({"step": step, "alert": text}) + "\n")
        if self.wandb is not None:
            try:
                self.wandb.alert(title="moespec routing alarm", text=text)
            except Exception as err:  # offline runs cannot always send alerts
                log.debug("wandb alert not sent: %s", err)

    def heatmaps(
        self, step: int, load: np.ndarray, domain: np.ndarray | None, domains: list[str]
    ) -> list[Path]:
        """Expert-load (layers × experts) and expert×domain heat maps, as PNGs and wandb images."""
        if not self.enabled:
            return []
        from .plots import plot_domain_heatmap, plot_load_heatmap

        self.plot_dir.mkdir(parents=True, exist_ok=True)
        paths = [plot_load_heatmap(load, self.plot_dir / f"expert_load_step{step:06d}.png", step)]
        if domain is not None and domain.size and domains:
            paths.append(
                plot_domain_heatmap(
                    domain, domains, self.plot_dir / f"expert_domain_step{step:06d}.png", step
                )
            )
        if self.wandb is not None:
            import wandb

            self.wandb.log(
                {f"plots/{p.stem.rsplit('_step', 1)[0]}": wandb.Image(str(p)) for p in paths},
                step=step,
            )
        return paths

    def finish(self, summary: dict[str, float] | None = None) -> None:
        """Close the wandb run (writing ``summary``)."""
        if self.wandb is not None:
            for k, v in (summary or {}).items():
                if isinstance(v, int | float) and math.isfinite(v):
                    self.wandb.summary[k] = v
            self.wandb.finish()
            self.wandb = None
