"""Data shipped with moespec: a deterministic synthetic instruction task (``moespec.data.synth``).

The names below are loaded on first use, so ``python -m moespec.data.synth`` runs the module once.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ANSWER_EXTRACTION", "DOMAINS", "FORMATS", "generate", "write_task"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module(".synth", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
