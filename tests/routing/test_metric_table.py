"""The routing metric table: every place that shows routing metrics reads it, and each metric
it names is computed by the routing statistics."""

from __future__ import annotations

import pytest
import torch

from moespec.routing.metric_table import PLACES, ROUTING_METRICS, layer_reductions, shown_in
from moespec.routing.metrics import RoutingStats, routing_metrics


def routed(seed: int = 0, tokens: int = 64, experts: int = 6, k: int = 2):
    g = torch.Generator().manual_seed(seed)
    scores = torch.softmax(torch.randn(tokens, experts, generator=g) * 2, -1)
    return scores, scores.topk(k, -1).indices, torch.randint(0, 3, (tokens,), generator=g)


def test_every_metric_of_the_table_is_computed():
    stats = RoutingStats(6, top_k=2)
    scores, idx, domains = routed()
    stats.update(scores, idx, domains)
    stats.update_overlap(0.5, 64)
    computed = stats.compute()
    assert {m.name for m in ROUTING_METRICS if m.computed_by == "stats"} <= set(computed)
    assert {m.computed_by for m in ROUTING_METRICS} == {"stats", "dispatch"}


def test_top_expert_share_against_a_per_token_count():
    stats = RoutingStats(6, top_k=2)
    scores, idx, _ = routed(seed=3)
    stats.update(scores, idx)
    counts = [0] * 6
    for row in idx.tolist():
        for e in row:
            counts[e] += 1
    assert stats.compute()["top_expert_share"] == pytest.approx(max(counts) / sum(counts))


def test_the_places_read_the_table():
    from moespec.eval.routing import SUMMARY
    from moespec.report.build import DIFF_METRICS
    from moespec.report.compare import PLOT_METRICS, TABLE_METRICS, VAL_ROUTING_METRICS
    from moespec.report.figures import SUMMARY_METRICS

    names = {place: [m.name for m in shown_in(place)] for place in PLACES}
    assert list(SUMMARY) == names["eval"]
    assert list(DIFF_METRICS) == names["report"]
    assert [n for n, _ in SUMMARY_METRICS] == names["report_figure"]
    assert [k for k, *_ in VAL_ROUTING_METRICS] == [f"val/routing/{n}" for n in names["validation"]]
    routing_rows = [k for k, *_ in TABLE_METRICS if k.startswith("routing/")]
    assert routing_rows == [f"routing/{n}" for n in names["compare"]]
    assert [k for k in PLOT_METRICS if k.startswith("routing/")] == [
        f"routing/{n}" for n in names["plot"]
    ]


def test_layers_combine_by_the_table():
    per_layer = [{"dead_experts": 1.0, "maxvio": 0.2}, {"dead_experts": 2.0, "maxvio": 0.4}]
    out = routing_metrics(per_layer)
    assert layer_reductions()["dead_experts"] == "sum"
    assert out["routing/dead_experts"] == 3.0
    assert out["routing/maxvio"] == pytest.approx(0.3)


def test_an_unknown_place_is_an_error():
    with pytest.raises(ValueError, match="unknown place 'plots'; valid: compare, plot"):
        shown_in("plots")
