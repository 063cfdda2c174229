"""Progress: a tqdm bar on a terminal, one log line per logging window otherwise."""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING, Any

from .base import Callback

if TYPE_CHECKING:
    from ..trainer import Trainer

log = logging.getLogger("moespec")

#: Short labels for the routing losses shown beside the bar.
SHORT = {"orthogonality": "orth", "variance": "var"}


def progress_fields(metrics: dict[str, Any]) -> dict[str, str]:
    """The figures shown with the progress: total loss, each routing loss, MaxVio, each weighted
    loss in percent of the LM loss, and the balance yield while it is below 1."""
    fields = {"loss": f"{metrics.get('train/loss', float('nan')):.3f}"}
    for key, value in metrics.items():
        if key.startswith("loss/"):
            name = key.split("/", 1)[1]
            fields[SHORT.get(name, name)] = f"{value:.4g}"
    if "routing/maxvio" in metrics:
        fields["maxvio"] = f"{metrics['routing/maxvio']:.2f}"
    for key, value in metrics.items():
        if key.startswith("loss_share/"):
            name = key.split("/", 1)[1]
            fields[f"{SHORT.get(name, name)}%lm"] = f"{100 * value:.2g}"
    if metrics.get("balance/yield", 1.0) < 1.0:
        fields["yield"] = f"{metrics['balance/yield']:.3g}"
    return fields


class Progress(Callback):
    """Rank 0 only, when ``trainer.progress``; a bar only when stdout and stderr are terminals
    (a log file gets one line per ``trainer.log_every`` steps, not carriage-return frames)."""

    name = "progress"

    def __init__(self) -> None:
        self.bar: Any = None
        self.enabled = False
        self.started = 0.0
        self.first_step = 0

    def on_train_start(self, trainer: Trainer) -> None:
        self.enabled = trainer.rank == 0 and trainer.cfg.trainer.progress
        self.started, self.first_step = time.perf_counter(), trainer.start_step
        if self.enabled and sys.stdout.isatty() and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=trainer.total_steps, initial=trainer.start_step, desc="train",
                dynamic_ncols=True,
            )  # fmt: skip

    def on_step_end(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.update(1)
        if not (self.enabled and trainer.is_log_step):
            return
        fields = progress_fields(trainer.metrics)
        if self.bar is not None:
            self.bar.set_postfix(**fields)
            return
        done = trainer.step - self.first_step
        left = trainer.total_steps - trainer.step
        eta = (time.perf_counter() - self.started) / max(done, 1) * left
        text = " ".join(f"{k}={v}" for k, v in fields.items())
        log.info("step %d/%d %s eta %.0fs", trainer.step, trainer.total_steps, text, eta)

    def on_train_end(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
