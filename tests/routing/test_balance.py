"""The balance budget: the variance cap against the gradients it compares, the yield against
a plain loop, the weighted total with yields, calibration under the cap, relative load metrics,
the collapse alarm for any E and k, and the budget's bad input."""

import math

import pytest
import torch

from moespec.models import TinyMoEConfig, TinyMoELM
from moespec.moe import MoEConfig
from moespec.routing import LossConfig, Router, RouterConfig, collect_router_losses, iter_routers
from moespec.routing import losses as L
from moespec.routing.balance import (
    COUNT_DECAY,
    BalanceBudget,
    restore_budgets,
    variance_weight_cap,
)
from moespec.routing.config import BalanceConfig
from moespec.routing.losses import validate_loss_config
from moespec.routing.metrics import CollapseMonitor, RoutingStats, relative_load_metrics
from moespec.routing.router import balance_state, restore_balance, steer_balance


@pytest.mark.parametrize("e,k,b", [(4, 2, 0.5), (8, 2, 0.3), (16, 4, 1.0)])
def test_variance_cap_equates_the_two_pulls_it_compares(e, k, b):
    """At γ = cap, the variance loss's pull on a one-hot token's top score equals the aux
    loss's pull back on an expert whose load violation is b·(E/k − 1), both by autograd."""
    t, alpha = 1000 * e, 0.01
    vio = b * (e / k - 1)  # the budget's violation, on expert 0
    first = round((1 + vio) / e * t * k)
    others = torch.arange(t * k - first) % (e - 1) + 1
    idx = torch.cat([torch.zeros(first, dtype=torch.long), others]).view(t, k)
    scores = torch.full((t, e), 1.0 / e, requires_grad=True)
    (g_aux,) = torch.autograd.grad(alpha * L.load_balancing_loss(scores, idx, e), scores)
    pull_back = float(g_aux[0, 0] - g_aux[0].mean())  # projected on the simplex
    assert pull_back == pytest.approx(alpha * vio / t, rel=1e-3)
    onehot = torch.zeros(t, e)
    onehot[:, 0] = 1.0
    onehot.requires_grad_(True)
    gamma = variance_weight_cap(alpha, b, e, k)
    (g_var,) = torch.autograd.grad(gamma * L.variance_loss(onehot), onehot)
    pull_up = float(g_var[0, 0] - g_var[0].mean())
    assert pull_up == pytest.approx(alpha * vio / t, rel=1e-5)


def _plain_yield(shares: list[list[float]], top_k: int, budget: float, rate: float, floor: float):
    """The controller as a plain loop: moving average, relative MaxVio, one signed step."""
    log_y, avg = 0.0, None
    for share in shares:
        share = [s / sum(share) for s in share]
        avg = share if avg is None else [COUNT_DECAY * a + (1 - COUNT_DECAY) * s
                                         for a, s in zip(avg, share)]  # fmt: skip
        mean = sum(avg) / len(avg)
        rel = max(abs(a - mean) for a in avg) / mean / (len(avg) / top_k - 1)
        log_y += -rate if rel > budget else rate
        log_y = min(0.0, max(math.log(floor), log_y))
    return math.exp(log_y)


def test_yield_follows_a_plain_loop():
    torch.manual_seed(0)
    budget = BalanceBudget(4, 2, BalanceConfig(max_maxvio=0.3, rate=0.2, min_yield=0.05))
    shares = []
    for step in range(90):  # balanced, then collapsing onto two experts, then balanced again
        skew = 0.9 if 10 <= step < 25 else 0.0
        p = torch.tensor([1 + 3 * skew, 1 + 3 * skew, 1 - skew, 1 - skew]) + 0.05 * torch.rand(4)
        shares.append(p.tolist())
        budget.steer(p.double() * 1000)
        expect = _plain_yield(shares, 2, 0.3, 0.2, 0.05)
        assert budget.factor == pytest.approx(expect, rel=1e-9), step
    assert _plain_yield(shares[:25], 2, 0.3, 0.2, 0.05) < 0.2  # it did yield in between
    assert budget.factor == 1.0  # and recovered


