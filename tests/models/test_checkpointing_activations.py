"""Activation checkpointing: same losses, statistics and gradients as without it."""

from __future__ import annotations

import copy

import pytest
import torch

from moespec.models.activation_checkpointing import enable_activation_checkpointing
from moespec.models.tiny import TinyMoEConfig, TinyMoELM
from moespec.moe import MoEConfig
from moespec.routing import (
    AuxLossConfig,
    LossConfig,
    OrthogonalityLossConfig,
    VarianceLossConfig,
    collect_router_losses,
    collect_routing_stats,
    iter_routers,
    step_score_biases,
)

LOSS = LossConfig(
    aux=AuxLossConfig(weight=1e-2),
    orthogonality=OrthogonalityLossConfig(weight=1e-1),
    variance=VarianceLossConfig(weight=1e-1),
)


def _step(model: torch.nn.Module, ids: torch.Tensor) -> tuple[dict, list, dict]:
    """One forward/backward: raw losses per layer, window statistics, gradients."""
    out = model(ids, ids)
    routed = collect_router_losses(model)
    (out.loss + routed.total).backward()
    routers = iter_routers(model)
    counts = [r.stats.slot_counts.tolist() for r in routers]  # tokens counted once
    pending = [r._pending_counts for r in routers if r._pending_counts is not None]
    step_score_biases(model)
    stats = collect_routing_stats(model, all_reduce=False)
    stats += [{f"count{e}": c for e, c in enumerate(row)} for row in counts]
    stats += [{f"pending{e}": float(c) for e, c in enumerate(row)} for row in pending]
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    biases = [r.score_correction_bias.clone() for r in iter_routers(model)]
    return (
        {"per_layer": routed.per_layer, "total": float(routed.total.detach()), "biases": biases},
        stats,
        grads,
    )


def _flat(rows: list[dict]) -> dict[str, float]:
    return {f"{i}/{k}": v for i, row in enumerate(rows) for k, v in row.items()}


def _assert_same(a: tuple, b: tuple) -> None:
    (la, sa, ga), (lb, sb, gb) = a, b
    assert _flat(la["per_layer"]) == pytest.approx(_flat(lb["per_layer"]), rel=1e-6, abs=1e-9)
    assert la["total"] == pytest.approx(lb["total"], rel=1e-6)
    for x, y in zip(la["biases"], lb["biases"], strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert _flat(sa) == pytest.approx(_flat(sb), rel=1e-6, abs=1e-9, nan_ok=True)
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("score_bias", [False, True])
def test_tiny_checkpointing_equals_plain(score_bias):
    torch.manual_seed(0)
    cfg = TinyMoEConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, max_seq_len=16)
    moe = MoEConfig(num_experts=4, top_k=2, ffn_size=32, score_bias=score_bias, jitter=0.0)
    if score_bias:
        moe.score_func = "sigmoid"
    plain = TinyMoELM(cfg, moe, LOSS).train()
    for r in iter_routers(plain):
        r.defer_bias_update = True
        r.config.bias_update_rate = 0.1 if score_bias else r.config.bias_update_rate
    ckpt = copy.deepcopy(plain)
    enable_activation_checkpointing(ckpt)
    ids = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1))
    ref = _step(plain, ids)
    assert ref[0]["per_layer"][0]["orthogonality"] > 0
    _assert_same(_step(ckpt, ids), ref)


def test_tiny_checkpointing_saves_activations():
    """Checkpointing keeps fewer tensors for backward than the plain forward."""
    torch.manual_seed(0)
    cfg = TinyMoEConfig(vocab_size=64, hidden_size=32, num_layers=3, num_heads=2, max_seq_len=16)
    plain = TinyMoELM(cfg, MoEConfig(num_experts=4, top_k=2, ffn_size=32), LOSS).train()
    ckpt = copy.deepcopy(plain)
    enable_activation_checkpointing(ckpt)
    ids = torch.randint(0, 64, (2, 16))

    def saved_bytes(model: torch.nn.Module) -> int:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(ids, ids)
            (out.loss + collect_router_losses(model).total).backward()
        return total

    assert saved_bytes(ckpt) < 0.5 * saved_bytes(plain)


def _hf_model():
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).train()


def _hf_step(model, handle, ids):
    out = model(input_ids=ids, labels=ids, use_cache=False)
    routed = handle.collect_losses()
    (out.loss + routed.total).backward()
    counts = [p.stats.slot_counts.tolist() for p in handle.probes]
    stats = handle.collect_stats(all_reduce=False)
    stats += [{f"count{e}": c for e, c in enumerate(row)} for row in counts]
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return (
        {"per_layer": routed.per_layer, "total": float(routed.total.detach()), "biases": []},
        stats,
        grads,
    )


def test_hf_checkpointing_equals_plain():
    from moespec.models.hf import attach

    plain = _hf_model()
    ckpt = copy.deepcopy(plain)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with attach(plain, LOSS) as handle:
        ref = _hf_step(plain, handle, ids)
    assert ref[0]["per_layer"][0]["orthogonality"] > 0
    with attach(ckpt, LOSS) as handle:
        enable_activation_checkpointing(ckpt)
        assert ckpt.model.layers[0].gradient_checkpointing
        _assert_same(_hf_step(ckpt, handle, ids), ref)


def test_reentrant_with_routing_losses_is_refused():
    tiny = TinyMoELM(TinyMoEConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2))
    with pytest.raises(ValueError, match="reentrant activation checkpointing with routing"):
        enable_activation_checkpointing(tiny, reentrant=True)
    from moespec.models.hf import attach

    hf = _hf_model()
    with attach(hf, LOSS), pytest.raises(ValueError, match="use_reentrant=False"):
        enable_activation_checkpointing(hf, reentrant=True)
    off = LossConfig(aux=AuxLossConfig(weight=0.0))
    enable_activation_checkpointing(TinyMoELM(tiny.config, loss=off), reentrant=True)
