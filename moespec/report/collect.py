"""Run one model over the report's data in eval mode and gather its routing statistics."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..data.batches import model_inputs, token_context
from ..routing import clear_router_losses, set_token_context
from .probe import routing_probe
from .stats import ReportStats, layer_summary, top_tokens

Batches = Callable[[], Iterable[dict[str, torch.Tensor]]]


@dataclass
class ReportOptions:
    """What the statistics keep: top tokens per expert, snippets, near-dead threshold."""

    top_n: int = 10
    min_count: int = 5  # a token needs this many slots of an expert to rank by lift
    snippets: int = 2  # in-context examples per top token (0: none)
    snippet_tokens: int = 6  # tokens of context either side
    near_dead: float = 0.1  # load below this × 1/E
    progress: bool = True


@dataclass
class Collected:
    """The per-layer statistics of one model and the tokens they cover."""

    stats: list[ReportStats]
    layer_indices: list[int]
    tokens: int
    snippets: dict[tuple[int, int, int], list[tuple[list[int], int]]] = field(default_factory=dict)


def _forward(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> None:
    ids = batch["input_ids"].to(device)
    set_token_context(model, token_context(batch, device))
    model(ids, **model_inputs(batch, device))
    clear_router_losses(model)


def _progress(batches: Iterable[dict[str, torch.Tensor]], on: bool, what: str) -> Iterator[Any]:
    on = on and sys.stderr.isatty()  # no bar frames in a log file
    bar = tqdm(unit="tok", unit_scale=True, desc=what, disable=not on, file=sys.stderr)
    try:
        for batch in batches:
            yield batch
            mask = batch.get("attention_mask")
            bar.update(int(mask.sum()) if mask is not None else batch["input_ids"].numel())
    finally:
        bar.close()


@torch.no_grad()
def collect(
    model: nn.Module,
    batches: Batches,
    vocab_size: int,
    num_domains: int,
    opts: ReportOptions,
    name: str = "",
) -> Collected:
    """One pass over ``batches()`` with the report probe on every router (eval mode)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with routing_probe(model, vocab_size, num_domains) as probe:
            for batch in _progress(batches(), opts.progress, f"report {name}".strip()):
                probe.set_tokens(batch["input_ids"], batch.get("attention_mask"))
                _forward(model, batch, device)
            layers = [r.layer_index if r.layer_index is not None else i
                      for i, r in enumerate(probe.routers)]  # fmt: skip
            out = Collected(probe.stats, layers, int(probe.stats[0].tokens))
        if opts.snippets and out.tokens:
            out.snippets = _find_snippets(model, batches, out, opts, device)
    finally:
        set_token_context(model, None)
        model.train(was_training)
    return out


def _find_snippets(
    model: nn.Module,
    batches: Batches,
    collected: Collected,
    opts: ReportOptions,
    device: torch.device,
) -> dict[tuple[int, int, int], list[tuple[list[int], int]]]:
    """Second pass: the first ``opts.snippets`` contexts of each (layer, expert, top token)
    routed to that expert, as (window of token ids, position of the token in it).
    Stops as soon as every slot is filled."""
    wanted: dict[tuple[int, int, int], list[tuple[list[int], int]]] = {}
    needed = []  # per layer: [E,V] True while (expert, token) still wants a snippet
    for li, s in enumerate(collected.stats):
        need = torch.zeros(s.num_experts, s.vocab_size, dtype=torch.bool)
        for e in range(s.num_experts):
            share, lift = top_tokens(s, e, opts.top_n, opts.min_count)
            for row in share + lift:
                wanted[(li, e, row["token"])] = []
                need[e, row["token"]] = True
        needed.append(need)
    w = opts.snippet_tokens
    with routing_probe(model, collected.stats[0].vocab_size, 0) as probe:
        for batch in batches():
            if not any(bool(n.any()) for n in needed):
                break
            mask = batch.get("attention_mask")
            probe.set_tokens(batch["input_ids"], mask)
            _forward(model, batch, device)
            ids = batch["input_ids"]
            real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
            rows, cols = torch.nonzero(real, as_tuple=True)
            tok = ids[rows, cols]
            for li, s in enumerate(probe.stats):
                idx = s.last_idx()
                hits = torch.nonzero(needed[li][idx, tok[:, None]], as_tuple=False)
                for t, j in hits.tolist():
                    e, v, r, c = int(idx[t, j]), int(tok[t]), int(rows[t]), int(cols[t])
                    slot = wanted[(li, e, v)]
                    if len(slot) >= opts.snippets:
                        continue
                    lo = max(0, c - w)
                    window = ids[r, lo : c + w + 1][real[r, lo : c + w + 1]].tolist()
                    slot.append((window, c - lo))
                    if len(slot) >= opts.snippets:
                        needed[li][e, v] = False
    return wanted


def summarise(collected: Collected, opts: ReportOptions) -> list[dict[str, Any]]:
    """:func:`layer_summary` of every layer, with its layer index."""
    return [
        {"layer": li, **layer_summary(s, near_dead=opts.near_dead, top_n=opts.top_n,
                                      min_count=opts.min_count)}
        for li, s in zip(collected.layer_indices, collected.stats)
    ]  # fmt: skip
