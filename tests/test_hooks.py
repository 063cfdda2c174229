"""The shared hook layer: groups, detaching on exit (also on error), discovery."""

import pytest
import torch
from torch import nn

from moespec.hooks import (
    HookRegistry,
    count_hooks,
    find_attention_output_projections,
    find_decoder_layers,
    find_moe_blocks,
)
from moespec.models import TinyMoEConfig, TinyMoELM


def tiny():
    return TinyMoELM(
        TinyMoEConfig(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, max_seq_len=8)
    )


def test_context_removes_hooks_on_exit_and_on_error():
    model = tiny()
    reg = HookRegistry()
    seen = []
    with reg.group("probe"):
        for layer in find_decoder_layers(model):
            reg.add_forward("probe", layer, lambda m, i, o: seen.append(o.shape))
            reg.add_forward_pre("probe", layer, lambda m, i: None)
            reg.add_backward("probe", layer, lambda m, gi, go: None)
        assert count_hooks(model) == 6
        model(torch.randint(0, 32, (1, 4)))
    assert count_hooks(model) == 0 and len(seen) == 2
    with pytest.raises(RuntimeError), reg.group("boom"):
        reg.add_forward("boom", model.layers[0], lambda m, i, o: None)
        raise RuntimeError("body failed")
    assert count_hooks(model) == 0 and reg.count() == 0


def test_remove_one_group_keeps_others():
    lin = nn.Linear(2, 2)
    reg = HookRegistry()
    reg.add_forward("a", lin, lambda m, i, o: None)
    reg.add_forward("b", lin, lambda m, i, o: None)
    assert reg.remove("a") == 1 and reg.groups() == ["b"] and count_hooks(lin) == 1
    reg.remove_all()
    assert count_hooks(lin) == 0


def test_bad_kind_is_rejected():
    with pytest.raises(ValueError, match="kind"):
        HookRegistry().add("g", nn.Linear(1, 1), lambda *a: None, kind="sideways")


def test_discovery_on_tiny_model():
    model = tiny()
    assert len(find_decoder_layers(model)) == 2
    projs = find_attention_output_projections(model)
    assert [p.name for p in projs] == ["layers.0.self_attn.o_proj", "layers.1.self_attn.o_proj"]
    assert projs[0].num_heads == 2 and projs[0].head_dim == 8
    assert [n for n, _ in find_moe_blocks(model)] == ["layers.0.mlp", "layers.1.mlp"]


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "olmoe", "mixtral", "deepseek_v3"])
def test_discovery_on_hf_moe_models(arch):
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_local_experts=4,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        head_dim=8,
    )
    if arch == "deepseek_v3":
        kw.update(
            first_k_dense_replace=0,
            n_group=1,
            topk_group=1,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
        )
    cfg = AutoConfig.for_model(arch, **kw)
    model = AutoModelForCausalLM.from_config(cfg)
    blocks = find_moe_blocks(model)
    assert len(blocks) == 2, [type(m).__name__ for _, m in blocks]
    projs = find_attention_output_projections(model)
    assert len(projs) == 2 and projs[0].num_heads == 4
