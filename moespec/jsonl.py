"""JSON Lines files read row by row: numbered values, and one error at the first bad line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class JsonLineError(ValueError):
    """A line that is not JSON: ``path:number: not JSON (why)``."""

    def __init__(self, path: Path, number: int, msg: str) -> None:
        super().__init__(f"{path}:{number}: not JSON ({msg})")
        self.number, self.msg = number, msg


def json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line number from 1, value)`` of each non-blank line of ``path``, streamed;
    :class:`JsonLineError` at the first line that is not JSON."""
    with path.open(encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise JsonLineError(path, number, err.msg) from None
            yield number, value
