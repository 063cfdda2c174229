"""Expert-load and expert×domain heat maps of the logging window that holds each plot step."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Callback

if TYPE_CHECKING:
    from ..trainer import Trainer


class Heatmaps(Callback):
    """Plots the window holding each multiple of ``trainer.plot_every``, and the last one."""

    name = "heatmaps"

    def on_step_end(self, trainer: Trainer) -> None:
        if not trainer.is_log_step or trainer.rank != 0:
            return
        every, plot_every = trainer.cfg.trainer.log_every, trainer.cfg.trainer.plot_every
        window_start = (trainer.step - 1) // every * every
        if trainer.step // plot_every > window_start // plot_every or trainer.is_last_step:
            w = trainer.window
            trainer.logger.heatmaps(trainer.step, w.load, w.domain_counts, trainer.data.domains)
