"""The moespec router: gate, top-k, and the routing losses it keeps on itself.

Each forward computes the configured losses from its own scores and stores the raw
(unweighted) values on the module; the MoE layer hands the raw expert outputs back through
:meth:`Router.record_expert_outputs` for the orthogonality loss. :func:`collect_router_losses`
walks any model, calibrates β/γ when they are ``"auto"``, and returns the weighted total.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..distributed import all_reduce_floats
from . import losses as L
from .balance import (
    BalanceBudget,
    budget_state,
    restore_budgets,
    steer_budgets,
    variance_weight_cap,
)
from .config import AUTO, BalanceConfig, RouterConfig, validate_router_config
from .metrics import RoutingStats


@dataclass
class RouterOutput:
    """What the MoE layer needs from the router for one batch of T tokens."""

    logits: torch.Tensor  # [T,E] float32
    scores: torch.Tensor  # [T,E] probabilities used for the losses
    idx: torch.Tensor  # [T,k] selected experts
    gate_weights: torch.Tensor  # [T,k] gate weights (renormalised when configured)


@dataclass
class TokenContext:
    """Per-token labels the trainer sets before a forward, flat [T]: sequence and domain ids,
    and ``token_mask`` (False on padding, which takes no part in losses or statistics)."""

    sequence_ids: torch.Tensor | None = None
    domain_ids: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None


def _select(inputs: L.LossInputs, rows: torch.Tensor) -> L.LossInputs:
    """The loss inputs of the tokens ``rows`` [T] (bool) selects."""
    return L.LossInputs(
        logits=inputs.logits[rows],
        scores=inputs.scores[rows],
        idx=inputs.idx[rows],
        num_experts=inputs.num_experts,
        sequence_ids=None if inputs.sequence_ids is None else inputs.sequence_ids[rows],
    )


#: Buffer names of the loss weights before they were named after their losses.
LEGACY_WEIGHT_NAMES = {"alpha": "aux", "beta": "orthogonality", "gamma": "variance", "zeta": "z"}


class LossWeights(nn.Module):
    """One float64 buffer per routing loss, named after it, so calibration travels with the
    checkpoint. A weight configured as ``"auto"`` is NaN until calibrated."""

    def __init__(self, active: list[L.ActiveLoss]) -> None:
        super().__init__()
        self.losses = {a.name: a for a in active}
        self.auto = {a.name for a in active if a.weight == AUTO}
        #: The configured values; auto weights are NaN until calibrated.
        self.configured = {
            a.name: math.nan if a.weight == AUTO else float(a.weight) for a in active
        }
        for name, value in self.configured.items():
            self.register_buffer(name, torch.tensor(value, dtype=torch.float64))

    def value(self, name: str) -> float:
        """The weight of ``name`` in force (NaN while uncalibrated; 0 for an unknown name)."""
        buf = self._buffers.get(name)
        return float(buf) if buf is not None else 0.0

    def is_on(self, name: str) -> bool:
        """True when ``name`` is to be computed for the total: auto, or a weight > 0."""
        return name in self.auto or self.value(name) > 0

    def coefficient(self, name: str) -> float:
        """``sign × weight``: how the raw value of ``name`` enters the total."""
        return self.losses[name].entry.sign * self.value(name)

    def uncalibrated(self) -> list[str]:
        """The auto weights still NaN, in table order."""
        return [n for n in self.configured if n in self.auto and math.isnan(self.value(n))]

    def needs_calibration(self) -> bool:
        """True while an ``"auto"`` weight has not been calibrated."""
        return bool(self.uncalibrated())

    @torch.no_grad()
    def set(self, name: str, value: float) -> None:
        """Set the weight of ``name`` (calibration)."""
        self._buffers[name].fill_(value)

    @torch.no_grad()
    def restore(self, calibrated: dict[str, float] | None = None) -> dict[str, tuple[float, float]]:
        """After loading a checkpoint: configured weights win, auto ones keep their calibration.

        Fixed weights are reset to the config (a resumed run may change them); an auto weight
        that the loaded state left uncalibrated takes its value from ``calibrated`` (the trainer
        state's record). Returns ``{name: (loaded, now)}`` for every fixed weight that changed.
        """
        record = {LEGACY_WEIGHT_NAMES.get(k, k): v for k, v in (calibrated or {}).items()}
        changed = {}
        for name, value in self.configured.items():
            loaded = self.value(name)
            if name in self.auto:
                kept = record.get(name, math.nan)
                if math.isnan(loaded) and math.isfinite(kept):
                    self.set(name, float(kept))  # restored, not changed
                continue
            # The trainer state's record says what the run trained with, also for routers that
            # keep no module state (Hugging Face models), whose buffers start at the config.
            was = record.get(name, loaded)
            was = loaded if not isinstance(was, int | float) or math.isnan(was) else float(was)
            if value != loaded:
                self.set(name, value)
            if value != was:
                changed[name] = (was, value)
        return changed

    def as_dict(self) -> dict[str, float]:
        """Current weights as floats (NaN when not yet calibrated), in table order."""
        return {name: self.value(name) for name in self.configured}

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ) -> None:
        """Load by loss name (legacy α/β/γ/ζ names too); a loss that the checkpoint lacks keeps
        its configured weight, one the recipe dropped is ignored, so a resumed run may change
        which losses are on."""
        for name in self.configured:
            for key in (name, *[k for k, v in LEGACY_WEIGHT_NAMES.items() if v == name]):
                if prefix + key in state_dict:
                    self._buffers[name].copy_(state_dict[prefix + key])
                    break


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
        self.losses = L.resolve_losses(config.loss)
        self.loss_weights = LossWeights(self.losses)
        balance = getattr(config.loss, "balance", None) or BalanceConfig()
        self.balance = BalanceBudget(config.num_experts, config.top_k, balance)
        self.stats = RoutingStats(config.num_experts, config.top_k)
        self.token_context: TokenContext | None = None
        self.track_stats = True
        self.raw_losses: dict[str, torch.Tensor] = {}
        self._loss_inputs: L.LossInputs | None = None  # of all T tokens, padding included
        self._token_mask: torch.Tensor | None = None  # [T] real tokens; None: all
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
        out = RouterOutput(logits=logits, scores=dist_scores, idx=idx, gate_weights=weights)
        self._compute_losses(out)
        if self.training and self.config.score_bias:
            mask = self._token_mask
            self._update_score_bias(idx if mask is None else idx[mask])
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
        """Raw values of the losses that read no expert output; routing statistics."""
        ctx = self.token_context or TokenContext()
        t = out.idx.shape[0]

        def per_token(ids: torch.Tensor | None) -> torch.Tensor | None:
            return ids.reshape(-1) if ids is not None and ids.numel() == t else None

        inputs = L.LossInputs(
            logits=out.logits,
            scores=out.scores,
            idx=out.idx,
            num_experts=self.num_experts,
            sequence_ids=per_token(ctx.sequence_ids),
        )
        self._loss_inputs = inputs
        mask = per_token(ctx.token_mask)
        self._token_mask = None if mask is None or bool(mask.all()) else mask.bool()
        dom = per_token(ctx.domain_ids)
        if self._token_mask is not None:
            inputs = _select(inputs, self._token_mask)
            dom = None if dom is None else dom[self._token_mask]
        w = self.loss_weights
        self.raw_losses = {
            a.name: a.entry.compute(inputs, a.config)
            for a in self.losses
            if not a.entry.reads_expert_outputs and (a.entry.logged_when_off or w.is_on(a.name))
        }
        if self.track_stats:  # off while a checkpointed forward is recomputed
            self.stats.update(inputs.scores.detach(), inputs.idx.detach(), dom)
            if self.training and self.balance.enabled:
                self.balance.observe(inputs.idx)

    def wants_expert_outputs(self) -> bool:
        """True when a loss that is on reads the raw expert outputs (training only)."""
        w = self.loss_weights
        return self.training and any(
            a.entry.reads_expert_outputs and w.is_on(a.name) for a in self.losses
        )

    def record_expert_outputs(
        self, expert_outputs: torch.Tensor, kept: torch.Tensor | None = None
    ) -> None:
        """Take each token's raw outputs of its k experts [T',k,H] for the losses that read
        them and the overlap metric; ``kept`` [T] marks the T' tokens they are of (default all).
        Padding (the token context's mask) is left out."""
        inputs, mask = self._loss_inputs, self._token_mask
        if inputs is None:
            raise RuntimeError("record_expert_outputs before the router's forward")
        rows = kept if mask is None else (mask if kept is None else mask & kept)
        if rows is not None:
            inputs = _select(inputs, rows)
            if mask is not None:  # the rows of expert_outputs are those of kept (or all)
                expert_outputs = expert_outputs[rows if kept is None else rows[kept]]
        if self.wants_expert_outputs():
            inputs = dataclasses.replace(inputs, expert_outputs=expert_outputs)
            for a in self.losses:
                if a.entry.reads_expert_outputs and self.loss_weights.is_on(a.name):
                    self.raw_losses[a.name] = a.entry.compute(inputs, a.config)
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

    def coefficient(self, name: str) -> float:
        """How the raw value of ``name`` enters the total: ``sign × weight``, times this layer's
        balance yield for a loss that moves routing."""
        coef = self.loss_weights.coefficient(name)
        if self.balance.enabled and self.loss_weights.losses[name].entry.yields:
            coef *= self.balance.factor
        return coef

    def extra_repr(self) -> str:
        c = self.config
        return f"hidden={self.hidden_size}, experts={c.num_experts}, top_k={c.top_k}, score={c.score_func}"


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


def steer_balance(model: nn.Module) -> None:
    """After an optimizer step: steer every layer's balance yield (one collective)."""
    steer_budgets([r.balance for r in iter_routers(model)])


def balance_state(model: nn.Module) -> dict[str, object]:
    """The balance budget and every layer's yield, for the trainer state of a checkpoint."""
    return budget_state([r.balance for r in iter_routers(model)])


def restore_balance(
    model: nn.Module, state: dict[str, object] | None
) -> dict[str, tuple[float, float]]:
    """Continue the yields of :func:`balance_state` (``ValueError`` when they do not match) and
    cap calibrated weights restored from a checkpoint that predates the cap or another α.
    Returns ``{name: (restored, capped)}`` for the weights the cap lowered."""
    routers = iter_routers(model)
    restore_budgets([r.balance for r in routers], state)
    lowered: dict[str, tuple[float, float]] = {}
    for r in routers:
        for name in r.loss_weights.auto:
            was = r.loss_weights.value(name)
            now = capped_weight(r, name, was)
            if now < was:
                r.loss_weights.set(name, now)
                lowered[name] = (was, now)
    return lowered


def set_token_context(model: nn.Module, context: TokenContext | None) -> None:
    """Give every router the per-token labels of the coming forward (or clear them)."""
    for r in iter_routers(model):
        r.token_context = context


@dataclass
class CollectedLosses:
    """Weighted total and per-layer raw losses of one forward, by loss name."""

    total: torch.Tensor
    per_layer: list[dict[str, float]] = field(default_factory=list)
    means: dict[str, float] = field(default_factory=dict)
    loss_weights: dict[str, float] = field(default_factory=dict)
    calibrated: dict[str, float] | None = None  # {name: weight} chosen by this forward
    calibration_raw: dict[str, float] = field(default_factory=dict)  # {name: raw value}
    calibration_capped: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: {name: Σ_layers coefficient × raw}: what each loss adds to the total (signed)
    contributions: dict[str, float] = field(default_factory=dict)
    in_force: dict[str, float] = field(default_factory=dict)  # weights × yield, layer mean
    yields: list[float] = field(default_factory=list)  # per layer; empty without a budget


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
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return [v / world for v in all_reduce_floats(values)]


def capped_weight(router: Router, name: str, weight: float) -> float:
    """A calibrated ``weight`` of ``name`` under the balance budget's cap (variance only, and
    only with load balancing on: :func:`~moespec.routing.balance.variance_weight_cap`)."""
    aux = router.loss_weights.value("aux")
    if name != "variance" or not router.balance.enabled or not aux > 0 or math.isnan(weight):
        return weight
    cap = variance_weight_cap(aux, router.balance.budget, router.num_experts, router.top_k)
    return min(weight, cap)


def calibrate(
    routers: list[Router],
) -> tuple[dict[str, float], dict[str, float], dict[str, tuple[float, float]]] | None:
    """Set ``"auto"`` weights from the current raw losses (mean over layers and ranks).

    Calibrates only from a batch where every such router computed the loss on every rank (a
    training forward); after an eval forward the weight stays uncalibrated until the next one.
    A budget caps the variance weight (:func:`capped_weight`). Returns ``({name: weight},
    {name: raw value}, {name: (paper rule, cap)})`` or ``None`` when nothing was set.
    """
    todo = [r for r in routers if r.loss_weights.needs_calibration()]
    if not todo or not all(r.training for r in todo):  # the first *training* batch calibrates
        return None
    names = todo[0].loss_weights.uncalibrated()
    found = []
    for name in names:
        vals = [float(r.raw_losses[name].detach()) for r in todo if name in r.raw_losses]
        found += [sum(vals) / len(vals) if vals else 0.0, float(len(vals) == len(todo))]
    found = _mean_across_ranks(found)
    chosen, raw, capped = {}, {}, {}
    for i, name in enumerate(names):
        mean, complete = found[2 * i], found[2 * i + 1]
        if complete != 1.0:
            continue
        active = todo[0].loss_weights.losses[name]
        key = f"loss.{active.entry.node}.weight"
        paper = calibrate_weight(mean, active.target, key)
        chosen[name] = min(capped_weight(r, name, paper) for r in todo)
        raw[name] = mean
        if chosen[name] < paper:
            capped[name] = (paper, chosen[name])
    if not chosen:
        return None
    for r in todo:
        for name, value in chosen.items():
            r.loss_weights.set(name, value)
    return chosen, raw, capped


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
    """Weighted routing loss ``Σ_layers Σ_losses sign·weight·raw`` and per-layer raw values."""
    routers = [r for r in iter_routers(model) if r.raw_losses]
    calibration = calibrate(routers) if calibrate_auto else None
    total: torch.Tensor | None = None
    per_layer = []
    sums: dict[str, float] = {}
    contributions: dict[str, float] = {}
    in_force: dict[str, float] = {}
    for r in routers:
        layer_vals = {}
        for name, value in r.raw_losses.items():
            layer_vals[name] = float(value.detach())
            sums[name] = sums.get(name, 0.0) + layer_vals[name]
            coef = r.coefficient(name)
            if not math.isfinite(coef):
                continue  # not calibrated yet
            in_force[name] = in_force.get(name, 0.0) + abs(coef)
            contributions[name] = contributions.get(name, 0.0) + coef * layer_vals[name]
            if coef != 0 and value.requires_grad:
                term = coef * value
                total = term if total is None else total + term
        per_layer.append(layer_vals)
    if total is None:
        device = routers[0].weight.device if routers else "cpu"
        total = torch.zeros((), device=device)
    n = max(len(per_layer), 1)
    return CollectedLosses(
        total=total,
        per_layer=per_layer,
        means={k: v / n for k, v in sums.items()},
        loss_weights=routers[0].loss_weights.as_dict() if routers else {},
        calibrated=calibration[0] if calibration else None,
        calibration_raw=calibration[1] if calibration else {},
        calibration_capped=calibration[2] if calibration else {},
        contributions=contributions,
        in_force={k: v / n for k, v in in_force.items()},
        yields=[r.balance.factor for r in routers if r.balance.enabled],
    )


def drop_balance_counts(model: nn.Module) -> None:
    """Forget the expert counts of a step that was not applied (a skipped optimizer step)."""
    for r in iter_routers(model):
        r.balance.counts = None


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