def _model(budget=0.5, num_layers=2, var="auto", seed=0) -> TinyMoELM:
    torch.manual_seed(seed)
    loss = LossConfig()
    loss.aux.weight = 0.01
    loss.orthogonality.weight, loss.orthogonality.variant = 0.1, "cosine"
    loss.variance.weight, loss.variance.target = var, 1e-4
    loss.balance.max_maxvio = budget
    return TinyMoELM(
        TinyMoEConfig(
            vocab_size=64, hidden_size=32, num_layers=num_layers, num_heads=2, max_seq_len=16
        ),
        MoEConfig(num_experts=4, top_k=2, ffn_size=32),
        loss,
    )


def test_weighted_total_with_yields_matches_a_plain_sum():
    model = _model(var=0.2)
    routers = iter_routers(model)
    routers[0].balance.log_yield, routers[1].balance.log_yield = math.log(0.5), math.log(0.1)
    model(torch.randint(0, 64, (2, 16)))
    raw = [{n: float(v.detach()) for n, v in r.raw_losses.items()} for r in routers]
    got = collect_router_losses(model)
    expect = sum(
        0.01 * layer["aux"] + 0.1 * layer["orthogonality"] - 0.2 * y * layer["variance"]
        for layer, y in zip(raw, (0.5, 0.1))
    )
    assert float(got.total) == pytest.approx(expect, rel=1e-6)
    assert got.yields == pytest.approx([0.5, 0.1])
    assert got.in_force["variance"] == pytest.approx(0.2 * (0.5 + 0.1) / 2)
    assert got.in_force["orthogonality"] == pytest.approx(0.1)  # reads no score: never yields
    assert got.contributions["variance"] == pytest.approx(
        -0.2 * (0.5 * raw[0]["variance"] + 0.1 * raw[1]["variance"]), rel=1e-6
    )


@pytest.mark.parametrize("budget", [0.5, 0.05, None])
def test_calibration_caps_the_variance_weight(budget):
    model = _model(budget=budget)
    model(torch.randint(0, 64, (2, 16)))
    routers = iter_routers(model)
    lv = sum(float(r.raw_losses["variance"]) for r in routers) / len(routers)
    got = collect_router_losses(model)
    paper = 10 ** round(math.log10(1e-4 / lv))
    cap = math.inf if budget is None else 0.01 * budget * 4 * (4 / 2 - 1) / 2
    assert got.calibrated["variance"] == pytest.approx(min(paper, cap))
    assert ("variance" in got.calibration_capped) == (cap < paper)


def test_steer_counts_training_tokens_and_restores_from_state():
    model = _model(budget=0.01)  # any imbalance is above it: every step yields
    model.train()
    for _ in range(3):
        model(torch.randint(0, 64, (2, 16)))
        collect_router_losses(model)
        steer_balance(model)
    factors = [r.balance.factor for r in iter_routers(model)]
    assert factors == pytest.approx([math.exp(-0.3)] * 2)
    model.eval()
    model(torch.randint(0, 64, (2, 16)))  # evaluation counts nothing
    assert all(r.balance.counts is None for r in iter_routers(model))
    state = balance_state(model)
    fresh = _model(budget=0.01, seed=1)
    restore_balance(fresh, state)
    assert [r.balance.factor for r in iter_routers(fresh)] == pytest.approx(factors)
    with pytest.raises(ValueError, match=r"loss\.balance\.max_maxvio=0\.5 .* trained with 0\.01"):
        restore_balance(_model(budget=0.5), state)
    with pytest.raises(ValueError, match="2 MoE layers, the model has 3"):
        restore_balance(_model(budget=0.01, num_layers=3), state)


@pytest.mark.parametrize("e,k", [(4, 2), (8, 2), (128, 8)])
def test_relative_load_metrics_at_the_extremes(e, k):
    uniform = torch.full((e,), 10.0)
    collapsed = torch.zeros(e)
    collapsed[:k] = 10.0
    assert relative_load_metrics(uniform, k) == pytest.approx(
        {"relative_maxvio": 0.0, "relative_load_entropy": 1.0}
    )
    assert relative_load_metrics(collapsed, k) == pytest.approx(
        {"relative_maxvio": 1.0, "relative_load_entropy": 0.0}, abs=1e-6
    )


