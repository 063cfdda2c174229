"""Routing losses against slow per-token references that follow the formulas literally."""

import math

import pytest
import torch

from moespec.routing import losses as L
from moespec.routing.router import calibrate_weight


def ref_load_balancing(scores, idx, num_experts):
    t, k = idx.shape
    f = [0.0] * num_experts
    for row in idx.tolist():
        for e in row:
            f[e] += 1.0 / (t * k)
    p = [sum(float(scores[i, e]) for i in range(t)) / t for e in range(num_experts)]
    return num_experts * sum(fe * pe for fe, pe in zip(f, p))


def orthonormal_basis(vectors, eps=1e-9):
    """Gram-Schmidt basis of the span of ``vectors`` (zero and dependent vectors dropped)."""
    basis = []
    for v in vectors:
        w = v.clone()
        for q in basis:
            w = w - (q @ w) * q
        n = w.norm()
        if n > eps * max(1.0, float(v.norm())):
            basis.append(w / n)
    return basis


def ref_orthogonality(y, variant):
    t, k, _ = y.shape
    y = y.double()
    if k == 1:
        return 0.0
    total, count = 0.0, 0
    for i in range(t):
        for j in range(k):
            if variant == "projection":
                others = [y[i, m] for m in range(k) if m != j]
                proj = sum((float(q @ y[i, j]) ** 2 for q in orthonormal_basis(others)), 0.0)
                total += proj
                count += 1
            else:
                for m in range(k):
                    if m == j:
                        continue
                    dot = float(y[i, m] @ y[i, j])
                    nj, nm = float(y[i, j] @ y[i, j]), float(y[i, m] @ y[i, m])
                    if variant == "pairwise":
                        total += dot * dot / nj if nj > 0 else 0.0
                    else:
                        total += dot * dot / (nj * nm) if nj * nm > 0 else 0.0
                    count += 1
    return total / count


def ref_variance(scores):
    t, e = scores.shape
    out = 0.0
    for i in range(t):
        row = [float(v) for v in scores[i]]
        mean = sum(row) / e
        out += sum((v - mean) ** 2 for v in row) / (e - 1)
    return out / t


SHAPES = [(7, 2, 1), (9, 4, 2), (5, 2, 2), (6, 4, 4), (8, 8, 3), (10, 6, 1)]


@pytest.mark.parametrize("t,e,k", SHAPES)
def test_load_balancing_matches_reference(t, e, k):
    g = torch.Generator().manual_seed(t * 100 + e * 10 + k)
    scores = torch.randn(t, e, generator=g).softmax(-1)
    idx = scores.topk(k, -1).indices
    assert L.load_balancing_loss(scores, idx, e).item() == pytest.approx(
        ref_load_balancing(scores, idx, e), rel=1e-5
    )


def test_load_balancing_uniform_is_one():
    t, e = 16, 4
    scores = torch.full((t, e), 1.0 / e)
    idx = torch.tensor([[i % e, (i + 1) % e] for i in range(t)])
    assert L.load_balancing_loss(scores, idx, e).item() == pytest.approx(1.0, abs=1e-6)


def test_load_balancing_ties_in_scores():
    scores = torch.full((6, 4), 0.25)
    idx = scores.topk(2, -1).indices
    assert L.load_balancing_loss(scores, idx, 4).item() == pytest.approx(
        ref_load_balancing(scores, idx, 4), rel=1e-6
    )


def test_load_balancing_per_sequence():
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(12, 4, generator=g).softmax(-1)
    idx = scores.topk(2, -1).indices
    seq = torch.tensor([0] * 5 + [1] * 7)
    expect = (
        ref_load_balancing(scores[:5], idx[:5], 4) + ref_load_balancing(scores[5:], idx[5:], 4)
    ) / 2
    got = L.load_balancing_loss(scores, idx, 4, sequence_ids=seq)
    assert got.item() == pytest.approx(expect, rel=1e-5)


