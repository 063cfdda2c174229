"""The collapse alarm: an expert dead, or a layer's load collapsed, for several windows in a row."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...routing.metrics import CollapseMonitor
from .base import Callback

if TYPE_CHECKING:
    from ..trainer import Trainer


class CollapseAlarm(Callback):
    """Raises ``trainer.collapse_patience``-window alarms (console, metrics row, wandb alert)."""

    name = "collapse"

    def __init__(self) -> None:
        self.monitor: CollapseMonitor | None = None

    def _monitor(self, trainer: Trainer) -> CollapseMonitor:
        if self.monitor is None:
            tc = trainer.cfg.trainer
            self.monitor = CollapseMonitor(
                tc.collapse_patience, tc.collapse_maxvio, tc.collapse_entropy
            )
        return self.monitor

    def on_step_end(self, trainer: Trainer) -> None:
        if not trainer.is_log_step:
            return
        for alarm in self._monitor(trainer).update(trainer.window.per_layer):
            trainer.logger.alert(trainer.step, alarm)

    def state_dict(self, trainer: Trainer) -> dict[str, Any]:
        return self._monitor(trainer).state_dict()

    def load_state_dict(self, trainer: Trainer, state: dict[str, Any]) -> None:
        self._monitor(trainer).load_state_dict(state)
