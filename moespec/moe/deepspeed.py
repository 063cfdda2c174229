"""DeepSpeed expert-parallel MoE backend, dispatching the moespec router's choices.

Shapes: S (=T) tokens, E experts, k experts per token, M (=H) hidden.

:class:`DeepSpeedExperts` is a ``deepspeed.moe.layer.MoE`` (so the DeepSpeed engine finds
it, builds its expert-parallel groups, reduces expert gradients over the expert-data group
and saves this rank's experts under ``deepspeed_moe.experts.deepspeed_experts.*``) whose
:class:`MoespecMOELayer` (a ``MOELayer`` with moespec's ``forward``) dispatches the routes the
layer's router chose, dropless: the routes are sorted by expert and exchanged with DeepSpeed
AutoEP's uneven all-to-all, so each rank's experts compute exactly the rows routed to them. The
combine all-to-all brings each token's k raw outputs back to its home rank; gradients flow back
through the same exchanges.
"""

from __future__ import annotations

import math

import torch
from deepspeed.moe.experts import Experts
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import MOELayer
from deepspeed.utils import groups
from torch import nn

from ..routing import Router, RouterConfig
from .backend import ExpertOutput, MoEBackend
from .config import MoEConfig
from .layer import run_experts
from .native import FusedExperts, SwiGLU

# One SwiGLU expert as DeepSpeed's ``Experts`` expects (a module applied to [..., H]); the
# same module as the shared expert, with Linear weights gate_up [2I,H], down [H,I].
SwiGLUExpert = SwiGLU


class DispatchPlanner(nn.Module):
    """Which of the router's routes are dispatched: all of them (dropless), or with
    ``drop_tokens`` and a ``capacity_factor`` those within each expert's capacity, taken in
    token order. ``forward(idx [S,k])`` → ``kept`` [S,k] bool."""

    def __init__(self, num_experts: int, capacity_factor: float, drop_tokens: bool) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.drop_tokens = drop_tokens
        self.ep_group = None
        self.dropped_routes = 0

    def _set_ep_group(self, ep_group) -> None:
        self.ep_group = ep_group

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        s, k = idx.shape
        if not (self.drop_tokens and self.capacity_factor > 0):
            self.dropped_routes = 0
            return torch.ones_like(idx, dtype=torch.bool)
        capacity = max(int(math.ceil(s * k / self.num_experts * self.capacity_factor)), 1)
        mask = torch.zeros(s, self.num_experts, dtype=torch.int64, device=idx.device)
        mask.scatter_(1, idx, 1)
        locations = (torch.cumsum(mask, dim=0) - 1).gather(1, idx)  # [S,k] place in its expert
        kept = locations < capacity
        self.dropped_routes = int((~kept).sum())
        return kept


