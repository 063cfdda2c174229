"""Fault injection for reliability tests: ``MOESPEC_FAULTS`` names faults to raise in a run.

``MOESPEC_FAULTS="KIND:POINT:STEP[:RANK],..."``; each fault fires once, on rank ``RANK``
(default: every rank), at ``POINT`` of optimizer step ``STEP``:

- ``kill``: SIGKILL this process (a node lost, ``kill -9``);
- ``enospc``: raise ``OSError(ENOSPC)`` (a full disk);
- ``sigterm``: send SIGTERM to this process (a scheduler's preemption);
- ``nan``: make the loss of this rank's micro-batch NaN (POINT ``micro``).

POINT is ``setup`` (once the engine is built, before any step; STEP 0), ``micro`` (each
micro-batch, before backward), ``step`` (after each optimizer step) or,
inside a checkpoint save, ``before-FILE`` / ``after-FILE`` for each file written (``FILE`` a
glob over names such as ``mp_rank_00_model_states.pt``, ``rank0_state.pt``,
``trainer_state.json``, ``COMPLETE``). Unset, nothing here does anything.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import signal
from dataclasses import dataclass

ENV = "MOESPEC_FAULTS"
KINDS = ("kill", "enospc", "sigterm", "nan")


@dataclass
class Fault:
    """One fault: what, where, at which step, on which rank (None: every rank)."""

    kind: str
    point: str
    step: int
    rank: int | None = None
    fired: bool = False


def parse(spec: str) -> list[Fault]:
    """Faults of a ``MOESPEC_FAULTS`` value; ``ValueError`` names a bad entry."""
    out = []
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        parts = entry.split(":")
        if len(parts) not in (3, 4) or parts[0] not in KINDS:
            raise ValueError(
                f"{ENV} entry {entry!r}: expected KIND:POINT:STEP[:RANK], KIND one of {KINDS}"
            )
        try:
            step, rank = int(parts[2]), int(parts[3]) if len(parts) == 4 else None
        except ValueError:
            raise ValueError(f"{ENV} entry {entry!r}: STEP and RANK must be integers") from None
        out.append(Fault(parts[0], parts[1], step, rank))
    return out


_faults: list[Fault] = []
_where = {"step": 0, "rank": 0}


def configure(rank: int) -> None:
    """Arm the faults of ``MOESPEC_FAULTS`` for this process (rank ``rank``)."""
    _faults[:] = parse(os.environ.get(ENV, ""))
    _where["rank"] = rank


def set_step(step: int) -> None:
    """The optimizer step the run is in (the trainer calls it at the start of each step)."""
    _where["step"] = step


def _due(point: str, kinds: tuple[str, ...]) -> Fault | None:
    for fault in _faults:
        if fault.fired or fault.kind not in kinds or fault.step != _where["step"]:
            continue
        if fault.rank is not None and fault.rank != _where["rank"]:
            continue
        if fnmatch.fnmatchcase(point, fault.point):
            fault.fired = True
            return fault
    return None


def point(name: str) -> None:
    """A place where ``kill``, ``enospc`` and ``sigterm`` faults may fire."""
    fault = _due(name, ("kill", "enospc", "sigterm"))
    if fault is None:
        return
    if fault.kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault.kind == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
    else:
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected at {name})")


def nan_due() -> bool:
    """Whether this micro-batch's loss is to be made NaN."""
    return _due("micro", ("nan",)) is not None
