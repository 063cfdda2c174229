"""Checkpoints every ``trainer.save_every`` steps, at the end, at ``trainer.stop_after`` and on
preemption (:meth:`moespec.train.trainer.Trainer.stop_for_preemption`)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ...routing.router import balance_state
from .. import checkpoint as ckpt
from .base import Callback

if TYPE_CHECKING:
    from ..trainer import Trainer

log = logging.getLogger("moespec")


class Checkpointing(Callback):
    """Saves the engine, the sampler, the loss weights and every callback's state."""

    name = "checkpointing"

    def on_step_end(self, trainer: Trainer) -> None:
        tc = trainer.cfg.trainer
        stopping = bool(tc.stop_after) and tc.stop_after <= trainer.step < trainer.total_steps
        every = tc.save_every
        if (every and trainer.step % every == 0) or trainer.is_last_step or stopping:
            self.save(trainer)
        if stopping:
            trainer.should_stop = True
            if trainer.rank == 0:
                log.info(
                    "stopping after step %d of %d (trainer.stop_after); resume with trainer.resume=auto",
                    trainer.step, trainer.total_steps,
                )  # fmt: skip

    def save(self, trainer: Trainer) -> None:
        """Write the checkpoint of ``trainer.step`` (collective: every rank calls it)."""
        state = {
            "step": trainer.step,
            "sampler": trainer.batches.state_dict(),
            "loss_weights": trainer.loss_weights,
            "layout": ckpt.run_layout(trainer.cfg, trainer.world),
            "balance": balance_state(trainer.model),
            "guard": trainer.guard.state_dict(),
        }
        ckpt.save_checkpoint(
            trainer.engine, trainer.ckpt_root, trainer.step, state,
            trainer.cfg.trainer.keep_checkpoints, trainer.callback_states(),
        )  # fmt: skip
