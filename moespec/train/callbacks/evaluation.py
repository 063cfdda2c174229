"""Validation loss, overall and per domain, and the routing statistics of the validation
batches, every ``trainer.eval_every`` steps and at the end."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from ...data.batches import model_inputs, token_context
from ...data.pipeline import DataBundle
from ...data.sampler import batch_iterator
from ...distributed import all_reduce_floats
from ...eval.routing import EvalRouting
from ...routing import set_token_context
from .base import Callback

if TYPE_CHECKING:
    from ..trainer import Trainer


@torch.no_grad()
def evaluate(trainer: Trainer, data: DataBundle) -> dict[str, float]:
    """``val/loss`` and ``val/loss/<domain>`` over ``trainer.eval_batches`` batches per rank,
    and the routing of those batches (``val/routing/<name>``, ``val/layer{i}/routing/load/...``)
    counted apart from the training window."""

    cfg, model, world = trainer.cfg, trainer.model, trainer.world
    model.eval()
    num_domains = len(data.domains)
    sums = np.zeros(2 + 2 * num_domains)
    micro = cfg.deepspeed.micro_batch_size
    batches = min(cfg.trainer.eval_batches, len(data.val) // (micro * world))
    it = batch_iterator(data.val, micro, seed=0, rank=trainer.rank, world_size=world, num_epochs=1)
    with EvalRouting(model) as routing:
        for _ in range(batches):
            batch = next(it)
            set_token_context(model, token_context(batch, trainer.device))
            out = trainer.engine(
                batch["input_ids"].to(trainer.device),
                batch["labels"].to(trainer.device),
                **model_inputs(batch, trainer.device),
            )
            trained = batch["labels"] != -100
            tl = out.token_losses.float().cpu() * trained
            sums[0] += float(tl.sum())
            sums[1] += float(trained.sum())
            dom = batch["domain_ids"]
            for d in range(num_domains):
                mask = (dom == d) & trained
                sums[2 + 2 * d] += float(tl[mask].sum())
                sums[3 + 2 * d] += float(mask.sum())
        routed = routing.figures(all_reduce=True)  # every rank ran ``batches`` batches
    model.train()
    sums = np.array(all_reduce_floats(sums.tolist()))
    if batches == 0 or sums[1] == 0:
        return {}
    out = {"val/loss": sums[0] / sums[1], **{f"val/{k}": v for k, v in routed.items()}}
    for d, name in enumerate(data.domains):
        if sums[3 + 2 * d] > 0:
            out[f"val/loss/{name}"] = sums[2 + 2 * d] / sums[3 + 2 * d]
    return out


class Evaluation(Callback):
    """Adds the validation figures to the step's metrics on its own schedule."""

    name = "evaluation"

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.step % trainer.cfg.trainer.eval_every == 0 or trainer.is_last_step:
            trainer.metrics.update(evaluate(trainer, trainer.data))
