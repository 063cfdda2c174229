"""Functional attention-head identification and class-conditioned rescaling at inference time."""

from .controller import HeadController
from .scoring import score_heads
from .selection import HeadProfile, HeadSelectionConfig, select_heads

__all__ = ["HeadController", "HeadProfile", "HeadSelectionConfig", "score_heads", "select_heads"]
