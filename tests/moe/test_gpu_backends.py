"""Native vs MegaBlocks MoE layer on equal weights: outputs, router losses and gradients.

float32 compares at 1e-4 (absolute and relative); bfloat16 at 2e-2 of each tensor's max
magnitude (MegaBlocks' grouped GEMMs and torch's accumulate bf16 products differently).
"""

from __future__ import annotations

import pytest
import torch

from moespec.moe import MoEConfig, MoELayer
from moespec.routing import (
    AuxLossConfig,
    LossConfig,
    OrthogonalityLossConfig,
    VarianceLossConfig,
    ZLossConfig,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

HIDDEN, FFN, E = 128, 128, 8


def _loss_cfg() -> LossConfig:
    return LossConfig(
        aux=AuxLossConfig(weight=1e-2),
        orthogonality=OrthogonalityLossConfig(weight=1e-2),
        variance=VarianceLossConfig(weight=1e-3),
        z=ZLossConfig(weight=1e-3),
    )


def _pair(top_k: int, shared: int) -> tuple[MoELayer, torch.nn.Module]:
    pytest.importorskip("megablocks", reason="needs the gpu extra: pip install 'moespec[gpu]'")
    pytest.importorskip("grouped_gemm", reason="MegaBlocks' grouped GEMMs are not installed")
    from moespec.moe.megablocks import MegaBlocksMoELayer

    torch.manual_seed(0)
    moe = MoEConfig(num_experts=E, top_k=top_k, ffn_size=FFN, shared_expert_size=shared)
    native = MoELayer(
        HIDDEN, FFN, moe.router_config(_loss_cfg()), shared_expert_size=shared, layer_index=0
    ).cuda()
    mb = MegaBlocksMoELayer.from_native(native)
    assert mb.is_moespec_moe and mb.experts.w1.is_cuda
    return native, mb


def _run(layer: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    out = layer(x)
    raw = dict(layer.router.raw_losses)
    total = out.float().pow(2).mean() + sum(v.float() for v in raw.values())
    total.backward()
    return out.detach().float(), {k: v.detach().float() for k, v in raw.items()}, x.grad.float()


def _close(a: torch.Tensor, b: torch.Tensor, *, rel: float, atol: float, what: str) -> None:
    scale = max(float(b.abs().max()), 1e-12)
    err = float((a - b).abs().max())
    assert err <= atol + rel * scale, f"{what}: max |diff| {err:.3g} vs scale {scale:.3g}"


def _expert_grads(native: MoELayer, mb) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    e, i, h = E, FFN, HIDDEN
    ne = native.experts
    g_gate, g_up = ne.gate_up.grad.chunk(2, dim=-1)
    w = mb.experts
    mine = [
        w.w1.grad.view(e, i, h).transpose(1, 2),
        w.v1.grad.view(e, i, h).transpose(1, 2),
        w.w2.grad.view(e, i, h),
    ]
    return [g_gate, g_up, ne.down.grad], [m.float() for m in mine]


@pytest.mark.parametrize("top_k,shared", [(2, 0), (1, 0), (2, 64)])
def test_megablocks_matches_native_float32(top_k, shared):
    native, mb = _pair(top_k, shared)
    x = torch.randn(4, 32, HIDDEN, device="cuda")
    o_n, l_n, gx_n = _run(native, x)
    o_m, l_m, gx_m = _run(mb, x)
    tol = {"rel": 1e-4, "atol": 1e-4}
    _close(o_m, o_n, what="output", **tol)
    assert set(l_m) == set(l_n) and "orthogonality" in l_n
    for k in l_n:
        _close(l_m[k], l_n[k], what=f"router loss {k}", **tol)
    _close(gx_m, gx_n, what="input grad", **tol)
    _close(mb.router.weight.grad, native.router.weight.grad, what="router grad", **tol)
    for ref, got in zip(*_expert_grads(native, mb)):
        _close(got, ref, what="expert grad", **tol)
    gate_up, down = mb.native_expert_weights()
    assert torch.equal(gate_up, native.experts.gate_up.detach())
    assert torch.equal(down, native.experts.down.detach())


@pytest.mark.parametrize("top_k", [2, 1])
def test_megablocks_matches_native_bfloat16(top_k):
    native, mb = _pair(top_k, 0)
    native.experts.to(torch.bfloat16)
    mb.experts.to(torch.bfloat16)
    x = torch.randn(4, 32, HIDDEN, device="cuda").to(torch.bfloat16)
    o_n, l_n, gx_n = _run(native, x)
    o_m, l_m, gx_m = _run(mb, x)
    tol = {"rel": 2e-2, "atol": 1e-3}
    _close(o_m, o_n, what="output", **tol)
    assert set(l_m) == set(l_n)
    for k in l_n:
        _close(l_m[k], l_n[k], what=f"router loss {k}", **tol)
    _close(gx_m, gx_n, what="input grad", **tol)
    _close(mb.router.weight.grad, native.router.weight.grad, what="router grad", **tol)
    for ref, got in zip(*_expert_grads(native, mb)):
        _close(got.float(), ref.float(), what="expert grad", **tol)
