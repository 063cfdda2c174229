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


def default_callbacks() -> list[Callback]:
    """The callbacks every run has, in the order they act at the end of a step."""
    return [
        LoggingWindow(),
        CollapseAlarm(),
        Heatmaps(),
        Progress(),
        Evaluation(),
        EvalSets(),
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
