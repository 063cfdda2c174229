"""The trainer's callbacks: everything around the step loop, one idea per file.

A callback sees the :class:`~moespec.train.trainer.Trainer` at a few points of the loop
(:class:`Callback`); what it must carry over a stop and resume it returns from ``state_dict``.
"""

from .base import Callback, MicroBatch
from .checkpointing import Checkpointing
from .collapse import CollapseAlarm
from .eval_sets import EvalSets
from .evaluation import Evaluation, evaluate
from .heatmaps import Heatmaps
from .metrics_log import MetricsLog
from .progress import Progress
from .window import LoggingWindow


def default_callbacks(user: list[Callback] | None = None) -> list[Callback]:
    """Every run's callbacks, with ``user``'s, in the order they act at the end of a step:
    the logging window, collapse alarm, heat maps, progress line, validation and evaluation
    sets, then the user's callbacks, then the metrics log (so what any of them adds to
    ``trainer.metrics`` is logged) and last the checkpoint (which sees the logged step)."""
    return [
        LoggingWindow(),
        CollapseAlarm(),
        Heatmaps(),
        Progress(),
        Evaluation(),
        EvalSets(),
        *(user or []),
        MetricsLog(),
        Checkpointing(),
    ]


__all__ = [
    "Callback",
    "Checkpointing",
    "CollapseAlarm",
    "EvalSets",
    "Evaluation",
    "Heatmaps",
    "LoggingWindow",
    "MetricsLog",
    "MicroBatch",
    "Progress",
    "default_callbacks",
    "evaluate",
]