def test_z_loss_reference():
    logits = torch.randn(5, 6)
    expect = sum(math.log(sum(math.exp(float(v)) for v in row)) ** 2 for row in logits) / 5
    assert L.z_loss(logits).item() == pytest.approx(expect, rel=1e-5)


@pytest.mark.parametrize("t,e,k", SHAPES)
def test_variance_matches_reference(t, e, k):
    scores = torch.randn(t, e).softmax(-1)
    assert L.variance_loss(scores).item() == pytest.approx(ref_variance(scores), rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("variant", L.ORTHOGONALITY_VARIANTS)
@pytest.mark.parametrize("t,k,h", [(6, 1, 5), (5, 2, 7), (4, 3, 6), (3, 4, 9), (4, 2, 2)])
def test_orthogonality_matches_reference(variant, t, k, h):
    g = torch.Generator().manual_seed(t + 10 * k + h)
    y = torch.randn(t, k, h, generator=g)
    got = L.orthogonality_loss(y, variant).item()
    assert got == pytest.approx(ref_orthogonality(y, variant), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("variant", L.ORTHOGONALITY_VARIANTS)
@pytest.mark.parametrize("k", [2, 3, 4])
def test_orthogonality_degenerate_outputs(variant, k):
    """All-zero outputs, identical outputs and a mix stay finite and match the reference."""
    h = 6
    y = torch.randn(5, k, h)
    y[0] = 0.0  # all zero
    y[1] = y[1, :1].expand(k, h)  # identical
    y[2, 0] = 0.0  # one zero among others
    got = L.orthogonality_loss(y, variant)
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(ref_orthogonality(y, variant), rel=1e-4, abs=1e-5)
    grad_in = y.clone().requires_grad_(True)
    L.orthogonality_loss(grad_in, variant).backward()
    assert torch.isfinite(grad_in.grad).all()


def test_orthogonality_orthogonal_outputs_give_zero():
    y = torch.eye(4).unsqueeze(0).repeat(3, 1, 1) * 2.5
    for variant in L.ORTHOGONALITY_VARIANTS:
        assert L.orthogonality_loss(y, variant).item() == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_losses_finite_in_half_precision(dtype):
    y = (torch.randn(16, 2, 32) * 50).to(dtype)
    for variant in L.ORTHOGONALITY_VARIANTS:
        out = L.orthogonality_loss(y, variant)
        assert out.dtype == torch.float32 and torch.isfinite(out)
    s = torch.randn(16, 8).softmax(-1).to(dtype)
    assert torch.isfinite(L.variance_loss(s)) and L.variance_loss(s).dtype == torch.float32
    assert torch.isfinite(L.load_balancing_loss(s, s.topk(2, -1).indices, 8))
    assert torch.isfinite(L.z_loss(torch.randn(4, 8).to(dtype) * 30))


@pytest.mark.parametrize("variant", L.ORTHOGONALITY_VARIANTS)
@pytest.mark.parametrize("k", [2, 3])
def test_orthogonality_gradcheck(variant, k):
    y = torch.randn(3, k, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: L.orthogonality_loss(v, variant), (y,))


def test_variance_gradcheck():
    logits = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: L.variance_loss(v.softmax(-1)), (logits,))


def test_orthogonality_rejects_bad_input():
    with pytest.raises(ValueError, match="variant"):
        L.orthogonality_loss(torch.randn(2, 2, 3), "qr")
    with pytest.raises(ValueError, match=r"\[T,k,H\]"):
        L.orthogonality_loss(torch.randn(2, 3))


@pytest.mark.parametrize(
    "raw,target,expect",
    [
        (0.37, 1e-4, 1e-4),
        (0.1, 1e-4, 1e-3),
        (2.0e-3, 1e-3, 1.0),
        (0.0134, 1e-3, 0.1),
        (4.0, 1e-4, 1e-5),
        (0.0, 1e-4, 0.0),
    ],
)
def test_calibration_power_of_ten(raw, target, expect):
    assert calibrate_weight(raw, target) == pytest.approx(expect)


def ref_projection_qr(y):
    """Mean over tokens and slots of ||Q Qᵀ y_j||², Q from a float64 QR of the other k-1 outputs."""
    t, k, _ = y.shape
    y = y.double()
    total = 0.0
    for i in range(t):
        for j in range(k):
            others = torch.stack([y[i, m] for m in range(k) if m != j], dim=1)  # [H,k-1]
            q, _ = torch.linalg.qr(others)
            total += float((q @ (q.T @ y[i, j])).square().sum())
    return total / (t * k)


def _scaled_outputs(k, ratio, dtype, parallel_pair, t=8, h=10):
    """Random outputs with one output of each token (slot t mod k) scaled by ``ratio``.

    ``parallel_pair``: outputs 0 and 1 of each token are nearly parallel (cos ≈ 0.999).
    """
    g = torch.Generator().manual_seed(1000 * k + 7)
    y = torch.randn(t, k, h, generator=g, dtype=torch.float64)
    if parallel_pair:
        y[:, 1] = y[:, 0] + 0.05 * torch.randn(t, h, generator=g, dtype=torch.float64)
    y[torch.arange(t), torch.arange(t) % k] *= ratio
    return y.to(dtype)


@pytest.mark.parametrize("parallel_pair", [False, True], ids=["random", "parallel_pair"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("ratio", [10.0**-e for e in range(7)])
@pytest.mark.parametrize("k", [2, 4, 6])
def test_projection_matches_qr_whatever_the_norm_ratio(k, ratio, dtype, parallel_pair):
    """The ridge is relative to each output's own norm: a small output beside large ones counts
    in full (a ridge relative to the sum of the k norms under-counted it by up to 100%)."""
    y = _scaled_outputs(k, ratio, dtype, parallel_pair)
    got = L.orthogonality_loss(y, "projection")
    assert got.dtype == dtype
    assert got.item() == pytest.approx(ref_projection_qr(y), rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [2, 4, 6])
def test_projection_zero_and_identical_outputs_finite(k, dtype):
    h = 8
    zero = torch.zeros(3, k, h, dtype=dtype)
    same = torch.randn(3, 1, h, dtype=dtype).expand(3, k, h).contiguous()
    one_zero = torch.randn(3, k, h, dtype=dtype)
    one_zero[:, 0] = 0.0
    for y, expect in (
        (zero, 0.0),
        (same, float(same[:, 0].double().square().sum(-1).mean())),  # each one in the others' span
        (one_zero, ref_projection_qr(one_zero[:, 1:]) * (k - 1) / k if k > 2 else 0.0),
    ):
        leaf = y.clone().requires_grad_(True)
        out = L.orthogonality_loss(leaf, "projection")
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(leaf.grad).all()
        assert out.item() == pytest.approx(expect, rel=1e-4, abs=1e-12)


@pytest.mark.parametrize("k", [8, 4])
def test_projection_nearly_identical_float32_outputs_keep_a_sane_gradient(k):
    """Nearly identical outputs (upcycled experts) in float32: the ridge covers the rounding of
    the float32 Gram, so the gradient stays that of the float64 computation (no spike)."""
    g = torch.Generator().manual_seed(k)
    y = torch.randn(64, 1, 256, generator=g) + 1e-4 * torch.randn(64, k, 256, generator=g)
    grads = []
    for dtype in (torch.float32, torch.float64):
        leaf = y.to(dtype).detach().clone().requires_grad_(True)
        L.orthogonality_loss(leaf, "projection").backward()
        grads.append(leaf.grad.double())
    assert ((grads[0] - grads[1]).norm() / grads[1].norm()).item() < 1e-2


@pytest.mark.parametrize("k", [2, 4, 6])
def test_projection_gradcheck_mixed_norms_and_a_parallel_pair(k):
    y = _scaled_outputs(k, 1e-2, torch.float64, parallel_pair=True, t=2, h=7)
    assert torch.autograd.gradcheck(
        lambda v: L.orthogonality_loss(v, "projection"), (y.requires_grad_(True),)
    )
