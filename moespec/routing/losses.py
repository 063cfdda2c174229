"""Routing losses (arXiv 2505.22323 and the Switch/GShard aux loss): pure functions, tensors in, float32 scalar out.

Notation: T tokens, E routed experts, k selected experts per token, H hidden size.
All functions are vectorised over tokens and compute in float32 (float64 stays float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ORTHOGONALITY_VARIANTS = ("projection", "pairwise", "cosine")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def load_balancing_loss(
    scores: torch.Tensor,
    idx: torch.Tensor,
    num_experts: int,
    *,
    sequence_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch/GShard auxiliary loss ``E * sum_e f_e * P_e`` (1.0 under uniform routing).

    ``scores`` [T,E] are routing probabilities, ``idx`` [T,k] the selected experts.
    With ``sequence_ids`` [T] the loss is computed per sequence and averaged (DeepSeek form).
    """
    scores = scores.to(_compute_dtype(scores))
    if sequence_ids is None:
        f, p = load_balancing_stats(scores, idx, num_experts)
        return num_experts * (f * p).sum()
    seq = torch.unique(sequence_ids, return_inverse=True)[1]
    num_seq = int(seq.max().item()) + 1 if seq.numel() else 0
    k = idx.shape[1]
    counts = scores.new_zeros(num_seq, num_experts)
    counts.index_put_(
        (seq.repeat_interleave(k), idx.reshape(-1)),
        torch.ones(idx.numel(), dtype=scores.dtype, device=scores.device),
        accumulate=True,
    )
    tokens = torch.bincount(seq, minlength=num_seq).to(scores.dtype).clamp_min(1)
    f = counts / (tokens[:, None] * k)
    p = scores.new_zeros(num_seq, num_experts).index_add_(0, seq, scores) / tokens[:, None]
    return num_experts * (f * p).sum(-1).mean()


def load_balancing_stats(
    scores: torch.Tensor, idx: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f, P)``: fraction of routed slots per expert (no grad) and mean score per expert."""
    scores = scores.to(_compute_dtype(scores))
    counts = torch.bincount(idx.reshape(-1), minlength=num_experts).to(scores.dtype)
    f = counts / max(idx.numel(), 1)
    p = scores.mean(0) if scores.shape[0] else scores.new_zeros(num_experts)
    return f, p


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss: mean over tokens of ``logsumexp(logits_t)**2``."""
    logits = logits.to(_compute_dtype(logits))
    return torch.logsumexp(logits, dim=-1).square().mean()


