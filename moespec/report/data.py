"""The labelled text a report runs over, streamed as batches of fixed windows.

A data argument is one of:

- ``FILE.jsonl``: one document a line with a ``text`` field, chat ``messages`` (rendered with
  the model's chat template) or ``prompt`` and ``completion`` (joined), and an optional
  ``domain``;
- ``NAME=FILE``: every document of FILE (``.jsonl`` with ``text``, or plain text) is of
  domain NAME;
- ``val``: the validation split of the first model's training recipe.

Documents are tokenized with the model's tokenizer (EOS appended, as in training), packed into
windows of ``seq_len`` tokens and read line by line: nothing is held beyond one batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.pipeline import render_messages
from ..data.tokenizer import pad_id
from ..jsonl import json_lines

VAL = "val"

Document = str | list[dict[str, Any]]  # plain text, or chat messages


@dataclass
class Source:
    """One data argument: a file, its fixed domain (``NAME=FILE``) or None."""

    path: Path
    domain: str | None = None

    def documents(self) -> Iterator[tuple[str | None, Document]]:
        """``(domain or None, text or messages)`` of every document, in file order."""
        jsonl = self.path.suffix == ".jsonl"
        if not jsonl:
            text = self.path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield self.domain, text
            return
        for number, row in json_lines(self.path):  # a line that is not JSON: a ValueError
            doc = row_document(row)
            if doc is None:
                raise ValueError(
                    f"{self.path}:{number}: no string field 'text', list of 'messages' or "
                    "string 'prompt' and 'completion'"
                )
            dom = row.get("domain") if self.domain is None else self.domain
            yield (None if dom is None else str(dom)), doc


def row_document(row: Any) -> Document | None:
    """The document of a JSON row: its ``text``, its chat ``messages``, or ``prompt`` and
    ``completion`` joined; ``None`` when it has none of them."""
    if not isinstance(row, dict):
        return None
    if isinstance(row.get("text"), str):
        return row["text"]
    messages = row.get("messages")
    if isinstance(messages, list) and all(
        isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages
    ):
        return messages
    if isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        return row["prompt"] + row["completion"]
    return None


def parse_sources(args: list[str]) -> list[Source]:
    """``--data`` arguments as sources; a missing or empty file is an error naming it."""
    sources = []
    for arg in args:
        name, sep, path = arg.partition("=")
        src = Source(Path(path), name) if sep else Source(Path(arg))
        if sep and not name:
            raise ValueError(f"--data {arg!r}: empty domain name before '='")
        if not src.path.is_file():
            raise ValueError(f"--data {arg!r}: no such file {str(src.path)!r}")
        if src.path.stat().st_size == 0:
            raise ValueError(f"--data {arg!r}: {src.path} is empty")
        sources.append(src)
    return sources


def domain_names(sources: list[Source]) -> list[str]:
    """The sorted domain labels of all documents (one streaming pass, no tokenizing);
    empty when no document is labelled. A source without any document is an error."""
    names: set[str] = set()
    for src in sources:
        docs = 0
        for dom, _ in src.documents():
            docs += 1
            if dom is not None:
                names.add(dom)
        if docs == 0:
            raise ValueError(f"{src.path}: holds no document with text")
    return sorted(names)


def text_batches(
    sources: list[Source],
    tokenizer: Any,
    domains: list[str],
    seq_len: int,
    batch_size: int,
    max_tokens: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches ``{input_ids, domain_ids, attention_mask}`` [B,S] of the packed documents;
    unlabelled tokens have domain -1, the padding of the last window attention_mask 0."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token")
    index = {d: i for i, d in enumerate(domains)}
    ids: list[int] = []
    doms: list[int] = []
    rows: list[tuple[list[int], list[int]]] = []
    taken = 0

    def flush(final: bool) -> Iterator[dict[str, torch.Tensor]]:
        if rows and (final or len(rows) == batch_size):
            yield _stack(rows, seq_len, pad_id(tokenizer))
            rows.clear()

    for src in sources:
        for dom, doc in src.documents():
            text = doc if isinstance(doc, str) else render_messages(doc, tokenizer)
            new = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
            ids.extend(new)
            doms.extend([index.get(dom, -1) if dom is not None else -1] * len(new))
            while len(ids) >= seq_len:
                take = seq_len if not max_tokens else min(seq_len, max_tokens - taken)
                rows.append((ids[:take], doms[:take]))
                del ids[:seq_len], doms[:seq_len]
                taken += take
                yield from flush(False)
                if max_tokens and taken >= max_tokens:
                    yield from flush(True)
                    return
    if ids:
        take = len(ids) if not max_tokens else min(len(ids), max_tokens - taken)
        rows.append((ids[:take], doms[:take]))
    yield from flush(True)


def _stack(rows: list[tuple[list[int], list[int]]], seq_len: int, pad: int) -> dict[str, Any]:
    n = len(rows)
    input_ids = torch.full((n, seq_len), pad, dtype=torch.long)
    domain_ids = torch.full((n, seq_len), -1, dtype=torch.long)
    mask = torch.zeros(n, seq_len, dtype=torch.long)
    for i, (x, d) in enumerate(rows):
        input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        domain_ids[i, : len(d)] = torch.tensor(d, dtype=torch.long)
        mask[i, : len(x)] = 1
    return {"input_ids": input_ids, "domain_ids": domain_ids, "attention_mask": mask}


def dataset_batches(
    dataset: Any, batch_size: int, max_tokens: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of a training-data split (its rows as the trainer sees them)."""
    taken = 0
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        if max_tokens:
            mask = batch.setdefault("attention_mask", torch.ones_like(batch["input_ids"]))
            room = max_tokens - taken
            flat = mask.reshape(-1)
            keep = flat.cumsum(0) <= room
            mask.view(-1)[:] = flat * keep
            taken += int(mask.sum())
        yield batch
        if max_tokens and taken >= max_tokens:
            return
