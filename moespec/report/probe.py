"""Attach report statistics to every moespec router of a model for the length of a block.

The routers already compute routing statistics on each forward (their ``stats``) and receive
each token's k raw expert outputs (``record_expert_outputs``) from every backend and from
Hugging Face models. The probe swaps in a :class:`ReportStats` and wraps that method on the
router instance, so the report reads exactly what training reads; both are undone on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..routing import Router, iter_routers
from .stats import ReportStats


class RoutingProbe:
    """The :class:`ReportStats` of each router, and the token ids of the coming forward."""

    def __init__(self, routers: list[Router], stats: list[ReportStats]) -> None:
        self.routers = routers
        self.stats = stats
        self._mask: torch.Tensor | None = None

    def set_tokens(self, input_ids: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Before a forward: the flat token ids [T] and the real-token mask [T] (None: all)."""
        ids = input_ids.reshape(-1).cpu()
        self._mask = None if mask is None else mask.reshape(-1).bool().cpu()
        routed = ids if self._mask is None else ids[self._mask]
        for s in self.stats:
            s.token_ids = routed

    def _record(self, stats: ReportStats, original: Callable[..., None]) -> Callable[..., None]:
        def record(outputs: torch.Tensor, kept: torch.Tensor | None = None) -> None:
            idx, mask = stats.last_idx(), self._mask
            if idx is not None:
                rows_out, rows_idx = mask, None  # outputs cover all T (or kept) tokens
                if kept is not None:
                    kept = kept.cpu()
                    rows_out = None if mask is None else mask[kept]
                    rows_idx = kept if mask is None else kept[mask]
                y = outputs if rows_out is None else outputs[rows_out.to(outputs.device)]
                stats.update_similarity(y, idx if rows_idx is None else idx[rows_idx])
            if kept is None:
                original(outputs)
            else:
                original(outputs, kept=kept.to(outputs.device))

        return record


@contextlib.contextmanager
def routing_probe(model: nn.Module, vocab_size: int, num_domains: int) -> Iterator[RoutingProbe]:
    """``with routing_probe(model, V, D) as probe``: report statistics on every router."""
    routers = iter_routers(model)
    if not routers:
        raise ValueError("the model has no moespec router (not a MoE model moespec can probe)")
    saved: list[tuple[Router, Any, Any, bool]] = []
    stats = [ReportStats(r.num_experts, vocab_size, num_domains) for r in routers]
    probe = RoutingProbe(routers, stats)
    try:
        for r, s in zip(routers, stats):
            own = "record_expert_outputs" in r.__dict__
            saved.append((r, r.stats, r.__dict__.get("record_expert_outputs"), own))
            r.stats = s
            object.__setattr__(
                r, "record_expert_outputs", probe._record(s, r.record_expert_outputs)
            )
        yield probe
    finally:
        for r, old_stats, old_record, own in saved:
            r.stats = old_stats
            if own:
                object.__setattr__(r, "record_expert_outputs", old_record)
            else:
                r.__dict__.pop("record_expert_outputs", None)
