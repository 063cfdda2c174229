"""scripts/bench_moe_layer.py's correctness gate: in bfloat16 transformers' experts match
moespec's layer on the tokens both route alike, and a wrong layer is still refused."""

from __future__ import annotations

import argparse

import pytest
import torch


@pytest.fixture(scope="module")
def bench(load_script):
    with load_script("bench_moe_layer") as module:
        yield module


def _layers(bench, dtype: torch.dtype):
    args = argparse.Namespace(hidden=64, ffn=32, experts=16, top_k=4, seed=0)
    ours = bench.make_moespec(args, ortho=0.0, variance=0.0).to(dtype)
    hf = bench.make_hf_block(ours, args).to(dtype)
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    wrapped = bench._Wrap(lambda xi: hf(xi.unsqueeze(0)).squeeze(0), hf)
    return ours, hf, wrapped, x


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_bf16_transformers_experts_pass_on_tokens_routed_alike(bench, impl):
    ours, hf, wrapped, x = _layers(bench, torch.bfloat16)
    hf.experts.config._experts_implementation = impl
    rows = bench.same_routing_rows(ours, x)
    assert 0.9 <= rows.float().mean() < 1.0  # bf16 flips a few near-ties, not many
    errs = bench.check_outputs(
        ours, {impl: wrapped}, x, torch.randn_like(x), low_precision_router=True
    )
    assert errs[impl] <= 2e-2


def test_float32_routes_every_token_alike_and_a_wrong_layer_fails(bench):
    ours, hf, wrapped, x = _layers(bench, torch.float32)
    assert bool(bench.same_routing_rows(ours, x).all())
    bench.check_outputs(ours, {"eager": wrapped}, x, torch.randn_like(x), low_precision_router=True)
    with torch.no_grad():
        hf.experts.down_proj[3] *= 1.01  # one expert off by 1%
    with pytest.raises(AssertionError, match="relative max error"):
        bench.check_outputs(ours, {"eager": wrapped}, x, torch.randn_like(x))


def test_bf16_a_wrong_expert_still_fails(bench):
    ours, hf, wrapped, x = _layers(bench, torch.bfloat16)
    with torch.no_grad():
        hf.experts.down_proj[3] *= 1.05  # one expert off by 5%
    with pytest.raises(AssertionError, match="relative max error"):
        bench.check_outputs(
            ours, {"eager": wrapped}, x, torch.randn_like(x), low_precision_router=True
        )
