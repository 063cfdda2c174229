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
from tests.common import DENSE_TEXT


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
    from transformers import AutoModelForCausalLM

    from moespec.models.hf_tiny import tiny_config

    cfg = tiny_config(arch, num_attention_heads=4)
    model = AutoModelForCausalLM.from_config(cfg)
    blocks = find_moe_blocks(model)
    assert len(blocks) == 2, [type(m).__name__ for _, m in blocks]
    projs = find_attention_output_projections(model)
    assert len(projs) == 2 and projs[0].num_heads == 4


def _qwen2_audio():
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    text = dict(model_type="qwen2", **DENSE_TEXT)
    # the audio encoder has more layers (4) than the language model (3)
    audio = dict(
        d_model=32,
        encoder_layers=4,
        encoder_attention_heads=2,
        encoder_ffn_dim=64,
        num_mel_bins=16,
        max_source_positions=30,
    )
    torch.manual_seed(0)
    config = Qwen2AudioConfig(audio_config=audio, text_config=text, audio_token_id=100)
    model = Qwen2AudioForConditionalGeneration(config).eval()
    model.set_attn_implementation("eager")
    return model


def test_audio_encoder_is_not_taken_for_the_decoder():
    from moespec.heads import score_heads

    model = _qwen2_audio()
    assert len(model.model.audio_tower.layers) > len(model.model.language_model.layers)
    layers = find_decoder_layers(model)
    expected = list(model.model.language_model.layers)
    assert len(layers) == len(expected) and all(a is b for a, b in zip(layers, expected))
    projs = find_attention_output_projections(model)
    assert [p.name for p in projs] == [
        f"model.language_model.layers.{i}.self_attn.o_proj" for i in range(3)
    ]
    assert [(p.num_heads, p.head_dim) for p in projs] == [(4, 8)] * 3
    # reference: the language model's own attention weights
    ids = torch.randint(3, 99, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True)
    expected_scores = torch.stack([a[0, :, -1, 2:6].sum(-1) for a in out.attentions])
    torch.testing.assert_close(score_heads(model, [ids], span=(2, 6)), expected_scores)


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.o_proj = nn.Linear(8, 8)


class _Stack(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.layers = nn.ModuleList(_Attn() for _ in range(n))


def test_decoder_fallback_skips_encoders_and_rejects_ties():
    model = nn.Module()
    model.speech_encoder, model.audio_tower, model.text = _Stack(5), _Stack(4), _Stack(2)
    assert all(a is b for a, b in zip(find_decoder_layers(model), model.text.layers))
    assert len(find_decoder_layers(model)) == 2
    model.other = _Stack(2)
    with pytest.raises(ValueError, match=r"2 layer lists of 2 layers each \('text.layers', "):
        find_decoder_layers(model)
    # a model that names its decoder resolves the tie
    model.get_decoder = lambda: model.other
    assert all(a is b for a, b in zip(find_decoder_layers(model), model.other.layers))
