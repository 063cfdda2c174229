"""Native MoE layer against a per-token reference loop (forward and backward)."""

import pytest
import torch
import torch.nn.functional as F

from moespec.moe import MoELayer
from moespec.routing import LossConfig, RouterConfig, collect_router_losses


def reference_moe(layer: MoELayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Loop over tokens and their k experts; returns output and raw outputs [T,k,H]."""
    r = layer.router
    logits = x @ r.weight.T
    probs = logits.softmax(-1)
    outs, raws = [], []
    for t in range(x.shape[0]):
        top = torch.topk(probs[t], r.top_k)
        w = (
            top.values / top.values.sum()
            if (r.config.normalize_topk and r.top_k > 1)
            else top.values
        )
        acc = torch.zeros_like(x[t])
        row = []
        for j, e in enumerate(top.indices.tolist()):
            g, u = (x[t] @ layer.experts.gate_up[e]).chunk(2)
            y = (F.silu(g) * u) @ layer.experts.down[e]
            row.append(y)
            acc = acc + w[j] * y
        if layer.shared_expert is not None:
            acc = acc + layer.shared_expert(x[t])
        outs.append(acc)
        raws.append(torch.stack(row))
    return torch.stack(outs), torch.stack(raws)


@pytest.mark.parametrize("shared", [0, 24])
@pytest.mark.parametrize("e,k", [(4, 2), (6, 1), (3, 3)])
def test_moe_forward_backward_match_reference(shared, e, k):
    torch.manual_seed(e * 10 + k + shared)
    loss = LossConfig()
    loss.orthogonality.weight = 0.1
    cfg = RouterConfig(num_experts=e, top_k=k, loss=loss)
    layer = MoELayer(16, 20, cfg, shared_expert_size=shared)
    x = torch.randn(2, 13, 16)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    out = layer(x1)
    raw_fast = layer.router.raw_losses.get("orthogonality")
    ref_out, ref_raw = reference_moe(layer, x2.view(-1, 16))
    torch.testing.assert_close(out.view(-1, 16), ref_out, atol=1e-5, rtol=1e-5)
    if k > 1:
        from moespec.routing.losses import orthogonality_loss

        torch.testing.assert_close(raw_fast, orthogonality_loss(ref_raw), atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(out)
    fast_params = torch.autograd.grad(
        (out * grad_out).sum(), [x1, *layer.parameters()], allow_unused=True
    )
    ref_params = torch.autograd.grad(
        (ref_out * grad_out.view(-1, 16)).sum(), [x2, *layer.parameters()], allow_unused=True
    )
    for (name, _), a, b in zip([("x", None), *layer.named_parameters()], fast_params, ref_params):
        if a is None or b is None:
            assert a is None and b is None or float((a if a is not None else b).abs().sum()) == 0, (
                name
            )
            continue
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"gradient of {name}")


def test_loop_and_grouped_paths_agree():
    torch.manual_seed(5)
    layer = MoELayer(16, 24, RouterConfig(num_experts=5, top_k=2))
    x = torch.randn(40, 16)
    counts = torch.tensor([10, 0, 17, 3, 10])
    torch.testing.assert_close(
        layer.experts.grouped(x, counts),
        layer.experts.forward_loop(x, counts),
        atol=1e-5,
        rtol=1e-5,
    )


def test_moe_bfloat16_runs():
    layer = MoELayer(16, 24, RouterConfig(num_experts=4, top_k=2)).to(torch.bfloat16)
    out = layer(torch.randn(3, 5, 16, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_router_losses_reach_backward():
    torch.manual_seed(6)
    loss = LossConfig()
    loss.orthogonality.weight = 1.0
    loss.variance.weight = 1.0
    layer = MoELayer(8, 8, RouterConfig(num_experts=4, top_k=2, loss=loss))
    layer(torch.randn(10, 8))
    collect_router_losses(layer).total.backward()
    assert layer.router.weight.grad.abs().sum() > 0
    assert layer.experts.gate_up.grad.abs().sum() > 0  # orthogonality reaches the experts
