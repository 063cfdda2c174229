"""The callback interface (after OLMo-core's ``train/callbacks``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...routing import CollectedLosses

if TYPE_CHECKING:
    from ..trainer import Trainer


@dataclass
class MicroBatch:
    """What one forward/backward produced: losses as floats, the routing losses, tokens
    (all positions) and trained tokens (labels other than -100)."""

    loss: float
    lm_loss: float
    routed: CollectedLosses
    tokens: int
    trained: int = 0


class Callback:
    """Hooks around the step loop; each does nothing unless overridden.

    ``name`` keys the callback's state in a checkpoint; ``state_dict`` returns ``None`` when
    there is nothing to carry over.
    """

    name = ""

    def on_train_start(self, trainer: Trainer) -> None:
        """After setup (and a resume), before the first step."""

    def on_micro_batch(self, trainer: Trainer, micro: MicroBatch) -> None:
        """After each forward/backward/engine step of a micro-batch."""

    def on_step_end(self, trainer: Trainer) -> None:
        """After each optimizer step; add figures to ``trainer.metrics`` to have them logged."""

    def on_train_end(self, trainer: Trainer) -> None:
        """After the last step (also after ``trainer.stop_after``)."""

    def state_dict(self, trainer: Trainer) -> dict[str, Any] | None:
        """What a resumed run needs to continue as if never stopped."""
        return None

    def load_state_dict(self, trainer: Trainer, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s value (same world size only)."""
