"""Writes each step's figures to metrics.jsonl and wandb; keeps the run's latest values."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Callback

if TYPE_CHECKING:
    from ..trainer import Trainer


class MetricsLog(Callback):
    """One row per step that has figures (``trainer.metrics``), through the run's logger."""

    name = "metrics_log"

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.metrics:
            trainer.logger.log(trainer.step, trainer.metrics)
            trainer.last.update(trainer.metrics)
