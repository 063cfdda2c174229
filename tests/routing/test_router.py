"""Router config validation, stored losses, calibration and the collection function."""

import math

import pytest
import torch

from moespec.models import TinyMoEConfig, TinyMoELM
from moespec.moe import MoEConfig, MoELayer
from moespec.routing import (
    LossConfig,
    Router,
    RouterConfig,
    TokenContext,
    collect_router_losses,
    collect_routing_stats,
    restore_loss_weights,
    set_token_context,
    step_score_biases,
)
from moespec.routing import (
    losses as L,
)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"top_k": 9}, "top_k"),
        ({"top_k": 0}, "top_k"),
        ({"num_experts": 0}, "num_experts"),
        ({"score_func": "tanh"}, "score_func"),
        ({"jitter": -0.1}, "jitter"),
    ],
)
def test_bad_router_config_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Router(16, RouterConfig(**kwargs))


@pytest.mark.parametrize(
    "path,value,field",
    [
        (("aux", "weight"), -1.0, "aux.weight"),
        (("orthogonality", "weight"), float("nan"), "orthogonality.weight"),
        (("variance", "weight"), float("inf"), "variance.weight"),
        (("variance", "weight"), "often", "variance.weight"),
        (("orthogonality", "variant"), "qr", "orthogonality.variant"),
        (("aux", "scope"), "epoch", "aux.scope"),
        (("aux", "weight"), "auto", "aux.weight"),
    ],
)
def test_bad_loss_config_names_field(path, value, field):
    loss = LossConfig()
    setattr(getattr(loss, path[0]), path[1], value)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        Router(16, RouterConfig(loss=loss))


def _router(score_func="softmax", normalize=True, **loss_weights):
    loss = LossConfig()
    loss.aux.weight = loss_weights.get("aux", 1e-2)
    loss.orthogonality.weight = loss_weights.get("orth", 0.5)
    loss.variance.weight = loss_weights.get("var", 0.25)
    loss.z.weight = loss_weights.get("z", 0.0)
    return Router(
        12,
        RouterConfig(
            num_experts=6, top_k=2, score_func=score_func, normalize_topk=normalize, loss=loss
        ),
    )


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_router_outputs_and_stored_losses(score_func):
    torch.manual_seed(0)
    r = _router(score_func, z=1e-3)
    x = torch.randn(20, 12)
    out = r(x)
    logits = x @ r.weight.T
    probs = logits.softmax(-1) if score_func == "softmax" else logits.sigmoid()
    dist = probs / probs.sum(-1, keepdim=True)
    torch.testing.assert_close(out.scores, dist)
    assert out.idx.tolist() == probs.topk(2, -1).indices.tolist()
    w = probs.gather(1, out.idx)
    torch.testing.assert_close(out.gate_weights, w / w.sum(-1, keepdim=True))
    torch.testing.assert_close(r.raw_losses["aux"], L.load_balancing_loss(dist, out.idx, 6))
    torch.testing.assert_close(r.raw_losses["variance"], L.variance_loss(dist))
    torch.testing.assert_close(r.raw_losses["z"], L.z_loss(logits))


def test_collect_weighted_total_matches_formula():
    torch.manual_seed(1)
    layer = MoELayer(12, 16, _router().config)
    layer(torch.randn(30, 12))
    raw = dict(layer.router.raw_losses)
    got = collect_router_losses(layer)
    expect = 1e-2 * raw["aux"] + 0.5 * raw["orthogonality"] - 0.25 * raw["variance"]
    torch.testing.assert_close(got.total, expect)
    assert set(got.per_layer[0]) == {"aux", "orthogonality", "variance"}


def test_auto_calibration_sets_power_of_ten_on_all_layers():
    model = _auto_model(num_layers=3)
    model(torch.randint(0, 64, (2, 16)))
    routers = [m.router for m in model.modules() if isinstance(m, MoELayer)]
    lo = sum(float(r.raw_losses["orthogonality"].detach()) for r in routers) / 3
    lv = sum(float(r.raw_losses["variance"].detach()) for r in routers) / 3
    got = collect_router_losses(model)
    assert got.calibrated["orthogonality"] == pytest.approx(10 ** round(math.log10(1e-4 / lo)))
    assert got.calibrated["variance"] == pytest.approx(10 ** round(math.log10(1e-3 / lv)))
    assert got.calibration_raw == pytest.approx({"orthogonality": lo, "variance": lv})
    for r in routers:
        assert r.loss_weights.value("orthogonality") == got.calibrated["orthogonality"]
    state = model.state_dict()
    stored = [v for k, v in state.items() if k.endswith("loss_weights.orthogonality")]
    assert len(stored) == 3  # travels with checkpoints
    assert all(float(v) == got.calibrated["orthogonality"] for v in stored)
    assert collect_router_losses(model).calibrated is None  # only once


