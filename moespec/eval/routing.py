"""Routing statistics of an evaluation pass, kept apart from the training window.

    with EvalRouting(model) as routing:
        ...forwards over the evaluation batches...
        figures = routing.figures(all_reduce=True)

Inside the block every router counts from zero with statistics on (expert outputs included,
so output overlap is measured); on leaving it, even by an error, each router gets back the
window and the ``track_stats`` switch it had, and drops the pass's token context and losses,
so evaluation neither shows in nor disturbs the training metrics.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..routing import clear_router_losses, collect_routing_stats, iter_routers, set_token_context
from ..routing.metric_table import shown_in
from ..routing.metrics import load_fraction, routing_metrics

#: The layer means logged for an evaluation pass (besides each layer's expert load).
SUMMARY = tuple(m.name for m in shown_in("eval"))


def load_figures(loads: list[list[float]]) -> dict[str, float]:
    """``layer{i}/routing/load/expert{e}``: share of the layer's routed slots taken by e."""
    return {
        f"layer{i}/routing/load/expert{e}": float(share)
        for i, layer in enumerate(loads)
        for e, share in enumerate(layer)
    }


class EvalRouting:
    """Sets the routers' statistics aside for an evaluation pass and restores them after."""

    def __init__(self, model: nn.Module) -> None:
        self.routers = iter_routers(model)
        self.model = model
        self._saved: list[tuple[dict[str, Any], bool]] = []

    def __enter__(self) -> EvalRouting:
        self._saved = [(r.stats.state_dict(), r.track_stats) for r in self.routers]
        for r in self.routers:
            r.stats.reset()
            r.track_stats = True
        return self

    def figures(self, *, all_reduce: bool) -> dict[str, float]:
        """The pass's ``routing/<name>`` of :data:`SUMMARY` (layers reduced as in training) and
        each layer's expert load; ``all_reduce``: sum the counts of all ranks first (for
        batches sharded over ranks)."""
        per_layer = collect_routing_stats(self.model, reset=False, all_reduce=all_reduce)
        reductions = {k: v for r in self.routers for k, v in r.stats.reductions().items()}
        layers = routing_metrics(per_layer, reductions)
        out = {f"routing/{k}": layers[f"routing/{k}"] for k in SUMMARY if f"routing/{k}" in layers}
        out.update(
            load_figures([load_fraction(r.stats.slot_counts).tolist() for r in self.routers])
        )
        return out

    def __exit__(self, *exc: object) -> None:
        clear_router_losses(self.model)
        set_token_context(self.model, None)
        for r, (state, track) in zip(self.routers, self._saved):
            r.stats.load_state_dict(state)
            r.track_stats = track
