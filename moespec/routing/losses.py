"""Routing losses (arXiv 2505.22323 and the Switch/GShard aux loss): pure functions, tensors in, float32 scalar out.

Notation: T tokens, E routed experts, k selected experts per token, H hidden size.
All functions are vectorised over tokens and compute in float32 (float64 stays float64).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .config import (
    AUTO,
    AUX_SCOPES,
    LossConfig,
    parse_weight,
    term_config,
    validate_balance_config,
)

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
    """``Y Yᵀ`` per batch in float32 (float64 stays float64) with the one-matmul backward
    ``(dG + dGᵀ) Y``. ``Y`` is saved in its own dtype and upcast again in backward, so no
    float32 copy of the [T,k,H] outputs is kept for backward (half the bytes of bf16 kept)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, y: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(y)
        yc = y.to(_compute_dtype(y))
        return torch.bmm(yc, yc.transpose(1, 2))

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return torch.bmm(grad + grad.transpose(1, 2), y.to(grad.dtype)).to(y.dtype)


def gram(expert_outputs: torch.Tensor) -> torch.Tensor:
    """Per-token Gram matrix ``G[t,i,j] = <y_ti, y_tj>`` [T,k,k] of the k raw outputs [T,k,H],
    in float32 (float64 for float64 outputs)."""
    return _Gram.apply(expert_outputs)


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


