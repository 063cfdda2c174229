"""Rows of ``seq_len`` positions from tokenized examples: packing, padding, length grouping.

An example of ``n`` tokens with its 0/1 ``trained`` flags takes ``n - 1`` positions of a row:
inputs ``ids[:-1]`` and labels aligned with them (label ``t`` is ``ids[t+1]`` where that token
is trained, else ``-100``), so no label ever crosses from one example into the next. It fits a
row when ``n - 1 <= seq_len``.

:func:`best_fit_decreasing` places examples into rows (TRL's ``pack_dataset`` strategy
``bfd``); :class:`ExampleRows` serves the rows, packed or one example per row, padded to
``seq_len``; :func:`length_grouped_order` is the sampler order that batches examples of
similar length when they are not packed.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

IGNORE_INDEX = -100
#: Global batches per length group of :func:`length_grouped_order` (as transformers' 50).
LENGTH_GROUP_BATCHES = 50

BATCH_KEYS = ("input_ids", "labels", "domain_ids", "position_ids", "document_ids", "attention_mask")


def best_fit_decreasing(lengths: Sequence[int] | np.ndarray, capacity: int) -> list[list[int]]:
    """Bins (lists of item indices) holding items of ``lengths`` within ``capacity`` each.

    Items go longest first (ties: lower index first), each into the open bin with the least
    room that still fits it (ties: the bin opened first), or into a new bin. Bins are listed in
    the order they were opened, their items in the order they were placed. Deterministic.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    if len(lengths) and (lengths.min() < 1 or lengths.max() > capacity):
        raise ValueError(f"item lengths must be in [1, {capacity}]")
    size = 1 << max(capacity - 1, 0).bit_length()  # leaves: room 1..capacity
    tree = [0] * (2 * size)  # max room available in each subtree (0: none)
    open_bins: dict[int, list[int]] = {}  # room -> min-heap of bin numbers

    def set_leaf(room: int, value: int) -> None:
        i = size + room - 1
        tree[i] = value
        i >>= 1
        while i:
            left, right = tree[2 * i], tree[2 * i + 1]
            tree[i] = left if left >= right else right
            i >>= 1

    bins: list[list[int]] = []
    for idx in np.argsort(-lengths, kind="stable").tolist():
        n = int(lengths[idx])
        if tree[1] >= n:  # the smallest room >= n: the leftmost leaf holding >= n
            i = 1
            while i < size:
                i = 2 * i if tree[2 * i] >= n else 2 * i + 1
            room = i - size + 1
            heap = open_bins[room]
            b = heapq.heappop(heap)
            if not heap:
                set_leaf(room, 0)
        else:
            b, room = len(bins), capacity
            bins.append([])
        bins[b].append(idx)
        rest = room - n
        if rest > 0:
            heap = open_bins.setdefault(rest, [])
            if not heap:
                set_leaf(rest, rest)
            heapq.heappush(heap, b)
    return bins


def length_grouped_order(
    lengths: np.ndarray, global_batch: int, rng: np.random.Generator
) -> np.ndarray:
    """A permutation of ``range(len(lengths))`` whose consecutive ``global_batch`` blocks hold
    examples of similar length, in a shuffled block order.

    A random permutation is cut into groups of :data:`LENGTH_GROUP_BATCHES` global batches;
    each group is sorted by length (longest first, stable), cut into global batches, and the
    full global batches of all groups are shuffled. A partial last batch stays last.
    """
    n = len(lengths)
    lengths = np.asarray(lengths)
    perm = rng.permutation(n)
    group = global_batch * LENGTH_GROUP_BATCHES
    order = np.concatenate(
        [perm[i : i + group][np.argsort(-lengths[perm[i : i + group]], kind="stable")]
         for i in range(0, n, group)]
        or [perm]
    )  # fmt: skip
    full = n // global_batch
    blocks = order[: full * global_batch].reshape(full, global_batch)[rng.permutation(full)]
    return np.concatenate([blocks.reshape(-1), order[full * global_batch :]])


@dataclass
class RowStats:
    """What happened to one split's examples on their way into rows."""

    examples: int = 0
    too_long: int = 0  # longer than seq_len positions (dropped or truncated)
    truncated: int = 0
    untrained: int = 0  # dropped: no trained token left (after any truncation)
    kept: int = 0
    rows: int = 0


