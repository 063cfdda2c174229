"""MetricWindow: each entry reduced by its own rule over micro-batches and across ranks."""

from __future__ import annotations

import subprocess

import pytest
import torch

from moespec.routing.metrics import MetricWindow, RoutingStats
from tests.common import ROOT


def test_sum_mean_max_and_counts():
    w = MetricWindow()
    for v in (1.0, 2.0, 6.0):
        w.add("a", v, "sum")
        w.add("m", v)  # mean of three micro-batches
        w.add("x", v, "max")
    w.add("t", 0.5, "mean", count=3)  # a per-token mean over 3 tokens ...
    w.add("t", 1.0, "mean", count=1)  # ... and over 1: (1.5 + 1) / 4
    assert w.values() == {"a": 9.0, "m": 3.0, "t": 0.625, "x": 6.0}
    assert w.count("t") == 4.0
    with pytest.raises(ValueError, match="reported as max and as sum"):
        w.add("a", 1.0, "max")
    with pytest.raises(ValueError, match="valid: sum, mean, max"):
        w.add("b", 1.0, "median")


def test_tensor_entries_grow_and_state_round_trips():
    w = MetricWindow()
    w.add("c", torch.ones(2, 1), "sum")
    w.add("c", torch.ones(2, 3), "sum")
    assert torch.equal(w.get("c"), torch.tensor([[2.0, 1, 1], [2, 1, 1]], dtype=torch.float64))
    again = MetricWindow()
    again.load_state_dict(w.state_dict())
    again.add("c", torch.ones(2, 3), "sum")
    assert float(again.get("c").sum()) == 14.0
    w.reset()
    assert w.values() == {}


def test_routing_stats_match_a_per_token_loop():
    torch.manual_seed(0)
    stats = RoutingStats(4)
    scores = torch.rand(10, 4).softmax(-1)
    idx = scores.topk(2, dim=-1).indices
    stats.update(scores[:6], idx[:6])
    stats.update(scores[6:], idx[6:])
    counts = [0.0] * 4
    for t in range(10):
        for e in idx[t].tolist():
            counts[e] += 1
    variance = sum(float(scores[t].var()) for t in range(10)) / 10
    assert stats.slot_counts.tolist() == counts and stats.tokens == 10
    assert stats.compute()["variance"] == pytest.approx(variance, rel=1e-6)


@pytest.mark.multiproc
def test_all_reduce_over_two_ranks_with_different_entries(torchrun2, train_env, tmp_path):
    cmd = [*torchrun2, str(ROOT / "tests" / "workers" / "metric_window.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=train_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want_counts = torch.tensor([[2.0, 1], [2, 1], [1, 1]], dtype=torch.float64)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["loss"] == pytest.approx(7 / 3)
        assert got["only_rank1"] == 5.0 and got["tokens"] == 30.0 and got["peak"] == 3.0
        assert got["per_token"] == pytest.approx((0.5 * 2 + 1.0 * 3) / 5)
        assert torch.equal(got["counts"], want_counts)
