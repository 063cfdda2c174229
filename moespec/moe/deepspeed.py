"""DeepSpeed expert-parallel MoE backend, dispatching the moespec router's choices.

Shapes: S (=T) tokens, E experts, k experts per token, C capacity per expert, M (=H) hidden.

:class:`DeepSpeedExperts` is a ``deepspeed.moe.layer.MoE`` (so the DeepSpeed engine finds
it, builds its expert-parallel groups, reduces expert gradients over the expert-data group
and saves this rank's experts under ``deepspeed_moe.experts.deepspeed_experts.*``) whose
``MOELayer`` dispatches the routes the layer's router chose. After the combine all-to-all,
each token's raw outputs from its k experts are gathered on its home rank from the expert
output buffer, by (expert, capacity slot); gradients flow back through DeepSpeed's all-to-all.
"""

from __future__ import annotations

import math

import torch
from deepspeed.moe.experts import Experts
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import MOELayer, _AllToAll
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
    """Turns the router's choice into the dispatch plan of DeepSpeed's gate protocol.

    Returns ``(capacity, num_experts, indices, locations, gates, exp_counts)`` with per-route
    tensors laid out [k, S]; routes past the capacity get index -1 (dropped).
    """

    def __init__(self, num_experts: int, capacity_factor: float, drop_tokens: bool) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.drop_tokens = drop_tokens
        self.ep_group = None
        self.dropped_routes = 0

    def _set_ep_group(self, ep_group) -> None:
        self.ep_group = ep_group

    def forward(self, idx: torch.Tensor, weights: torch.Tensor):
        s, k = idx.shape
        e = self.num_experts
        mask = torch.zeros(s, e, dtype=torch.int64, device=idx.device).scatter_(1, idx, 1)
        exp_counts = mask.sum(0)
        locations = (torch.cumsum(mask, dim=0) - 1).gather(1, idx)  # [S,k]
        if self.drop_tokens and self.capacity_factor > 0:
            capacity = max(int(math.ceil(s * k / e * self.capacity_factor)), 1)
        else:
            capacity = int(exp_counts.max()) if s else 1
            if self.ep_group is not None and torch.distributed.get_world_size(self.ep_group) > 1:
                cap = torch.tensor([capacity], device=idx.device)
                torch.distributed.all_reduce(
                    cap, op=torch.distributed.ReduceOp.MAX, group=self.ep_group
                )
                capacity = int(cap)
            capacity = max(capacity, 1)
        kept = locations < capacity
        self.dropped_routes = int((~kept).sum())
        indices = torch.where(kept, idx, torch.full_like(idx, -1))
        gates = weights * kept
        return (
            torch.tensor(capacity),
            e,
            indices.t().contiguous().to(torch.int32),
            (locations * kept).t().contiguous().to(torch.int32),
            gates.t().contiguous().float(),
            exp_counts,
        )


class MoespecMOELayer(MOELayer):
    """DeepSpeed's ``MOELayer`` on given routes, plus the gather of raw expert outputs per token."""

    def forward(self, flat: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> ExpertOutput:
        if (
            groups.mpu is not None
            and getattr(groups.mpu, "get_tensor_model_parallel_world_size", lambda: 1)() > 1
        ):
            raise NotImplementedError(
                "moe.backend=deepspeed with tensor parallelism is not supported"
            )
        d_model = flat.shape[-1]
        capacity, num_experts, indices, locations, gates, self.exp_counts = self.gate(idx, weights)
        s, c, e = flat.shape[0], int(capacity), num_experts
        slots = torch.where(
            indices >= 0,
            indices.long() * c + locations.long(),
            torch.full_like(indices, e * c).long(),
        )
        # Place each routed token in its (expert, slot) of the [E, C, M] buffer with one gather.
        source = torch.full((e * c + 1,), s, dtype=torch.long, device=flat.device)
        source.scatter_(
            0, slots.reshape(-1), torch.arange(s, device=flat.device).expand_as(slots).reshape(-1)
        )
        padded = torch.cat([flat, flat.new_zeros(1, d_model)])
        dispatched = padded.index_select(0, source[:-1]).view(e, c, d_model)
        if self.ep_size > 1:
            dispatched = _AllToAll.apply(self.ep_group, dispatched)
        dispatched = dispatched.reshape(self.ep_size, self.num_local_experts, -1, d_model)
        expert_output = self.experts(dispatched).reshape(
            self.ep_size * self.num_local_experts, -1, d_model
        )
        if self.ep_size > 1:
            expert_output = _AllToAll.apply(self.ep_group, expert_output)
        out_padded = torch.cat(
            [expert_output.reshape(e * c, d_model), expert_output.new_zeros(1, d_model)]
        )
        raw = out_padded.index_select(0, slots.reshape(-1)).view(
            slots.shape[0], s, d_model
        )  # [k,S,M]
        combined = (raw.float() * gates.unsqueeze(-1)).sum(0).to(expert_output.dtype)
        # A dropped route has no expert output (it would enter the losses as a zero vector).
        dropped = ~(indices >= 0).all(0) if self.gate.dropped_routes else None
        return ExpertOutput(raw=raw.transpose(0, 1), combined=combined, dropped_tokens=dropped)


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