def _auto_model(seed: int = 2, num_layers: int = 2) -> TinyMoELM:
    torch.manual_seed(seed)
    loss = LossConfig()
    loss.orthogonality.weight = loss.variance.weight = "auto"
    return TinyMoELM(
        TinyMoEConfig(
            vocab_size=64, hidden_size=32, num_layers=num_layers, num_heads=2, max_seq_len=16
        ),
        MoEConfig(num_experts=4, top_k=2, ffn_size=32),
        loss,
    )


def test_calibration_waits_for_a_training_forward():
    model = _auto_model()
    ids = torch.randint(0, 64, (2, 16))
    model.eval()  # no orthogonality loss in eval: β must not be fixed at 0 from it
    model(ids)
    got = collect_router_losses(model)
    assert "orthogonality" not in (got.calibrated or {})
    routers = [m.router for m in model.modules() if isinstance(m, MoELayer)]
    assert all(math.isnan(r.loss_weights.value("orthogonality")) for r in routers)
    assert math.isfinite(got.total.item())  # the uncalibrated term is left out, not NaN
    model.train()
    model(ids)
    lo = sum(float(r.raw_losses["orthogonality"].detach()) for r in routers) / len(routers)
    got = collect_router_losses(model)
    assert got.calibrated["orthogonality"] == pytest.approx(10 ** round(math.log10(1e-4 / lo)))
    assert got.calibrated["orthogonality"] > 0


def test_calibration_refuses_a_non_finite_raw_loss():
    model = _auto_model()
    model(torch.randint(0, 64, (2, 16)))
    routers = [m.router for m in model.modules() if isinstance(m, MoELayer)]
    routers[0].raw_losses["variance"] = torch.tensor(math.nan)
    with pytest.raises(FloatingPointError, match="loss.variance.weight=auto"):
        collect_router_losses(model)


def test_restore_after_checkpoint_load_config_wins_for_fixed_weights():
    old_loss = LossConfig()
    old_loss.aux.weight, old_loss.orthogonality.weight, old_loss.variance.weight = 0.01, 0.5, "auto"
    old = Router(8, RouterConfig(num_experts=4, loss=old_loss))
    old.loss_weights.set("variance", 0.1)  # calibrated in the first run
    new_loss = LossConfig()
    new_loss.aux.weight, new_loss.orthogonality.weight, new_loss.variance.weight = 0.0, 0.25, "auto"
    new = Router(8, RouterConfig(num_experts=4, loss=new_loss))
    new.load_state_dict(old.state_dict())
    assert new.loss_weights.as_dict()["aux"] == 0.01  # the checkpoint's, until restored
    changed = restore_loss_weights(new)
    want = {"aux": 0.0, "orthogonality": 0.25, "variance": 0.1, "z": 0.0}
    assert new.loss_weights.as_dict() == want
    assert changed == {"aux": (0.01, 0.0), "orthogonality": (0.5, 0.25)}
    # A router kept out of the module state (Hugging Face probes): auto weights from the record.
    bare = Router(8, RouterConfig(num_experts=4, loss=new_loss))
    changed = restore_loss_weights(
        bare, {"aux": 0.01, "orthogonality": 0.5, "variance": 0.1, "z": 0.0}
    )
    assert bare.loss_weights.as_dict() == want
    # ... and the changed fixed weights are reported from the record as well.
    assert changed == {"aux": (0.01, 0.0), "orthogonality": (0.5, 0.25)}