class _SumAcrossRanks(torch.autograd.Function):
    """All-reduce (sum) whose gradient is the all-reduced gradient: d(Σ_r x_r)/dx_r = 1."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def global_load_balancing_loss(
    scores: torch.Tensor, idx: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """Aux loss with f and P averaged over all data-parallel ranks before the product."""
    world = dist.get_world_size()
    f, p = load_balancing_stats(scores, idx, num_experts)
    f = f.detach().clone()
    dist.all_reduce(f)
    p = _SumAcrossRanks.apply(p.contiguous())
    return num_experts * ((f / world) * (p / world)).sum()


# ------------------------------------------------------------------------- the loss table
#
# One entry per routing loss: the router computes the entries that are switched on,
# calibration sets their "auto" weights, and logging (loss/<name>, weights/<name>),
# checkpoints and moespec-compare read their names from here. Users add entries with
# @routing_loss from their own modules and switch them on under loss.terms.<name>.

#: What a routing loss may read, as the keyword arguments of its function.
READABLE = ("logits", "scores", "idx", "num_experts", "expert_outputs", "sequence_ids")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass
class LossInputs:
    """What a routing loss may read for one layer and micro-batch of T tokens."""

    logits: torch.Tensor  # [T,E] float32
    scores: torch.Tensor  # [T,E] routing distribution (sigmoid scores normalised over E)
    idx: torch.Tensor  # [T,k] selected experts
    num_experts: int
    sequence_ids: torch.Tensor | None = None  # [T] which sequence each token belongs to
    expert_outputs: torch.Tensor | None = None  # [T,k,H] raw (ungated) outputs


@dataclass(frozen=True)
class RoutingLoss:
    """An entry of the loss table.

    ``compute(inputs, node)`` returns the raw (unweighted) scalar from the :class:`LossInputs`
    and the loss's config node; ``sign`` is +1 for a loss that is minimised, -1 for one that
    is maximised; ``calibrates`` allows ``weight: auto`` (set on the first training batch so
    that weight × raw value ≈ ``target``).
    """

    name: str
    compute: Callable[[LossInputs, Any], torch.Tensor]
    reads: frozenset[str]
    node: str
    sign: float = 1.0
    calibrates: bool = False
    target: float | None = None
    logged_when_off: bool = False  # computed for the logs even at weight 0
    symbol: str = ""  # the paper's letter (docs and compare labels)
    validate: Callable[[Any, str], None] | None = None
    builtin: bool = False
    yields: bool = False  # moves routing: yields to the balance budget (routing.balance)

    @property
    def reads_expert_outputs(self) -> bool:
        """Computed once the MoE layer hands back the raw expert outputs (training only)."""
        return "expert_outputs" in self.reads


LOSSES: dict[str, RoutingLoss] = {}


def _validate_aux(node: Any, key: str) -> None:
    if node.scope not in AUX_SCOPES:
        raise ValueError(f"{key}.scope={node.scope!r}; valid: {', '.join(AUX_SCOPES)}")


def _validate_orthogonality(node: Any, key: str) -> None:
    if node.variant not in ORTHOGONALITY_VARIANTS:
        raise ValueError(
            f"{key}.variant={node.variant!r}; valid: {', '.join(ORTHOGONALITY_VARIANTS)}"
        )


def _aux(inputs: LossInputs, node: Any) -> torch.Tensor:
    if node.scope == "global" and dist.is_available() and dist.is_initialized():
        return global_load_balancing_loss(inputs.scores, inputs.idx, inputs.num_experts)
    seq = inputs.sequence_ids if node.scope == "sequence" else None
    return load_balancing_loss(inputs.scores, inputs.idx, inputs.num_experts, sequence_ids=seq)


def _builtin(name: str, compute: Callable, reads: tuple[str, ...], **kw: Any) -> None:
    LOSSES[name] = RoutingLoss(name, compute, frozenset(reads), node=name, builtin=True, **kw)


_builtin("aux", _aux, ("scores", "idx", "sequence_ids"), logged_when_off=True, symbol="α",
         validate=_validate_aux)  # fmt: skip
_builtin(
    "orthogonality",
    lambda i, n: orthogonality_loss(i.expert_outputs, n.variant),
    ("expert_outputs",), calibrates=True, target=1e-4, symbol="β",
    validate=_validate_orthogonality,
)  # fmt: skip
_builtin("variance", lambda i, n: variance_loss(i.scores), ("scores",), sign=-1.0,
         calibrates=True, target=1e-3, logged_when_off=True, symbol="γ", yields=True)  # fmt: skip
_builtin("z", lambda i, n: z_loss(i.logits), ("logits",), symbol="ζ")


def routing_loss(
    name: str,
    *,
    reads: str | tuple[str, ...] | list[str],
    maximise: bool = False,
    target: float = 1e-3,
    symbol: str = "",
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register ``fn(**reads, **options) -> scalar`` as the routing loss ``name``.

    Switched on with ``loss.terms.<name>.weight`` (a number or ``auto``, calibrated to
    ``target``); ``loss.terms.<name>.options`` become keyword arguments of ``fn``. A loss that
    reads ``scores`` or ``logits`` can move the load, so it yields to ``loss.balance``.
    """
    wanted = (reads,) if isinstance(reads, str) else tuple(reads)
    bad = [r for r in wanted if r not in READABLE]
    if bad or not wanted:
        raise ValueError(f"routing loss {name!r} reads {bad or '()'}; valid: {', '.join(READABLE)}")
    if not _NAME.match(name):
        raise ValueError(f"routing loss name {name!r}: use lower-case letters, digits and _")
    if name in LOSSES and LOSSES[name].builtin:
        raise ValueError(f"routing loss {name!r} is built in; choose another name")

    def register(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def compute(inputs: LossInputs, node: Any) -> torch.Tensor:
            return fn(**{r: getattr(inputs, r) for r in wanted}, **dict(node.options))

        LOSSES[name] = RoutingLoss(
            name, compute, frozenset(wanted), node=f"terms.{name}",
            sign=-1.0 if maximise else 1.0, calibrates=True, target=target, symbol=symbol,
            yields=bool({"scores", "logits"} & set(wanted)),
        )  # fmt: skip
        return fn

    return register


def import_loss_modules(modules: list[str] | tuple[str, ...], key: str = "loss.modules") -> None:
    """Import the modules (dotted names or ``.py`` files) that register routing losses."""
    for spec in modules:
        if spec.endswith(".py") or os.sep in spec:
            path = Path(spec).resolve()
            if not path.is_file():
                raise ValueError(f"{key}: no such file {spec!r}")
            module_name = f"moespec_user_losses.{path.stem}_{abs(hash(str(path))):x}"
            if module_name in sys.modules:
                continue
            loader = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(loader)
            sys.modules[module_name] = module
            try:
                loader.loader.exec_module(module)
            except Exception as err:
                del sys.modules[module_name]
                raise ValueError(f"{key}: importing {spec!r} failed: {err}") from err
            continue
        try:
            importlib.import_module(spec)
        except ImportError as err:
            raise ValueError(f"{key}: cannot import {spec!r} ({err})") from err


@dataclass(frozen=True)
class ActiveLoss:
    """A table entry with its config node, parsed weight (a float or ``"auto"``) and target."""

    entry: RoutingLoss
    config: Any
    weight: float | str
    target: float | None

    @property
    def name(self) -> str:
        return self.entry.name


def resolve_losses(cfg: Any, prefix: str = "loss") -> list[ActiveLoss]:
    """The losses of a ``LossConfig`` in table order; ``ValueError`` names a bad field.

    Built-in losses are always listed (weight 0 when off); registered losses when configured.
    """
    import_loss_modules(list(cfg.modules), f"{prefix}.modules")
    terms = {name: term_config(node, f"{prefix}.terms.{name}") for name, node in cfg.terms.items()}
    for name in terms:
        if name not in LOSSES or LOSSES[name].builtin:
            user = [n for n, e in LOSSES.items() if not e.builtin]
            hint = f"use {prefix}.{name}" if name in LOSSES else (
                f"registered: {', '.join(user) or 'none'}; register one with @routing_loss in a "
                f"module listed in {prefix}.modules"
            )  # fmt: skip
            raise ValueError(
                f"{prefix}.terms.{name}: no registered routing loss of that name ({hint})"
            )
    out = []
    for entry in LOSSES.values():
        node = getattr(cfg, entry.name) if entry.builtin else terms.get(entry.name)
        if node is None:
            continue
        key = f"{prefix}.{entry.node}"
        weight = parse_weight(node.weight, f"{key}.weight")
        if weight == AUTO and not entry.calibrates:
            raise ValueError(f"{key}.weight cannot be 'auto' ({entry.name} does not calibrate)")
        target = getattr(node, "target", None)
        target = entry.target if target is None else target
        if entry.calibrates and not (
            isinstance(target, int | float) and math.isfinite(target) and target > 0
        ):
            raise ValueError(f"{key}.target must be a finite number > 0, got {target!r}")
        if entry.validate is not None:
            entry.validate(node, key)
        out.append(ActiveLoss(entry, node, weight, target))
    return out


def validate_loss_config(cfg: LossConfig, prefix: str = "loss") -> None:
    """Raise ``ValueError`` naming the first invalid field of a ``LossConfig``."""
    resolve_losses(cfg, prefix)
    validate_balance_config(cfg.balance, f"{prefix}.balance")
