"""Typed configs for the router and its losses (Hydra structured-config friendly)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .losses import ORTHOGONALITY_VARIANTS

SCORE_FUNCS = ("softmax", "sigmoid")
AUX_SCOPES = ("batch", "sequence", "global")
AUTO = "auto"


@dataclass
class AuxLossConfig:
    """Load-balancing loss: weight α and scope (batch, sequence, global)."""

    weight: float = 1e-3
    scope: str = "batch"


@dataclass
class OrthogonalityLossConfig:
    """Orthogonality loss: weight β (a float or ``"auto"``), variant, calibration target."""

    weight: Any = 0.0
    variant: str = "projection"
    target: float = 1e-4


@dataclass
class VarianceLossConfig:
    """Variance loss (maximised): weight γ (a float or ``"auto"``), calibration target."""

    weight: Any = 0.0
    target: float = 1e-3


@dataclass
class ZLossConfig:
    """Router z-loss weight ζ."""

    weight: float = 0.0


@dataclass
class LossConfig:
    """All routing-loss weights: ``L = α·aux + β·L_o − γ·L_v + ζ·z`` summed over layers."""

    aux: AuxLossConfig = field(default_factory=AuxLossConfig)
    orthogonality: OrthogonalityLossConfig = field(default_factory=OrthogonalityLossConfig)
    variance: VarianceLossConfig = field(default_factory=VarianceLossConfig)
    z: ZLossConfig = field(default_factory=ZLossConfig)


@dataclass
class RouterConfig:
    """Router: linear gate, score function, top-k, optional jitter and score-correction bias.

    DeepSeek-V3 style routing: ``num_groups`` groups of experts of which the ``topk_groups``
    best (by the sum of each group's two best scores) may be chosen, and gate weights
    multiplied by ``scaling``.

    ``normalize_topk`` renormalises the k gate weights to sum 1 when k > 1; with k = 1 the raw
    probability is kept (Switch style) so the gate still receives a task gradient, unless
    ``normalize_top1`` asks for weight 1.0 as Hugging Face gates with ``norm_topk_prob`` give.
    """

    num_experts: int = 8
    top_k: int = 2
    score_func: str = "softmax"
    normalize_topk: bool = True
    normalize_top1: bool = False
    jitter: float = 0.0
    score_bias: bool = False
    bias_update_rate: float = 1e-3
    num_groups: int = 1
    topk_groups: int = 1
    scaling: float = 1.0
    loss: LossConfig = field(default_factory=LossConfig)


def parse_weight(value: Any, name: str) -> float | str:
    """A loss weight: a finite non-negative float or ``"auto"``; else ``ValueError`` naming it."""
    if isinstance(value, str):
        if value.strip().lower() == AUTO:
            return AUTO
        try:
            value = float(value)
        except ValueError:
            raise ValueError(
                f"{name} must be a non-negative number or 'auto', got {value!r}"
            ) from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a non-negative number or 'auto', got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (or 'auto'), got {value!r}")
    return value


def validate_loss_config(cfg: LossConfig, prefix: str = "loss") -> None:
    """Raise ``ValueError`` naming the first invalid field of a ``LossConfig``."""
    for key, w in (
        ("aux.weight", cfg.aux.weight),
        ("z.weight", cfg.z.weight),
    ):
        if parse_weight(w, f"{prefix}.{key}") == AUTO:
            raise ValueError(
                f"{prefix}.{key} cannot be 'auto' (only orthogonality and variance calibrate)"
            )
    parse_weight(cfg.orthogonality.weight, f"{prefix}.orthogonality.weight")
    parse_weight(cfg.variance.weight, f"{prefix}.variance.weight")
    if cfg.aux.scope not in AUX_SCOPES:
        raise ValueError(f"{prefix}.aux.scope={cfg.aux.scope!r}; valid: {', '.join(AUX_SCOPES)}")
    if cfg.orthogonality.variant not in ORTHOGONALITY_VARIANTS:
        raise ValueError(
            f"{prefix}.orthogonality.variant={cfg.orthogonality.variant!r}; "
            f"valid: {', '.join(ORTHOGONALITY_VARIANTS)}"
        )
    for key, t in (
        ("orthogonality.target", cfg.orthogonality.target),
        ("variance.target", cfg.variance.target),
    ):
        if not (isinstance(t, int | float) and math.isfinite(t) and t > 0):
            raise ValueError(f"{prefix}.{key} must be a finite number > 0, got {t!r}")


def validate_router_config(cfg: RouterConfig) -> None:
    """Raise ``ValueError`` naming the first invalid field of a ``RouterConfig``."""
    if not isinstance(cfg.num_experts, int) or cfg.num_experts < 1:
        raise ValueError(f"router.num_experts must be an integer >= 1, got {cfg.num_experts!r}")
    if not isinstance(cfg.top_k, int) or cfg.top_k < 1:
        raise ValueError(f"router.top_k must be an integer >= 1, got {cfg.top_k!r}")
    if cfg.top_k > cfg.num_experts:
        raise ValueError(
            f"router.top_k={cfg.top_k} exceeds router.num_experts={cfg.num_experts}; "
            f"valid: 1 <= top_k <= num_experts"
        )
    if cfg.score_func not in SCORE_FUNCS:
        raise ValueError(f"router.score_func={cfg.score_func!r}; valid: {', '.join(SCORE_FUNCS)}")
    if (
        not isinstance(cfg.num_groups, int)
        or cfg.num_groups < 1
        or cfg.num_experts % cfg.num_groups
    ):
        raise ValueError(
            f"router.num_groups={cfg.num_groups!r} must be >= 1 and divide num_experts={cfg.num_experts}"
        )
    if not isinstance(cfg.topk_groups, int) or not 1 <= cfg.topk_groups <= cfg.num_groups:
        raise ValueError(
            f"router.topk_groups={cfg.topk_groups!r}; valid: 1 <= topk_groups <= num_groups"
        )
    if cfg.top_k > cfg.topk_groups * (cfg.num_experts // cfg.num_groups):
        raise ValueError(
            f"router.top_k={cfg.top_k} exceeds the {cfg.topk_groups * (cfg.num_experts // cfg.num_groups)} "
            "experts of the topk_groups groups it may choose from"
        )
    if not (
        isinstance(cfg.scaling, int | float) and math.isfinite(cfg.scaling) and cfg.scaling > 0
    ):
        raise ValueError(f"router.scaling must be a finite number > 0, got {cfg.scaling!r}")
    for key in ("jitter", "bias_update_rate"):
        v = getattr(cfg, key)
        if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
            raise ValueError(f"router.{key} must be a finite number >= 0, got {v!r}")
    validate_loss_config(cfg.loss)
