"""Packed rows: several examples in one row behave exactly like each example run alone."""

from __future__ import annotations

import torch

from moespec.models import TinyMoEConfig, TinyMoELM
from moespec.models.tiny import document_mask
from moespec.moe import MoEConfig
from moespec.routing import LossConfig
from tests.common import ROOT

LENGTHS = (5, 7, 3)  # packed into one row of 16 with one padding token


def _model() -> TinyMoELM:
    torch.manual_seed(0)
    loss = LossConfig()
    loss.aux.weight = 0.0
    cfg = TinyMoEConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=2, max_seq_len=32)
    return TinyMoELM(cfg, MoEConfig(num_experts=4, top_k=2, ffn_size=32), loss)


def _examples() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for n in LENGTHS:
        ids = torch.randint(0, 50, (n,), generator=g)
        labels = torch.cat([ids[1:], torch.tensor([-100])])  # no label across examples
        labels[0] = -100  # a prompt token: not trained
        out.append((ids, labels))
    return out


def test_document_mask_is_block_diagonal_causal():
    docs = torch.tensor([[0, 0, 1, 1, 1, -1]])
    m = document_mask(docs)[0, 0].int()
    want = torch.tensor(
        [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0],
         [0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]]
    )  # fmt: skip
    assert torch.equal(m, want)


def assert_packed_equals_alone(build, examples, packed_inputs, ids, labels) -> None:
    """Loss and every gradient of the packed row equal the sum over examples run alone."""
    trained = int((labels != -100).sum())
    packed = build()
    out = packed(ids, labels, **packed_inputs)
    out.loss.backward()
    alone = build()
    total = torch.zeros(())
    for e_ids, e_labels in examples:
        o = alone(e_ids[None], e_labels[None])
        part = (o.token_losses * (e_labels != -100)).sum() / trained
        part.backward()
        total = total + part.detach()
    torch.testing.assert_close(out.loss.detach(), total, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(packed.named_parameters(), alone.parameters()):
        if a.grad is not None or b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_packed_row_equals_each_example_alone():
    examples = _examples()
    ids = torch.cat([e[0] for e in examples] + [torch.zeros(1, dtype=torch.long)])[None]
    labels = torch.cat([e[1] for e in examples] + [torch.tensor([-100])])[None]
    pos = torch.cat([torch.arange(n) for n in LENGTHS] + [torch.zeros(1, dtype=torch.long)])[None]
    docs = torch.cat([torch.full((n,), i) for i, n in enumerate(LENGTHS)] + [torch.tensor([-1])])
    inputs = {"position_ids": pos, "document_ids": docs[None]}
    assert_packed_equals_alone(_model, examples, inputs, ids, labels)


def test_packed_row_equals_each_example_alone_hf_qwen3_moe():
    """A tiny Qwen3-MoE through moespec's HF wrapper: transformers' packed path (from the
    restarting position ids) keeps the examples apart, loss and gradients as if alone."""
    import json

    from transformers import AutoConfig, AutoModelForCausalLM

    from moespec.models.hf_train import HFCausalLM

    path = ROOT / "recipes/model/configs/qwen3_moe_tiny.json"
    raw = json.loads(path.read_text())
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    config._attn_implementation = "sdpa"

    def build() -> HFCausalLM:
        torch.manual_seed(0)
        return HFCausalLM(AutoModelForCausalLM.from_config(config).float())

    examples = [(ids % config.vocab_size, labels) for ids, labels in _examples()]
    ids = torch.cat([e[0] for e in examples])[None]
    labels = torch.cat([e[1] for e in examples])[None]
    pos = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    assert_packed_equals_alone(build, examples, {"position_ids": pos}, ids, labels)