def test_checkpoint_of_the_greek_buffer_names_still_loads():
    loss = LossConfig()
    loss.variance.weight = "auto"
    new = Router(8, RouterConfig(num_experts=4, loss=loss))
    legacy = {
        k.replace("loss_weights.aux", "loss_weights.alpha")
        .replace("loss_weights.orthogonality", "loss_weights.beta")
        .replace("loss_weights.variance", "loss_weights.gamma")
        .replace("loss_weights.z", "loss_weights.zeta"): v.clone()
        for k, v in new.state_dict().items()
    }
    legacy["loss_weights.gamma"].fill_(0.1)
    new.load_state_dict(legacy)  # strict: no missing or unexpected key
    assert new.loss_weights.value("variance") == 0.1
    bare = Router(8, RouterConfig(num_experts=4, loss=loss))  # a trainer-state record of old
    restore_loss_weights(bare, {"alpha": 1e-3, "beta": 0.0, "gamma": 0.1, "zeta": 0.0})
    assert bare.loss_weights.value("variance") == 0.1


@pytest.mark.parametrize("normalize_top1", [False, True])
def test_top1_gate_weight(normalize_top1):
    torch.manual_seed(4)
    r = Router(8, RouterConfig(num_experts=4, top_k=1, normalize_top1=normalize_top1))
    out = r(torch.randn(10, 8))
    p = out.logits.softmax(-1).gather(1, out.idx)
    expect = torch.ones_like(p) if normalize_top1 else p  # Switch style keeps p
    torch.testing.assert_close(out.gate_weights, expect)


def test_auto_weight_from_config_string():
    loss = LossConfig()
    loss.orthogonality.weight = "auto"
    loss.variance.weight = "AUTO"
    r = Router(8, RouterConfig(num_experts=4, loss=loss))
    assert r.loss_weights.needs_calibration()


def test_sequence_scope_uses_token_context():
    torch.manual_seed(3)
    loss = LossConfig()
    loss.aux.scope = "sequence"
    r = Router(8, RouterConfig(num_experts=4, top_k=2, loss=loss))
    seq = torch.arange(3).repeat_interleave(5)
    set_token_context(r, TokenContext(sequence_ids=seq))
    out = r(torch.randn(15, 8))
    expect = L.load_balancing_loss(out.scores, out.idx, 4, sequence_ids=seq)
    torch.testing.assert_close(r.raw_losses["aux"], expect)


def test_score_bias_changes_selection_not_weights():
    r = Router(8, RouterConfig(num_experts=4, top_k=1, score_bias=True, bias_update_rate=0.1))
    x = torch.randn(64, 8)
    r.train()
    before = r.score_correction_bias.clone()
    r(x)
    assert not torch.equal(before, r.score_correction_bias)
    r.eval()
    r.score_correction_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    out = r(x)
    assert (out.idx == 3).all()
    torch.testing.assert_close(
        out.gate_weights,
        out.scores.gather(1, out.idx) * 0 + x.matmul(r.weight.T).softmax(-1)[:, 3:4],
    )


def test_routing_stats_window_and_domains():
    torch.manual_seed(4)
    r = Router(8, RouterConfig(num_experts=4, top_k=2))
    dom = torch.tensor([0, 1] * 10)
    set_token_context(r, TokenContext(domain_ids=dom))
    out = r(torch.randn(20, 8))
    stats = collect_routing_stats(r)[0]
    counts = torch.bincount(out.idx.reshape(-1), minlength=4).float()
    assert stats["maxvio"] == pytest.approx(
        float((counts - counts.mean()).abs().max() / counts.mean())
    )
    # I(expert; domain) / H(domain) from the (expert, domain) counts of the routed slots
    joint = {}
    for row, d in zip(out.idx.tolist(), dom.tolist()):
        for e in row:
            joint[e, d] = joint.get((e, d), 0) + 1
    n = sum(joint.values())
    pe = {e: sum(c for (x, _), c in joint.items() if x == e) / n for e, _ in joint}
    pd = {d: sum(c for (_, y), c in joint.items() if y == d) / n for _, d in joint}
    mi = sum(c / n * math.log(c / n / (pe[e] * pd[d])) for (e, d), c in joint.items())
    h_domain = -sum(p * math.log(p) for p in pd.values())
    assert mi > 0
    assert stats["domain_mi"] == pytest.approx(mi / h_domain, rel=1e-9)
    assert r.stats.tokens == 0  # reset after collection


