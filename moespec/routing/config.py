"""Typed configs for the router and its losses (Hydra structured-config friendly)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

SCORE_FUNCS = ("softmax", "sigmoid")
AUX_SCOPES = ("batch", "sequence", "global")
AUTO = "auto"


@dataclass
class AuxLossConfig:
    """Load-balancing loss ``aux``: weight α and scope (batch, sequence, global)."""

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
class BalanceConfig:
    """The balance budget (``moespec.routing.balance``): ``max_maxvio`` is the largest MaxVio
    a layer may reach, as a share of the most uneven load possible (E/k − 1), in (0, 1], or
    ``None`` for no budget (the paper's rule as is). Above it, the losses that move routing
    yield by ``exp(-rate)`` per optimizer step, down to ``min_yield``; a calibrated variance
    weight is capped so that the aux loss outweighs it at that imbalance."""

    max_maxvio: float | None = None
    rate: float = 0.1
    min_yield: float = 1e-3


def validate_balance_config(cfg: BalanceConfig, prefix: str = "loss.balance") -> None:
    """Raise ``ValueError`` naming the first invalid field of a ``BalanceConfig``."""
    b = cfg.max_maxvio
    if b is not None and not (
        isinstance(b, int | float) and not isinstance(b, bool) and math.isfinite(b) and 0 < b <= 1
    ):
        raise ValueError(
            f"{prefix}.max_maxvio must be in (0, 1] (a share of the largest possible MaxVio, "
            f"E/k - 1) or null for no budget, got {b!r}"
        )
    if not (isinstance(cfg.rate, int | float) and math.isfinite(cfg.rate) and cfg.rate > 0):
        raise ValueError(f"{prefix}.rate must be a finite number > 0, got {cfg.rate!r}")
    m = cfg.min_yield
    if not (isinstance(m, int | float) and math.isfinite(m) and 0 < m <= 1):
        raise ValueError(f"{prefix}.min_yield must be in (0, 1], got {m!r}")


@dataclass
class LossTermConfig:
    """A registered routing loss of the user's: weight (or ``"auto"``), target, options.

    ``target`` (for ``"auto"``) defaults to the one the loss was registered with; ``options``
    are passed to the loss function as keyword arguments. (``loss.terms`` holds plain mappings,
    so that ``+loss.terms.<name>.weight=...`` composes; :func:`term_config` checks their keys.)
    """

    weight: Any = 0.0
    target: float | None = None
    options: dict[str, Any] = field(default_factory=dict)


def term_config(node: Any, key: str) -> LossTermConfig:
    """A ``loss.terms.<name>`` mapping as a :class:`LossTermConfig`; unknown keys are an error."""
    if isinstance(node, LossTermConfig):
        return node
    if not hasattr(node, "items"):
        raise ValueError(f"{key} must be a mapping of weight, target, options; got {node!r}")
    valid = [f.name for f in fields(LossTermConfig)]
    items = dict(node.items())
    if unknown := [k for k in items if k not in valid]:
        raise ValueError(f"{key}: unknown key {unknown[0]!r} (valid keys: {', '.join(valid)})")
    options = items.get("options", {})
    if not hasattr(options, "items"):
        raise ValueError(f"{key}.options must be a mapping of keyword arguments, got {options!r}")
    return LossTermConfig(**{**items, "options": dict(options.items())})


@dataclass
class LossConfig:
    """All routing-loss weights: ``L = Σ_layers Σ_losses sign·weight·loss``.

    The built-in losses have their own nodes (``aux``, ``orthogonality``, ``variance``, ``z``);
    losses registered with :func:`moespec.routing.losses.routing_loss` are switched on under
    ``terms.<name>``, after ``modules`` (Python modules or ``.py`` files) registered them.
    ``balance`` is the budget of load imbalance the losses that move routing may cause.
    """

    aux: AuxLossConfig = field(default_factory=AuxLossConfig)
    orthogonality: OrthogonalityLossConfig = field(default_factory=OrthogonalityLossConfig)
    variance: VarianceLossConfig = field(default_factory=VarianceLossConfig)
    z: ZLossConfig = field(default_factory=ZLossConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    terms: dict[str, Any] = field(default_factory=dict)  # name -> LossTermConfig fields
    modules: list[str] = field(default_factory=list)


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


def validate_router_config(cfg: RouterConfig) -> None:
    """Raise ``ValueError`` naming the first invalid field of a ``RouterConfig`` (its ``loss``:
    :func:`~moespec.routing.losses.validate_loss_config`)."""
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
