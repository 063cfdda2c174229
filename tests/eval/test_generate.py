"""Batched greedy generation equals one prompt at a time."""

from __future__ import annotations

import torch

from moespec.eval.generate import greedy_generate, left_pad
from moespec.models import TinyMoEConfig, TinyMoELM
from moespec.moe import MoEConfig
from tests.common import ROOT


def _model() -> TinyMoELM:
    torch.manual_seed(0)
    cfg = TinyMoEConfig(vocab_size=30, hidden_size=32, num_layers=2, num_heads=2, max_seq_len=40)
    return TinyMoELM(cfg, MoEConfig(num_experts=4, top_k=2, ffn_size=32))


def _reference(model: TinyMoELM, prompt: list[int], steps: int, stop: int) -> list[int]:
    """Plain loop: one prompt, no padding, the whole sequence each step."""
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            seq.append(token)
            out.append(token)
            if token == stop:
                break
    return out


def test_left_pad_layout():
    got = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert got["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert got["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert got["document_ids"].tolist() == [[0, 0, 0], [-1, -1, 0]]


def test_batched_generation_equals_one_prompt_at_a_time():
    model = _model().eval()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 30, (n,), generator=g).tolist() for n in (3, 9, 5, 1, 12)]
    # A stop token that some rows produce early, so rows finish at different steps.
    first = [_reference(model, p, 1, -1)[0] for p in prompts]
    stop = max(set(first), key=first.count)
    router = model.layers[0].mlp.router
    router.stats.reset()
    batched = greedy_generate(model, prompts, max_new_tokens=10, stop_ids=[stop], pad_id=0)
    assert router.stats.tokens == 0  # generation keeps no statistics
    alone = [_reference(model, p, 10, stop) for p in prompts]
    assert batched == alone
    assert any(len(b) < 10 for b in batched) and any(len(b) == 10 for b in batched)


def test_hf_generation_with_its_cache_equals_the_plain_loop():
    """A tiny Qwen3-MoE: transformers' generate (KV cache, left padding) gives the tokens of
    the no-cache loop run one prompt at a time."""
    import json

    from transformers import AutoConfig, AutoModelForCausalLM

    from moespec.models.hf_train import HFCausalLM

    path = ROOT / "recipes/model/configs/qwen3_moe_tiny.json"
    raw = json.loads(path.read_text())
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    torch.manual_seed(0)
    model = HFCausalLM(AutoModelForCausalLM.from_config(config).float()).eval()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, config.vocab_size, (n,), generator=g).tolist() for n in (4, 9, 2)]
    first = [_reference(model, p, 1, -1)[0] for p in prompts]
    stop = first[1]  # one row stops at once
    batched = greedy_generate(model, prompts, max_new_tokens=8, stop_ids=[stop], pad_id=0)
    alone = [_reference(model, p, 8, stop) for p in prompts]
    assert batched == alone and len(batched[1]) == 1
