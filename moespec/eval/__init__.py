"""Evaluation: answer extraction and exact-match scoring (``extract``, pure Python, no torch).

Only ``extract`` is imported here; ``moespec.eval.generate`` (batched generation) is not.
``moespec.eval.extract`` is the module; its dispatcher is ``moespec.eval.extract.extract`` (not
re-exported here, so the name ``extract`` keeps meaning the module).
"""

from .extract import (
    METHODS,
    exact_match,
    extract_choice,
    extract_gsm8k,
    extract_last_number,
    extract_regex,
    normalize_number,
)

__all__ = [
    "METHODS",
    "exact_match",
    "extract_choice",
    "extract_gsm8k",
    "extract_last_number",
    "extract_regex",
    "normalize_number",
]
