"""The moespec router: gate, top-k, and the routing losses it keeps on itself.

Each forward computes the configured losses from its own scores and stores the raw
(unweighted) values on the module; the MoE layer hands the raw expert outputs back through
:meth:`Router.record_expert_outputs` for the orthogonality loss. :func:`collect_router_losses`
walks any model, calibrates β/γ when they are ``"auto"``, and returns the weighted total.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import losses as L
from .config import AUTO, LossConfig, RouterConfig, parse_weight, validate_router_config
from .metrics import RoutingStats


@dataclass
class RouterOutput:
    """What the MoE layer needs from the router for one batch of T tokens."""

    logits: torch.Tensor  # [T,E] float32
    scores: torch.Tensor  # [T,E] probabilities used for the losses
    idx: torch.Tensor  # [T,k] selected experts
    weights: torch.Tensor  # [T,k] gate weights (renormalised when configured)


@dataclass
class TokenContext:
    """Per-token labels the trainer sets before a forward: sequence and domain ids, flat [T]."""

    sequence_ids: torch.Tensor | None = None
    domain_ids: torch.Tensor | None = None


class LossWeights(nn.Module):
    """α, β, γ, ζ as buffers so that calibrated values travel with the checkpoint.

    A weight configured as ``"auto"`` starts as NaN and is set by calibration.
    """

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.auto_beta = parse_weight(cfg.orthogonality.weight, "loss.orthogonality.weight") == AUTO
        self.auto_gamma = parse_weight(cfg.variance.weight, "loss.variance.weight") == AUTO
        nan = float("nan")
        #: The configured values; auto weights are NaN until calibrated.
        self.configured = {
            "alpha": float(cfg.aux.weight),
            "beta": nan if self.auto_beta else float(cfg.orthogonality.weight),
            "gamma": nan if self.auto_gamma else float(cfg.variance.weight),
            "zeta": float(cfg.z.weight),
        }
        for name, value in self.configured.items():
            self.register_buffer(name, torch.tensor(value, dtype=torch.float64))

    def needs_calibration(self) -> bool:
        """True while an ``"auto"`` weight has not been calibrated."""
        return bool(torch.isnan(self.beta)) or bool(torch.isnan(self.gamma))

    @torch.no_grad()
    def restore(self, calibrated: dict[str, float] | None = None) -> dict[str, tuple[float, float]]:
        """After loading a checkpoint: configured weights win, auto ones keep their calibration.

        Fixed weights are reset to the config (a resumed run may change them); an auto weight
        that the loaded state left uncalibrated takes its value from ``calibrated`` (the trainer
        state's record). Returns ``{name: (loaded, now)}`` for every fixed weight that changed.
        """
        changed = {}
        for name, value in self.configured.items():
            buf = getattr(self, name)
            loaded = float(buf)
            if name in ("beta", "gamma") and getattr(self, f"auto_{name}"):
                record = (calibrated or {}).get(name, math.nan)
                if math.isnan(loaded) and math.isfinite(record):
                    buf.fill_(float(record))  # restored, not changed
                continue
            if value != loaded:
                buf.fill_(value)
                changed[name] = (loaded, value)
        return changed

    def as_dict(self) -> dict[str, float]:
        """Current weights as floats (NaN when not yet calibrated)."""
        return {k: float(getattr(self, k)) for k in ("alpha", "beta", "gamma", "zeta")}


class Router(nn.Module):
    """Linear top-k router that keeps its own losses and routing statistics."""

    def __init__(
        self, hidden_size: int, config: RouterConfig, *, layer_index: int | None = None
    ) -> None:
        super().__init__()
        self._init_state(hidden_size, config, layer_index)
        self.weight = nn.Parameter(torch.empty(config.num_experts, hidden_size))
        nn.init.normal_(self.weight, std=hidden_size**-0.5)
        self.register_buffer("score_correction_bias", torch.zeros(config.num_experts))

    def _init_state(self, hidden_size: int, config: RouterConfig, layer_index: int | None) -> None:
        """Config, loss weights and statistics: everything but the gate weight and the bias."""
        validate_router_config(config)
        self.config = config
        self.hidden_size = hidden_size
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.layer_index = layer_index
        self.loss_weights = LossWeights(config.loss)
        self.stats = RoutingStats(config.num_experts)
        self.token_context: TokenContext | None = None
        self.track_stats = True
        self.raw_losses: dict[str, torch.Tensor] = {}
        self.defer_bias_update = False  # True: score-bias updates wait for step_score_bias()
        self._pending_counts: torch.Tensor | None = None

    # ------------------------------------------------------------------ routing
    def gate_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits [T,E] in float32 (jitter noise on the input in training)."""
        if self.training and self.config.jitter > 0:
            noise = torch.empty_like(x).uniform_(1 - self.config.jitter, 1 + self.config.jitter)
            x = x * noise
        return F.linear(x.float(), self.weight.float())

    def forward(self, x: torch.Tensor) -> RouterOutput:
        """Route tokens ``x`` [T,H]; computes and stores the raw losses and statistics."""
        logits = self.gate_logits(x)
        if self.config.score_func == "softmax":
            probs = logits.softmax(-1)
            select = probs
            dist_scores = probs
        else:
            probs = logits.sigmoid()
            select = probs
            dist_scores = probs / probs.sum(-1, keepdim=True).clamp_min(1e-20)
        if self.config.score_bias:
            select = select + self.score_correction_bias
        if self.config.num_groups > 1:
            select = self._mask_groups(select)
        idx = select.topk(self.top_k, dim=-1).indices
        weights = probs.gather(1, idx)
        if self.config.normalize_topk and (self.top_k > 1 or self.config.normalize_top1):
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
        if self.config.scaling != 1.0:
            weights = weights * self.config.scaling
        out = RouterOutput(logits=logits, scores=dist_scores, idx=idx, weights=weights)
        self._compute_losses(out)
        if self.training and self.config.score_bias:
            self._update_score_bias(idx)
        return out

    def _mask_groups(self, select: torch.Tensor) -> torch.Tensor:
        """Keep only the experts of each token's ``topk_groups`` best groups (DeepSeek-V3)."""
        g = self.config.num_groups
        grouped = select.view(-1, g, self.num_experts // g)
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
        best = group_scores.topk(self.config.topk_groups, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view_as(select)

    def _compute_losses(self, out: RouterOutput) -> None:
        cfg = self.config.loss
        ctx = self.token_context
        seq_ids = ctx.sequence_ids if (ctx is not None and cfg.aux.scope == "sequence") else None
        if seq_ids is not None and seq_ids.numel() != out.idx.shape[0]:
            seq_ids = None
        raw: dict[str, torch.Tensor] = {}
        if cfg.aux.scope == "global" and dist.is_available() and dist.is_initialized():
            raw["aux"] = _global_load_balancing(out.scores, out.idx, self.num_experts)
        else:
            raw["aux"] = L.load_balancing_loss(
                out.scores, out.idx, self.num_experts, sequence_ids=seq_ids
            )
        raw["variance"] = L.variance_loss(out.scores)
        if float(self.loss_weights.zeta) > 0:
            raw["z"] = L.z_loss(out.logits)
        self.raw_losses = raw
        if self.track_stats:
            dom = ctx.domain_ids if ctx is not None else None
            if dom is not None and dom.numel() != out.idx.shape[0]:
                dom = None
            self.stats.update(out.scores.detach(), out.idx.detach(), dom)

    def record_expert_outputs(self, expert_outputs: torch.Tensor) -> None:
        """Take each token's raw outputs of its k experts [T,k,H]; computes the orthogonality loss."""
        beta = self.loss_weights.beta
        wants_loss = self.loss_weights.auto_beta or float(beta) > 0
        if wants_loss and self.training:
            self.raw_losses["orthogonality"] = L.orthogonality_loss(
                expert_outputs, self.config.loss.orthogonality.variant
            )
        if self.track_stats and expert_outputs.shape[0] > 0:
            self.stats.update_overlap(
                float(L.output_overlap(expert_outputs)), expert_outputs.shape[0]
            )

    @torch.no_grad()
    def _update_score_bias(self, idx: torch.Tensor) -> None:
        """Aux-loss-free balancing: push the bias of overloaded experts down, underloaded up.

        Applied at once, or, with ``defer_bias_update``, summed until :meth:`step_score_bias`
        (once per optimizer step, as DeepSeek-V3 does, whatever the gradient accumulation).
        """
        if self.config.bias_update_rate == 0:
            return
        counts = torch.bincount(idx.reshape(-1), minlength=self.num_experts).float()
        if self.defer_bias_update:
            pending = self._pending_counts
            self._pending_counts = counts if pending is None else pending + counts
            return
        self._apply_score_bias(counts)

    @torch.no_grad()
    def step_score_bias(self) -> None:
        """Apply the deferred bias update for the expert counts since the last call."""
        if self._pending_counts is None:
            return
        counts, self._pending_counts = self._pending_counts, None
        self._apply_score_bias(counts)

    def _apply_score_bias(self, counts: torch.Tensor) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
        err = counts.mean() - counts
        self.score_correction_bias += self.config.bias_update_rate * err.sign()

    def extra_repr(self) -> str:
        c = self.config
        return f"hidden={self.hidden_size}, experts={c.num_experts}, top_k={c.top_k}, score={c.score_func}"


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


def _global_load_balancing(
    scores: torch.Tensor, idx: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """Aux loss with f and P averaged over all data-parallel ranks before the product."""
    world = dist.get_world_size()
    f, p = L.load_balancing_stats(scores, idx, num_experts)
    f = f.detach().clone()
    dist.all_reduce(f)
    p = _SumAcrossRanks.apply(p.contiguous())
    return num_experts * ((f / world) * (p / world)).sum()


# ---------------------------------------------------------------------- collection


ATTACHED_ROUTER_ATTR = "_moespec_router"


def iter_routers(model: nn.Module) -> list[Router]:
    """Every moespec router in ``model``, in module order.

    Besides ``Router`` submodules this finds routers attached to foreign MoE blocks (Hugging
    Face models), which live in the block's ``__dict__`` so that they stay out of its state.
    """
    out = []
    for m in model.modules():
        if isinstance(m, Router):
            out.append(m)
            continue
        attached = m.__dict__.get(ATTACHED_ROUTER_ATTR)
        if isinstance(attached, Router):
            out.append(attached)
    return out


def step_score_biases(model: nn.Module) -> None:
    """After an optimizer step: apply every router's deferred score-bias update."""
    for r in iter_routers(model):
        r.step_score_bias()


def set_token_context(model: nn.Module, context: TokenContext | None) -> None:
    """Give every router the per-token labels of the coming forward (or clear them)."""
    for r in iter_routers(model):
        r.token_context = context


@dataclass
class CollectedLosses:
    """Weighted total and per-layer raw losses of one forward."""

    total: torch.Tensor
    per_layer: list[dict[str, float]] = field(default_factory=list)
    means: dict[str, float] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    calibrated: dict[str, float] | None = None


def calibrate_weight(raw_value: float, target: float, name: str = "the loss") -> float:
    """Paper recipe: the power of ten that brings ``raw_value`` closest to ``target``.

    A raw value of exactly 0 (top_k = 1 has no orthogonality to measure) gives weight 0; a
    non-finite one is an error, as no weight would make it useful.
    """
    if not math.isfinite(raw_value) or raw_value < 0:
        raise FloatingPointError(
            f"cannot calibrate {name}=auto: its raw value on the first training batch is {raw_value}"
        )
    if raw_value == 0:
        return 0.0
    return 10.0 ** round(math.log10(target / raw_value))


def _mean_across_ranks(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        t = t.cpu() / dist.get_world_size()
    return t.tolist()


def calibrate(routers: list[Router]) -> dict[str, float] | None:
    """Set ``"auto"`` β and γ from the current raw losses (mean over layers and ranks).

    Calibrates only from a batch where every such router computed the loss on every rank (a
    training forward); after an eval forward the weight stays uncalibrated until the next one.
    """
    todo = [r for r in routers if r.loss_weights.needs_calibration()]
    if not todo or not all(r.training for r in todo):  # the first *training* batch calibrates
        return None
    found = {}
    for name in ("orthogonality", "variance"):
        vals = [float(r.raw_losses[name].detach()) for r in todo if name in r.raw_losses]
        found[name] = (sum(vals) / len(vals) if vals else 0.0, float(len(vals) == len(todo)))
    (mean_lo, has_lo), (mean_lv, has_lv) = found["orthogonality"], found["variance"]
    mean_lo, mean_lv, has_lo, has_lv = _mean_across_ranks([mean_lo, mean_lv, has_lo, has_lv])
    cfg = todo[0].config.loss
    weights = todo[0].loss_weights
    chosen = {}
    if weights.auto_beta and math.isnan(float(weights.beta)) and has_lo == 1.0:
        chosen["beta"] = calibrate_weight(
            mean_lo, cfg.orthogonality.target, "loss.orthogonality.weight"
        )
        chosen["raw_orthogonality"] = mean_lo
    if weights.auto_gamma and math.isnan(float(weights.gamma)) and has_lv == 1.0:
        chosen["gamma"] = calibrate_weight(mean_lv, cfg.variance.target, "loss.variance.weight")
        chosen["raw_variance"] = mean_lv
    if not chosen:
        return None
    for r in todo:
        if "beta" in chosen:
            r.loss_weights.beta.fill_(chosen["beta"])
        if "gamma" in chosen:
            r.loss_weights.gamma.fill_(chosen["gamma"])
    return chosen


def restore_loss_weights(
    model: nn.Module, calibrated: dict[str, float] | None = None
) -> dict[str, tuple[float, float]]:
    """After a checkpoint load: fixed weights from the config, auto ones as calibrated before.

    ``calibrated`` is the weights record of the trainer state, used where the loaded module
    state holds no calibration (routers kept out of the model state, as on Hugging Face models).
    Returns ``{name: (loaded, now)}`` for the weights that changed (as the last router that
    changed reports them; all routers share one recipe).
    """
    changed: dict[str, tuple[float, float]] = {}
    for r in iter_routers(model):
        changed = r.loss_weights.restore(calibrated) or changed
    return changed


def collect_router_losses(model: nn.Module, *, calibrate_auto: bool = True) -> CollectedLosses:
    """Weighted routing loss ``Σ_layers α·aux + β·L_o − γ·L_v + ζ·z`` and per-layer values."""
    routers = [r for r in iter_routers(model) if r.raw_losses]
    calibrated = calibrate(routers) if calibrate_auto else None
    total: torch.Tensor | None = None
    per_layer = []
    sums: dict[str, float] = {}
    for r in routers:
        w = r.loss_weights
        weights = {
            "aux": float(w.alpha),
            "orthogonality": float(w.beta),
            "variance": -float(w.gamma),
            "z": float(w.zeta),
        }
        layer_vals = {}
        for name, value in r.raw_losses.items():
            layer_vals[name] = float(value.detach())
            sums[name] = sums.get(name, 0.0) + layer_vals[name]
            coef = weights[name]
            if coef != 0 and math.isfinite(coef) and value.requires_grad:
                term = coef * value
                total = term if total is None else total + term
        per_layer.append(layer_vals)
    if total is None:
        device = routers[0].weight.device if routers else "cpu"
        total = torch.zeros((), device=device)
    n = max(len(per_layer), 1)
    ref = routers[0].loss_weights.as_dict() if routers else {}
    return CollectedLosses(
        total=total,
        per_layer=per_layer,
        means={k: v / n for k, v in sums.items()},
        weights=ref,
        calibrated=calibrated,
    )


def clear_router_losses(model: nn.Module) -> None:
    """Drop the stored raw losses (and their graphs) of every router."""
    for r in iter_routers(model):
        r.raw_losses = {}


def collect_routing_stats(
    model: nn.Module, *, reset: bool = True, all_reduce: bool = True
) -> list[dict[str, float]]:
    """Per-layer window metrics of every router (summed across ranks), then start a new window."""
    out = []
    for r in iter_routers(model):
        if all_reduce:
            r.stats.all_reduce()
        out.append(r.stats.compute())
        if reset:
            r.stats.reset()
    return out
