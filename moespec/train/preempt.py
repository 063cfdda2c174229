"""Preemption: a scheduler's signal becomes a checkpoint and a documented exit code.

On any of ``trainer.preempt_signals`` a rank only notes the request; the trainer finishes the
optimizer step it is in, the ranks agree (one all-reduce per step), every rank writes its part
of a checkpoint and the process exits with ``trainer.preempt_exit_code``. Further signals
while that happens are logged and ignored, so they cannot cut the checkpoint short.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType

log = logging.getLogger("moespec")


class Preempted(Exception):
    """Raised after the preemption checkpoint is written; ``code`` is the exit status."""

    def __init__(self, step: int, code: int, signal_name: str) -> None:
        super().__init__(f"preempted by {signal_name} after step {step}; exit {code}")
        self.step, self.code, self.signal_name = step, code, signal_name


def parse_signals(names: list[str]) -> list[signal.Signals]:
    """``["SIGTERM", "USR1"]`` → signals; ``ValueError`` names an unknown one."""
    out = []
    for name in names:
        full = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
        if full in ("SIGKILL", "SIGSTOP") or not hasattr(signal.Signals, full):
            raise ValueError(
                f"trainer.preempt_signals: {name!r} is not a signal that can be caught "
                "(e.g. SIGTERM, SIGUSR1, SIGUSR2, SIGINT)"
            )
        out.append(signal.Signals[full])
    return out


class PreemptionHandler:
    """Notes the first of ``signals`` received; later ones are logged only."""

    def __init__(self, names: list[str]) -> None:
        self.signals = parse_signals(names)
        self.received: str | None = None
        self._previous: dict[signal.Signals, object] = {}

    def install(self) -> None:
        """Take over the signals (main thread only)."""
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Give the signals back their previous handlers."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def ignore_from_now(self) -> None:
        """After the preemption checkpoint: further signals are ignored while the process shuts
        down. Python puts its own handlers back to the default (terminate) at exit, where a
        scheduler's second SIGTERM would turn exit 75 into a kill; it keeps ``SIG_IGN``."""
        for sig in self.signals:
            signal.signal(sig, signal.SIG_IGN)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            log.warning("%s received: checkpointing after this optimizer step", name)
        else:
            log.warning("%s received while stopping for %s: ignored", name, self.received)