def variance_loss(scores: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the unbiased variance of the scores across experts (maximised)."""
    scores = scores.to(_compute_dtype(scores))
    return scores.var(dim=-1, unbiased=True).mean()


class _Gram(torch.autograd.Function):
    """``Y Yᵀ`` per batch with the one-matmul backward ``(dG + dGᵀ) Y`` (autograd's takes two)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, y: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(y)
        return torch.bmm(y, y.transpose(1, 2))

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return torch.bmm(grad + grad.transpose(1, 2), y)


def gram(expert_outputs: torch.Tensor) -> torch.Tensor:
    """Per-token Gram matrix ``G[t,i,j] = <y_ti, y_tj>`` of the k raw outputs [T,k,H]."""
    y = expert_outputs.to(_compute_dtype(expert_outputs))
    return _Gram.apply(y)


def orthogonality_loss(expert_outputs: torch.Tensor, variant: str = "projection") -> torch.Tensor:
    """Orthogonality loss over each token's k raw expert outputs ``expert_outputs`` [T,k,H].

    ``projection``: mean over tokens and slots of ``||proj_{span(others)} y_j||^2``, computed
    from the k×k Gram matrix (no QR per slot), with a ridge relative to each output's own norm
    and the small (k-1)×(k-1) solves in float64: a QR reference is matched to about 1e-5
    (float32) whatever the norm ratios between the k outputs. ``pairwise``: paper Eq. 6,
    ``<y_i,y_j>^2/||y_j||^2``. ``cosine``: mean ``cos(y_i,y_j)^2``. Zero for k = 1.
    """
    if variant not in ORTHOGONALITY_VARIANTS:
        raise ValueError(
            f"unknown orthogonality variant {variant!r}; valid: {', '.join(ORTHOGONALITY_VARIANTS)}"
        )
    if expert_outputs.dim() != 3:
        raise ValueError(f"expert_outputs must be [T,k,H], got shape {tuple(expert_outputs.shape)}")
    t, k, _ = expert_outputs.shape
    dtype = _compute_dtype(expert_outputs)
    if k == 1 or t == 0:
        return expert_outputs.to(dtype).sum() * 0.0
    g = gram(expert_outputs)
    diag = torch.diagonal(g, dim1=1, dim2=2)  # [T,k] squared norms
    eps = torch.finfo(dtype).tiny
    off = ~torch.eye(k, dtype=torch.bool, device=g.device)
    if variant == "pairwise":
        # <y_i,y_j>^2 / ||y_j||^2 summed over i != j; column j is the divisor.
        ratio = g.square() / diag.clamp_min(eps)[:, None, :]
        return ratio[:, off].sum() / (t * k * (k - 1))
    if variant == "cosine":
        cos2 = g.square() / (diag[:, :, None] * diag[:, None, :]).clamp_min(eps)
        return cos2[:, off].mean()
    return _projection_from_gram(g, diag).sum() / (t * k)


def _projection_from_gram(g: torch.Tensor, diag: torch.Tensor) -> torch.Tensor:
    """``||P_{-j} y_j||^2`` for every token and slot, [T,k], from the Gram matrix.

    With ``A`` the Gram matrix of the other k-1 outputs and ``b`` their inner products with
    ``y_j``, the squared projection is ``b^T A^+ b = ||y_j||^2 c^T C^+ c``, where ``C`` is the
    cosine matrix of the others (``D^-1 A D^-1``, unit diagonal) and ``c = D^-1 b / ||y_j||``
    their cosines with ``y_j``: the norms drop out, so the norm ratios between the k outputs do
    not matter. The solve ``x = (C + rI)^-1 c`` runs in float64; the ridge ``r`` (relative to
    unit diagonals, above the rounding of a float32 Gram) keeps value and gradient finite for
    zero, identical or collinear outputs, and ``c^T x + r x^T x`` (one step of iterated
    Tikhonov) leaves a bias of order ``(r/λ)^2`` instead of ``r/λ`` for an eigenvalue ``λ`` of
    ``C``. The squared cosine is clamped to [0, 1] against the rounding of the Gram.
    """
    t, k, _ = g.shape
    dtype = g.dtype
    rel = 1e-10 if dtype == torch.float64 else 1e-6
    floor = torch.finfo(dtype).tiny ** 0.5  # keeps 0/0 out of the gradient for zero outputs
    g64, d64 = g.double(), diag.double()
    inv_norm = (d64 + floor).rsqrt()  # [T,k]; ~1/||y_i||, finite for zero outputs
    cos = g64 * inv_norm[:, :, None] * inv_norm[:, None, :]  # [T,k,k]
    if k == 2:
        sol = cos[:, 0, 1, None] / (torch.stack([cos[:, 1, 1], cos[:, 0, 0]], dim=1) + rel)
        cos2 = cos[:, 0, 1, None] * sol + rel * sol.square()  # [T,2]
    else:
        others = torch.stack(
            [torch.tensor([i for i in range(k) if i != j], device=g.device) for j in range(k)]
        )  # [k,k-1]
        a = cos[:, others[:, :, None], others[:, None, :]]  # [T,k,k-1,k-1]
        b = cos[:, torch.arange(k, device=g.device)[:, None], others]  # [T,k,k-1]
        a = a + rel * torch.eye(k - 1, dtype=a.dtype, device=g.device)
        sol = torch.linalg.solve(a, b.unsqueeze(-1)).squeeze(-1)
        cos2 = (b * sol).sum(-1) + rel * sol.square().sum(-1)
    return (d64 * cos2.clamp(0.0, 1.0)).to(dtype)


def output_overlap(expert_outputs: torch.Tensor) -> torch.Tensor:
    """Metric: mean |cos| between each token's k selected raw outputs (0 when k = 1)."""
    t, k, _ = expert_outputs.shape
    if k == 1 or t == 0:
        return expert_outputs.new_zeros((), dtype=torch.float32)
    y = F.normalize(expert_outputs.detach().float(), dim=-1)
    c = torch.bmm(y, y.transpose(1, 2)).abs()
    off = ~torch.eye(k, dtype=torch.bool, device=c.device)
    return c[:, off].mean()