def _window(counts: list[float], k: int) -> dict[str, float]:
    stats = RoutingStats(len(counts), k)
    idx = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts).long())
    stats.update(torch.full((idx.numel() // k, len(counts)), 1 / len(counts)), idx.view(-1, k))
    return stats.compute()


@pytest.mark.parametrize("e,k", [(4, 2), (8, 2), (128, 8)])
def test_collapse_alarm_fires_for_any_experts_and_top_k(e, k):
    """Two experts of four taking every token (MaxVio 1.0, the largest possible for top-2)
    fired no alarm under the old absolute bound; the relative one fires after the patience."""
    collapsed = [4.0] * k + [0.0] * (e - k)
    near = [4.0] * k + [0.01] * (e - k)  # not dead, still collapsed
    healthy = [4.0 + (i % 2) for i in range(e)]
    starved = [4.0] * (e - 1) + [0.01]  # MaxVio near its largest for E = 2k, load still spread
    for counts, fires in ((near, True), (healthy, False), (starved, False)):
        monitor = CollapseMonitor(patience=3)
        window = _window([c * 100 * k for c in counts], k)
        alarms = [monitor.update([window]) for _ in range(4)]
        assert [bool(a) for a in alarms] == ([False, False, True, False] if fires else [False] * 4)
        if fires:
            assert "routing collapse" in alarms[2][0]
    monitor = CollapseMonitor(patience=2)
    window = _window([c * 100 * k for c in collapsed], k)
    got = [monitor.update([window]) for _ in range(2)]
    assert any("dead" in a for a in got[1]) and any("collapse" in a for a in got[1])


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("max_maxvio", 0.0, r"loss\.balance\.max_maxvio must be in \(0, 1\]"),
        ("max_maxvio", 1.5, r"loss\.balance\.max_maxvio must be in \(0, 1\]"),
        ("max_maxvio", float("nan"), r"loss\.balance\.max_maxvio"),
        ("rate", -1.0, r"loss\.balance\.rate"),
        ("min_yield", 0.0, r"loss\.balance\.min_yield"),
    ],
)
def test_bad_budget_names_the_key(field, value, match):
    loss = LossConfig()
    setattr(loss.balance, field, value)
    with pytest.raises(ValueError, match=match):
        validate_loss_config(loss)


def test_user_loss_reading_scores_yields_and_a_bad_target_is_refused():
    @L.routing_loss("test_balance_peak", reads="scores", maximise=True)
    def peak(scores):
        return scores.max(-1).values.mean()

    try:
        assert L.LOSSES["test_balance_peak"].yields
        assert not L.LOSSES["orthogonality"].yields and L.LOSSES["variance"].yields
        loss = LossConfig()
        loss.terms = {"test_balance_peak": {"weight": "auto", "target": -1.0}}
        with pytest.raises(ValueError, match=r"terms\.test_balance_peak\.target"):
            validate_loss_config(loss)
    finally:
        del L.LOSSES["test_balance_peak"]


def test_router_without_budget_never_yields():
    r = Router(8, RouterConfig(num_experts=4, top_k=2))
    r.train()
    r(torch.randn(16, 8))
    assert not r.balance.enabled and r.balance.counts is None
    restore_budgets([r.balance], None)  # nothing stored: nothing to do


def test_a_restored_weight_above_the_cap_is_capped():
    """A checkpoint from before the cap (or trained with a larger α) resumes under the cap."""
    model = _model(budget=0.5)
    for r in iter_routers(model):
        r.loss_weights.set("variance", 1.0)  # as the paper's rule left it
    lowered = restore_balance(model, None)
    cap = variance_weight_cap(0.01, 0.5, 4, 2)
    assert lowered == {"variance": (1.0, pytest.approx(cap))}
    assert all(r.loss_weights.value("variance") == pytest.approx(cap) for r in iter_routers(model))
    assert restore_balance(model, None) == {}  # already within the cap


def test_relative_maxvio_stays_within_one_when_k_is_over_half_of_e():
    dead = torch.tensor([10.0, 10.0, 10.0, 10.0, 10.0, 0.0])  # E = 6, k = 4: E/k - 1 = 0.5
    assert relative_load_metrics(dead, 4)["relative_maxvio"] == pytest.approx(1.0)
    assert not BalanceBudget(
        4, 4, BalanceConfig(max_maxvio=0.5)
    ).enabled  # k = E: nothing to balance
