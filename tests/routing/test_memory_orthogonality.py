"""The orthogonality loss keeps its inputs for backward in their own dtype (no float32 copy)."""

from __future__ import annotations

import pytest
import torch

from moespec.routing.losses import ORTHOGONALITY_VARIANTS, orthogonality_loss

T, K, H = 48, 4, 40


def plain_formula(y: torch.Tensor, variant: str) -> torch.Tensor:
    """The loss from its definition on a float32 copy, one slot at a time (QR for projection)."""
    y = y.float()
    t, k, _ = y.shape
    total = y.new_zeros(())
    for j in range(k):
        others = torch.cat([y[:, :j], y[:, j + 1 :]], dim=1)  # [T,k-1,H]
        yj = y[:, j]
        if variant == "projection":
            q, _ = torch.linalg.qr(others.transpose(1, 2))  # [T,H,k-1]
            coef = torch.einsum("thk,th->tk", q, yj)
            total = total + coef.square().sum() / (t * k)
        elif variant == "pairwise":
            dots = torch.einsum("tih,th->ti", others, yj)
            total = total + (dots.square() / yj.square().sum(-1, keepdim=True)).sum()
        else:
            cos = torch.nn.functional.cosine_similarity(others, yj[:, None], dim=-1)
            total = total + cos.square().sum()
    if variant == "pairwise":
        return total / (t * k * (k - 1))
    if variant == "cosine":
        return total / (t * k * (k - 1))
    return total


def _outputs(dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(T, 1, H, generator=g)
    y = 0.6 * base + torch.randn(T, K, H, generator=g)  # correlated, so the loss is not tiny
    return y.to(dtype).requires_grad_()


@pytest.mark.parametrize("variant", ORTHOGONALITY_VARIANTS)
def test_grads_equal_the_plain_formula(variant):
    y = _outputs(torch.float32)
    loss = orthogonality_loss(y, variant)
    (grad,) = torch.autograd.grad(loss, y)
    y_ref = y.detach().clone().requires_grad_()
    ref = plain_formula(y_ref, variant)
    (grad_ref,) = torch.autograd.grad(ref, y_ref)
    assert float(ref.detach()) > 0.05
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("variant", ORTHOGONALITY_VARIANTS)
def test_bf16_grads_equal_the_float32_formula(variant):
    """bf16 outputs: the gradient is the float32 one rounded to bf16."""
    y = _outputs(torch.bfloat16)
    loss = orthogonality_loss(y, variant)
    (grad,) = torch.autograd.grad(loss, y)
    assert grad.dtype == torch.bfloat16
    y_ref = y.detach().float().requires_grad_()
    (grad_ref,) = torch.autograd.grad(plain_formula(y_ref, variant), y_ref)
    torch.testing.assert_close(grad, grad_ref.to(torch.bfloat16), rtol=2e-2, atol=1e-5)


def _saved(fn, y: torch.Tensor) -> list[torch.Tensor]:
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(y)
    loss.backward()
    return saved


@pytest.mark.parametrize("variant", ORTHOGONALITY_VARIANTS)
def test_no_float32_copy_of_the_outputs_is_saved(variant):
    y = _outputs(torch.bfloat16)

    def big(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t for t in ts if t.numel() == T * K * H]

    ours = big(_saved(lambda x: orthogonality_loss(x, variant), y))
    upcast_first = big(_saved(lambda x: orthogonality_loss(x.float(), variant), y))
    assert [t.dtype for t in ours] == [torch.bfloat16]
    assert [t.dtype for t in upcast_first] == [torch.float32]
    nbytes = sum(t.numel() * t.element_size() for t in ours)
    assert nbytes * 2 == sum(t.numel() * t.element_size() for t in upcast_first)
