"""The recipe's evaluation sets (``eval.sets``): loss, generation accuracy, routing per set."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ...eval.sets import EvalSet, evaluate_set, load_eval_set, validate_eval_config
from ...routing.metric_table import shown_in
from .base import Callback

if TYPE_CHECKING:
    from ..trainer import Trainer

log = logging.getLogger("moespec")


def format_table(figures: dict[str, float]) -> str:
    """``eval/<set>/<metric>`` figures as a small table, one row per set."""
    sets: dict[str, dict[str, float]] = {}
    for key, value in figures.items():
        _, name, metric = key.split("/", 2)
        sets.setdefault(name, {})[metric] = value
    wanted = ["loss", "ppl", "accuracy", *(f"routing/{m.name}" for m in shown_in("validation"))]
    cols = [c for c in wanted if any(c in m for m in sets.values())]
    lines = ["| set | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, m in sets.items():
        lines.append(
            f"| {name} | " + " | ".join(f"{m[c]:.4g}" if c in m else "-" for c in cols) + " |"
        )
    return "\n".join(lines)


class EvalSets(Callback):
    """Loads each set once (the run's tokenizer), then evaluates it on its schedule; every
    rank runs every example (so that expert-parallel ranks stay in step), rank 0 writes."""

    name = "eval_sets"

    def __init__(self) -> None:
        self.sets: list[EvalSet] = []

    def on_train_start(self, trainer: Trainer) -> None:
        configs = validate_eval_config(trainer.cfg.eval)
        tok = trainer.data.tokenizer
        self.sets = [load_eval_set(n, c, trainer.cfg.data, tok) for n, c in configs.items()]
        if self.sets and trainer.cfg.eval.at_start and trainer.start_step == 0:
            figures = self._evaluate(trainer, trainer.start_step)
            trainer.logger.log(trainer.start_step, figures)
            trainer.last.update(figures)

    def on_step_end(self, trainer: Trainer) -> None:
        every = trainer.cfg.eval.every or trainer.cfg.trainer.eval_every
        if self.sets and (trainer.step % every == 0 or trainer.is_last_step):
            trainer.metrics.update(self._evaluate(trainer, trainer.step))

    def _evaluate(self, trainer: Trainer, step: int) -> dict[str, float]:
        out_dir = trainer.run_dir / "eval" if trainer.rank == 0 else None
        figures: dict[str, float] = {}
        for es in self.sets:
            figures.update(
                evaluate_set(
                    trainer.model, es, trainer.data.tokenizer, trainer.device, out_dir, step
                )
            )
        if trainer.rank == 0:
            log.info("evaluation at step %d:\n%s", step, format_table(figures))
        return figures
