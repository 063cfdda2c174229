"""Which optimizer steps to skip: non-finite losses (``trainer.nonfinite=skip``) and spikes.

A micro-batch's loss is checked before its backward, with the largest loss over the ranks, so
every rank takes the same decision. A loss spike is a loss above ``trainer.spike_factor`` times
the median of the last ``trainer.spike_window`` accepted micro-batch losses (checked once that
many are known). Too many skipped steps in a row (``trainer.max_skipped_steps``) stop the run.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any


class StepGuard:
    """Decides per micro-batch whether its optimizer step is skipped, and counts the skips."""

    def __init__(self, nonfinite: str, spike_factor: float, spike_window: int, max_skipped: int):
        self.skip_nonfinite = nonfinite == "skip"
        self.spike_factor, self.max_skipped = spike_factor, max_skipped
        self.history: deque[float] = deque(maxlen=spike_window)
        self.in_a_row = self.total = 0

    def cause(self, loss: float) -> str | None:
        """Why a micro-batch with (largest over ranks) ``loss`` is not to be trained on."""
        if not math.isfinite(loss):
            return "non-finite loss"
        if self.spike_factor > 0 and len(self.history) == self.history.maxlen:
            median = statistics.median(self.history)
            if loss > self.spike_factor * median:
                return f"loss spike {loss:.4g} > {self.spike_factor:g} x median {median:.4g}"
        return None

    def accept(self, loss: float) -> None:
        """A micro-batch trained on: its loss joins the running median."""
        self.history.append(loss)

    def step_done(self, skipped: bool) -> bool:
        """Count an optimizer step; True when the skips in a row exceed ``max_skipped``."""
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        self.total += int(skipped)
        return self.in_a_row > self.max_skipped

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "in_a_row": self.in_a_row, "total": self.total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.extend(state.get("history", []))
        self.in_a_row, self.total = state.get("in_a_row", 0), state.get("total", 0)