class MoespecMOELayer(MOELayer):
    """Dropless expert-parallel dispatch of given routes, with each token's raw expert outputs
    back on its home rank.

    The routes are sorted by expert and exchanged with DeepSpeed AutoEP's uneven all-to-all
    (``compute_split_plan``, ``_AllToAllV``): each rank computes exactly the rows routed to its
    experts, with no capacity padding. ``rows_routed`` / ``rows_computed`` count this rank's
    rows of the last forward (routes it sent; rows its experts computed).
    """

    rows_routed = 0
    rows_computed = 0

    def forward(self, flat: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> ExpertOutput:
        if (
            groups.mpu is not None
            and getattr(groups.mpu, "get_tensor_model_parallel_world_size", lambda: 1)() > 1
        ):
            raise NotImplementedError(
                "moe.backend=deepspeed with tensor parallelism is not supported"
            )
        s, k = idx.shape
        kept = self.gate(idx)
        e = self.gate.num_experts
        experts_of_routes = torch.where(kept, idx, e).reshape(-1)  # a dropped route sorts last
        order = torch.argsort(experts_of_routes, stable=True)[: int(kept.sum())]  # kept, by expert
        counts = torch.bincount(experts_of_routes, minlength=e + 1)
        rows = self._exchange_and_compute(flat.index_select(0, order // k), counts[:-1])
        raw = rows.new_zeros(s * k, rows.shape[-1]).index_copy(0, order, rows).view(s, k, -1)
        gates = (weights * kept).float()
        combined = (raw.float() * gates.unsqueeze(-1)).sum(1).to(rows.dtype)
        dropped = ~kept.all(1) if self.gate.dropped_routes else None
        return ExpertOutput(
            raw=raw,
            combined=combined,
            dropped_tokens=dropped,
            dispatch_rows=(self.rows_computed, self.rows_routed),
        )

    def _exchange_and_compute(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """``rows`` sorted by expert, ``counts`` [E] per expert → the experts' outputs, same order."""
        from deepspeed.module_inject.auto_ep_layer import _AllToAllV, compute_split_plan

        self.rows_routed = rows.shape[0]
        if self.ep_size == 1:  # every expert is local: no exchange
            return self._run_local_experts(rows, counts.view(1, -1))
        plan = compute_split_plan(
            selected_experts=rows.new_empty(0, 1, dtype=torch.long),  # unused: counts are given
            num_experts=self.gate.num_experts,
            ep_size=self.ep_size,
            num_local_experts=self.num_local_experts,
            ep_group=self.ep_group,
            num_tokens_per_expert=counts,
        )
        rows = _AllToAllV.apply(self.ep_group, rows, plan.input_splits, plan.output_splits)
        out = self._run_local_experts(rows, plan.local_counts_by_source)
        return _AllToAllV.apply(self.ep_group, out, plan.output_splits, plan.input_splits)

    def _run_local_experts(self, rows: torch.Tensor, by_source: torch.Tensor) -> torch.Tensor:
        """Rows grouped by (source rank, local expert) → each local expert on its own rows."""
        self.rows_computed = rows.shape[0]
        local = torch.arange(self.num_local_experts, device=rows.device).repeat(by_source.shape[0])
        expert_of_row = local.repeat_interleave(by_source.reshape(-1).to(rows.device))
        order = torch.argsort(expert_of_row, stable=True)
        sizes = torch.bincount(expert_of_row, minlength=self.num_local_experts).tolist()
        grouped = rows.index_select(0, order).split(sizes)
        outs = [m(x) for m, x in zip(self.experts.deepspeed_experts, grouped, strict=True)]
        return torch.empty_like(rows).index_copy(0, order, torch.cat(outs))


def _template(hidden_size: int, moe: MoEConfig) -> nn.Module:
    """The expert ``Experts`` copies; its init is overwritten, so it draws from a forked RNG."""
    with torch.random.fork_rng(devices=[]):
        return SwiGLUExpert(hidden_size, moe.ffn_size)


class DeepSpeedExperts(MoE, MoEBackend):
    """The ``deepspeed`` backend: a ``deepspeed.moe.layer.MoE`` holding this rank's experts.

    Weights are drawn exactly as the native backend draws them (all E experts), and each rank
    keeps its own ``E / ep_size``, so a model built from the same seed is the same model for
    every backend and expert-parallel degree.
    """

    # Before the router moved to MoELayer this module was the layer itself (router in its gate).
    legacy_prefixes = {
        "deepspeed_moe.gate.router.": "router.",
        "deepspeed_moe.experts.": "experts.deepspeed_moe.experts.",
    }

    def __init__(self, hidden_size: int, moe: MoEConfig) -> None:
        self._init_moe(hidden_size, moe.num_experts, moe.ep_size)
        full = FusedExperts(moe.num_experts, hidden_size, moe.ffn_size)  # the native draws
        experts = self._init_dispatch(
            _template(hidden_size, moe), moe.capacity_factor, moe.drop_tokens
        )
        self._copy_local_experts(experts, full)

    def _init_moe(self, hidden_size: int, num_experts: int, ep_size: int) -> None:
        """Set what DeepSpeed's ``MoE`` and engine read (without ``MoE.__init__``)."""
        nn.Module.__init__(self)
        if num_experts % ep_size:
            raise ValueError(
                f"{num_experts} experts per MoE layer are not divisible by moe.ep_size={ep_size}"
            )
        self.use_residual = False
        self.enable_expert_tensor_parallelism = False
        self.ep_size = ep_size
        self.expert_group_name = f"ep_size_{ep_size}"
        self.num_experts = num_experts
        self.num_local_experts = num_experts // ep_size
        self.hidden_size = hidden_size

    def _init_dispatch(
        self, template: nn.Module, capacity_factor: float, drop_tokens: bool
    ) -> Experts:
        """This rank's copies of ``template`` and the ``MOELayer`` that routes to them."""
        experts = Experts(template, self.num_local_experts, self.expert_group_name)
        gate = DispatchPlanner(self.num_experts, capacity_factor, drop_tokens)
        self.deepspeed_moe = MoespecMOELayer(
            gate, experts, self.expert_group_name, self.ep_size, self.num_local_experts
        )
        return experts

    @torch.no_grad()
    def _copy_local_experts(self, experts: Experts, full: FusedExperts) -> None:
        """This rank's share of the E experts drawn in ``full``, into ``experts``."""
        for i, g in enumerate(self.local_expert_ids()):
            experts.deepspeed_experts[i].gate_up.weight.copy_(full.gate_up[g].T)
            experts.deepspeed_experts[i].down.weight.copy_(full.down[g].T)

    def _ep_rank(self) -> int:
        if self.ep_size == 1:
            return 0
        if not torch.distributed.is_initialized():
            raise RuntimeError(
                f"moe.ep_size={self.ep_size} needs torch.distributed initialised before the model is "
                "built (launch with deepspeed or torchrun)"
            )
        world = torch.distributed.get_world_size()
        if world % self.ep_size:
            raise ValueError(f"world size {world} is not divisible by moe.ep_size={self.ep_size}")
        return torch.distributed.get_rank() % self.ep_size

    def ensure_groups(self) -> None:
        """Create the expert-parallel groups if the DeepSpeed engine has not done so yet."""
        if self.deepspeed_moe.ep_group is None:
            self.set_deepspeed_parallelism()

    def forward(self, flat: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> ExpertOutput:
        if self.deepspeed_moe.ep_group is None:
            self.ensure_groups()
        return self.deepspeed_moe(flat, idx, weights)

    def local_expert_ids(self) -> list[int]:
        """Global ids of the experts that live on this rank."""
        start = self._ep_rank() * self.num_local_experts
        return list(range(start, start + self.num_local_experts))


class DeepSpeedMoELayer(DeepSpeedExperts):
    """A DeepSpeed MoE that owns its router, as Hugging Face expert-parallel blocks use it.

    The router lives under ``deepspeed_moe.gate.router`` (the names those checkpoints hold);
    moespec's own models use :class:`~moespec.moe.layer.MoELayer` with ``backend="deepspeed"``.
    """

    is_moespec_moe = True

    def __init__(
        self,
        hidden_size: int,
        moe: MoEConfig,
        router_config: RouterConfig,
        *,
        layer_index: int | None = None,
    ) -> None:
        if moe.shared_expert_size:
            raise ValueError("DeepSpeedMoELayer has no shared expert; use MoELayer")
        router = self._init_parallel(hidden_size, router_config, moe.ep_size, layer_index)
        full = FusedExperts(router_config.num_experts, hidden_size, moe.ffn_size)
        template = _template(hidden_size, moe)
        experts = self._init_experts(router, template, moe.capacity_factor, moe.drop_tokens)
        self._copy_local_experts(experts, full)

    def _init_parallel(
        self, hidden_size: int, router_config: RouterConfig, ep_size: int, layer_index: int | None
    ) -> Router:
        """Set what DeepSpeed's ``MoE`` and engine read; the router."""
        self._init_moe(hidden_size, router_config.num_experts, ep_size)
        return Router(hidden_size, router_config, layer_index=layer_index)

    def _init_experts(
        self, router: Router, template: nn.Module, capacity_factor: float, drop_tokens: bool
    ) -> Experts:
        """This rank's copies of ``template``, the ``MOELayer`` and ``router`` in its gate."""
        experts = self._init_dispatch(template, capacity_factor, drop_tokens)
        self.deepspeed_moe.gate.router = router
        return experts

    @property
    def router(self) -> Router:
        return self.deepspeed_moe.gate.router

    @property
    def top_k(self) -> int:
        return self.router.top_k

    def forward(
        self, hidden_states: torch.Tensor, used_token: torch.Tensor | None = None
    ) -> torch.Tensor:
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        return run_experts(self.router, super().forward, flat).view(hidden_states.shape)
