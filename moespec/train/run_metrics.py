"""A run directory's logged metrics as :class:`Run`: the rows of ``metrics.jsonl``, its alerts,
its Hydra overrides and the last value of each run-level metric (``summary.json`` winning)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from ..jsonl import JsonLineError, json_lines
from .logging import run_level

#: Metric names of runs logged before the loss weights were named after their losses.
LEGACY_KEYS = {
    "weights/alpha": "weights/aux",
    "weights/beta": "weights/orthogonality",
    "weights/gamma": "weights/variance",
    "weights/zeta": "weights/z",
}


class CompareError(ValueError):
    """A path given to ``moespec-compare`` is not a run or sweep directory."""


@dataclass
class Run:
    """One training run as its directory holds it."""

    path: Path
    history: list[dict] = field(default_factory=list)  # rows of metrics.jsonl, alerts excluded
    alerts: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)  # .hydra/overrides.yaml
    summary: dict[str, float] = field(default_factory=dict)

    @property
    def last_step(self) -> int:
        return max((int(r["step"]) for r in self.history if "step" in r), default=0)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of ``key`` over the run."""
        rows = [r for r in self.history if key in r and "step" in r]
        return [int(r["step"]) for r in rows], [float(r[key]) for r in rows]


def load_run(path: Path) -> Run:
    """Read ``metrics.jsonl``, ``summary.json`` and the Hydra overrides of one run directory."""
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise CompareError(f"{path}: no metrics.jsonl (not a moespec run directory)")
    run = Run(path=path)
    by_step: dict[int, dict] = {}  # a resumed run may log a step again: the last row wins
    try:
        for _, row in json_lines(metrics):
            if "alert" in row:
                run.alerts.append(str(row["alert"]))
            elif "step" in row:
                by_step[int(row["step"])] = {LEGACY_KEYS.get(k, k): v for k, v in row.items()}
    except JsonLineError as err:
        raise CompareError(str(err)) from None
    run.history = [by_step[s] for s in sorted(by_step)]
    # The last value of each run-level metric; summary.json (written at the end) wins.
    for row in run.history:
        run.summary.update(run_level(row))
    summary = path / "summary.json"
    if summary.is_file():
        try:
            saved = json.loads(summary.read_text())
            run.summary.update({LEGACY_KEYS.get(k, k): v for k, v in saved.items()})
        except json.JSONDecodeError as err:
            raise CompareError(f"{summary}: not JSON ({err.msg})") from None
    overrides = path / ".hydra" / "overrides.yaml"
    if overrides.is_file():
        run.overrides = [str(o) for o in OmegaConf.load(overrides)]
    return run