def test_grouped_sigmoid_routing_matches_deepseek_v3_router():
    """DeepSeek-V3 routing (sigmoid, correction bias, grouped top-k, scaling) equals transformers'."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    hf_cfg = DeepseekV3Config(
        hidden_size=16, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True,
    )  # fmt: skip
    torch.manual_seed(7)
    hf = DeepseekV3TopkRouter(hf_cfg)
    torch.nn.init.normal_(hf.weight)
    hf.e_score_correction_bias.normal_(0, 0.3)
    cfg = RouterConfig(
        num_experts=8, top_k=2, score_func="sigmoid", score_bias=True, bias_update_rate=0.0,
        num_groups=4, topk_groups=2, scaling=2.5,
    )  # fmt: skip
    r = Router(16, cfg)
    r.weight.data.copy_(hf.weight)
    r.score_correction_bias.copy_(hf.e_score_correction_bias)
    x = torch.randn(64, 16)
    _, hf_w, hf_idx = hf(x)
    out = r(x)
    hf_sorted, order = hf_idx.sort(-1)
    ours_sorted, ours_order = out.idx.sort(-1)
    assert torch.equal(ours_sorted, hf_sorted)
    torch.testing.assert_close(out.gate_weights.gather(1, ours_order), hf_w.gather(1, order))


def test_bad_grouping_names_field():
    with pytest.raises(ValueError, match="num_groups"):
        Router(8, RouterConfig(num_experts=8, num_groups=3))
    with pytest.raises(ValueError, match="topk_groups"):
        Router(8, RouterConfig(num_experts=8, num_groups=2, topk_groups=3))
    with pytest.raises(ValueError, match="top_k"):
        Router(8, RouterConfig(num_experts=8, top_k=3, num_groups=4, topk_groups=1))


def test_deferred_score_bias_moves_once_per_step():
    """With gradient accumulation the bias moves once, by the sign of the summed counts."""
    cfg = RouterConfig(num_experts=4, top_k=1, score_bias=True, bias_update_rate=0.1)
    r = Router(8, cfg)
    r.train()
    r.defer_bias_update = True
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randn(16, 8, generator=gen), torch.randn(16, 8, generator=gen)]
    counts = torch.zeros(4)
    for x in batches:
        idx = r(x).idx
        counts += torch.bincount(idx.reshape(-1), minlength=4).float()
        assert torch.equal(r.score_correction_bias, torch.zeros(4))  # nothing moves yet
    step_score_biases(r)
    torch.testing.assert_close(r.score_correction_bias, 0.1 * (counts.mean() - counts).sign())
    step_score_biases(r)  # nothing pending: no second move
    torch.testing.assert_close(r.score_correction_bias, 0.1 * (counts.mean() - counts).sign())


@pytest.mark.parametrize("scope", ["batch", "sequence"])
def test_padding_takes_no_part_in_losses_or_statistics(scope):
    """The same tokens with and without padding (the token context's mask): equal raw losses,
    equal statistics, equal calibration input."""
    loss = LossConfig()
    loss.aux.scope = scope
    loss.orthogonality.weight, loss.variance.weight, loss.z.weight = "auto", "auto", 1e-3
    torch.manual_seed(5)
    layer = MoELayer(12, 16, RouterConfig(num_experts=4, top_k=2, loss=loss))
    real = torch.randn(10, 12)
    seq = torch.tensor([0] * 6 + [1] * 4)
    dom = torch.tensor([0, 1] * 5)
    pad = torch.randn(5, 12) * 3  # padding with its own (large) hidden states
    runs = []
    for x, mask, s, d in (
        (real, None, seq, dom),
        (torch.cat([real[:6], pad[:3], real[6:], pad[3:]]), None, None, None),
    ):
        if mask is None and s is None:  # the padded batch: mask and labels in padded layout
            mask = torch.tensor([True] * 6 + [False] * 3 + [True] * 4 + [False] * 2)
            s = torch.tensor([0] * 6 + [7] * 3 + [1] * 4 + [7] * 2)
            d = torch.tensor([0, 1, 0, 1, 0, 1, -1, -1, -1, 0, 1, 0, 1, -1, -1])
        set_token_context(layer, TokenContext(sequence_ids=s, domain_ids=d, token_mask=mask))
        layer.router.stats.reset()
        layer(x)
        runs.append(
            (
                {k: v.detach() for k, v in layer.router.raw_losses.items()},
                layer.router.stats.compute(),
            )
        )
    (raw_a, stats_a), (raw_b, stats_b) = runs
    assert set(raw_a) == {"aux", "orthogonality", "variance", "z"} == set(raw_b)
    for name in raw_a:
        torch.testing.assert_close(raw_b[name], raw_a[name], msg=name)
    assert stats_b == pytest.approx(stats_a)
    assert layer.router.stats.tokens == 10 and "domain_mi" in stats_a
