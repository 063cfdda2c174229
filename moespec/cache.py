"""The on-disk cache's building blocks: content keys, a cross-process lock, atomic publish."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None


def content_hash(obj: Any) -> str:
    """A short key for a JSON-serialisable value (the name of a cache entry)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_UN)


@functools.cache
def _process_umask() -> int:
    """The umask, read once: reading it means setting it, a process-wide change that a thread
    creating a file at that moment would see."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_umask_allows(path: Path) -> None:
    """Give ``path`` (and a directory's whole tree) the modes a plain ``open``/``mkdir`` would
    under the process umask: temp files and directories are created private (0600/0700)."""
    mask = _process_umask()
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def staging_dir(final: Path) -> Path:
    """A new empty directory beside ``final``, to fill and then :func:`publish_dir`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))


def publish_dir(tmp: Path, final: Path) -> None:
    """Move a fully written temporary directory into place (atomic rename)."""
    as_umask_allows(tmp)
    try:
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():
            raise