class ExampleRows(Dataset):
    """Rows of ``seq_len`` positions built from tokenized examples.

    ``tokens``/``trained`` are the examples' tokens and 0/1 trained flags back to back,
    example ``e`` at ``offsets[e]:offsets[e+1]``; ``domains`` is one domain id per example
    (-1: none). Examples longer than ``seq_len`` positions are dropped (``truncation="drop"``)
    or cut to their first ``seq_len + 1`` tokens (``"truncate"``); an example left without a
    trained label is dropped. With ``packing`` the rows hold several examples each
    (:func:`best_fit_decreasing`), otherwise one; either way they are padded to ``seq_len``.

    Item ``i`` is a dict of int64 tensors of shape ``[seq_len]``: ``input_ids`` (``pad_id`` on
    padding), ``labels`` (-100 where not trained and on padding), ``domain_ids`` (-1 on
    padding), ``position_ids`` (restarting at 0 with each example; 0 on padding),
    ``document_ids`` (0, 1, ... for the examples of the row; -1 on padding) and
    ``attention_mask`` (1 on real tokens, 0 on padding).
    """

    def __init__(
        self,
        tokens: np.ndarray,
        trained: np.ndarray,
        offsets: np.ndarray,
        domains: np.ndarray,
        seq_len: int,
        *,
        pad_id: int,
        packing: bool = True,
        truncation: str = "drop",
    ) -> None:
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        if truncation not in ("drop", "truncate"):
            raise ValueError(f"truncation must be 'drop' or 'truncate', got {truncation!r}")
        self.tokens, self.trained, self.domains = tokens, trained, domains
        self.seq_len, self.pad_id, self.packing = seq_len, int(pad_id), packing
        offsets = np.asarray(offsets, dtype=np.int64)
        starts, n_tok = offsets[:-1], np.diff(offsets)
        long = n_tok - 1 > seq_len
        if truncation == "truncate":
            n_tok = np.minimum(n_tok, seq_len + 1)
            keep = np.ones(len(n_tok), dtype=bool)
        else:
            keep = ~long
        # trained targets among tokens 1..n-1 of each (possibly truncated) example
        csum = np.concatenate([[0], np.cumsum(np.asarray(trained, dtype=np.int64))])
        has_target = (n_tok >= 2) & (
            csum[starts + n_tok] - csum[np.minimum(starts + 1, offsets[-1])] > 0
        )
        untrained = keep & ~has_target
        keep &= has_target
        self.example_starts = starts[keep]
        self.example_positions = n_tok[keep] - 1
        self.example_domains = np.asarray(domains, dtype=np.int64)[keep]
        if packing:
            bins = best_fit_decreasing(self.example_positions, seq_len)
        else:
            bins = [[i] for i in range(int(keep.sum()))]
        self.row_offsets = np.cumsum([0] + [len(b) for b in bins]).astype(np.int64)
        self.row_items = np.array([i for b in bins for i in b], dtype=np.int64)
        self.stats = RowStats(
            examples=len(n_tok),
            too_long=int(long.sum()),
            truncated=int(long.sum()) if truncation == "truncate" else 0,
            untrained=int(untrained.sum()),
            kept=int(keep.sum()),
            rows=len(bins),
        )

    def __len__(self) -> int:
        return len(self.row_offsets) - 1

    @property
    def group_lengths(self) -> np.ndarray | None:
        """Real tokens per row for a length-grouped sampler; ``None`` when packed."""
        if self.packing:
            return None
        return self.example_positions[self.row_items]

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) input tokens over all rows."""
        return int(self.example_positions.sum())

    def row_examples(self, index: int) -> np.ndarray:
        """Indices (among the kept examples) of the examples in row ``index``."""
        return self.row_items[self.row_offsets[index] : self.row_offsets[index + 1]]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        n_rows = len(self)
        if index < 0:
            index += n_rows
        if not 0 <= index < n_rows:
            raise IndexError(f"index {index} out of range for {n_rows} rows")
        s = self.seq_len
        ids = np.full(s, self.pad_id, dtype=np.int64)
        labels = np.full(s, IGNORE_INDEX, dtype=np.int64)
        dom = np.full(s, -1, dtype=np.int64)
        pos = np.zeros(s, dtype=np.int64)
        doc = np.full(s, -1, dtype=np.int64)
        cur = 0
        for k, e in enumerate(self.row_examples(index).tolist()):
            start, n = int(self.example_starts[e]), int(self.example_positions[e])
            x = np.asarray(self.tokens[start : start + n + 1], dtype=np.int64)
            m = np.asarray(self.trained[start + 1 : start + n + 1]).astype(bool)
            ids[cur : cur + n] = x[:-1]
            labels[cur : cur + n] = np.where(m, x[1:], IGNORE_INDEX)
            dom[cur : cur + n] = self.example_domains[e]
            pos[cur : cur + n] = np.arange(n)
            doc[cur : cur + n] = k
            cur += n
        mask = (doc >= 0).astype(np.int64)
        arrays = (ids, labels, dom, pos, doc, mask)
        return {k: torch.from_numpy(a) for k, a in zip(BATCH_KEYS, arrays)}


__all__ = [
    "BATCH_KEYS",
    "IGNORE_INDEX",
    "LENGTH_GROUP_BATCHES",
    "ExampleRows",
    "RowStats",
    "best_fit_decreasing",
    "length_grouped_order",
]
