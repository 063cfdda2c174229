"""LoRA on the fused expert weights and on the router: trains, reaches the losses, merges."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from moespec.models.hf_train import build_hf_model
from moespec.train.config import TrainConfig

VOCAB = 1024


def _cfg(lora: dict, **extra) -> TrainConfig:
    node = {
        "model": {
            "type": "hf",
            "config": "model/configs/qwen3_moe_tiny.json",
            "lora": {"enabled": True, "rank": 4, "alpha": 8, **lora},
        },
        "loss": {
            "aux": {"weight": 1e-2},
            "orthogonality": {"weight": 1.0},
            "variance": {"weight": 1e-1},
        },
        **extra,
    }
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), node))


def _train(wrapper, ids: torch.Tensor, steps: int) -> list[float]:
    params = [p for p in wrapper.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(steps):
        out = wrapper(ids, ids)
        total = out.loss + wrapper.handle.collect_losses().total
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(float(total.detach()))
    return losses


def test_lora_on_experts_and_router_trains_and_merges(tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    wrapper = build_hf_model(_cfg({"experts": True, "router_lora": True, "target_modules": []}))
    trainable = [n for n, p in wrapper.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable), trainable
    assert any(".experts." in n for n in trainable) and any(".gate." in n for n in trainable)
    ids = torch.randint(2, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))

    # The orthogonality loss alone reaches the expert adapters (the probe reads W + ΔW).
    _train(wrapper, ids, 1)  # lora_B starts at 0: one step makes ΔW non-zero
    wrapper.zero_grad()
    out = wrapper(ids, ids)
    routed = wrapper.handle.collect_losses()
    probe = wrapper.handle.probes[0]
    probe.raw_losses["orthogonality"].backward()
    expert_grads = [
        p.grad for n, p in wrapper.named_parameters() if ".experts." in n and "lora_" in n
    ]
    assert expert_grads and all(g is not None and g.abs().sum() > 0 for g in expert_grads[:2])

    losses = _train(wrapper, ids, 6)
    assert losses[-1] < losses[0]
    wrapper.eval()
    with torch.no_grad():
        ours = wrapper(ids).logits
        with wrapper.model.disable_adapter():  # the adapters change the model's function
            assert not torch.allclose(wrapper(ids).logits, ours, atol=1e-4)
    del out, routed
    wrapper.export_pretrained(tmp_path / "hf")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, ours, rtol=1e-5, atol=1e-5)


def test_probe_losses_with_adapters_equal_the_merged_model(tmp_path):
    """The routing losses of the adapted model equal those of the merged plain model."""
    from transformers import AutoModelForCausalLM

    from moespec.models.hf import attach

    torch.manual_seed(0)
    cfg = _cfg({"experts": True, "target_modules": ["q_proj"]})
    wrapper = build_hf_model(cfg)
    ids = torch.randint(2, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    _train(wrapper, ids, 3)
    wrapper(ids, ids)
    ours = wrapper.handle.collect_losses().per_layer
    wrapper.export_pretrained(tmp_path / "hf")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").train()
    with attach(plain, cfg.loss) as handle:
        plain(input_ids=ids, use_cache=False)
        ref = handle.collect_losses().per_layer
    for a, b in zip(ours, ref, strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    assert ours[0]["orthogonality"] > 0


@pytest.mark.parametrize(
    ("lora", "extra", "match"),
    [
        ({"experts": True, "dropout": 0.1}, {}, "take no dropout"),
        ({"target_modules": []}, {}, "adapts nothing"),
        ({"experts": True}, {"moe": {"backend": "deepspeed"}}, "no fused 3-D expert weights"),
    ],
)
def test_bad_lora_settings_are_refused(lora, extra, match):
    if extra:
        from moespec.train.launch import init_distributed

        init_distributed()
    with pytest.raises(ValueError, match=match):
        build_hf_model(_cfg(lora, **extra))
