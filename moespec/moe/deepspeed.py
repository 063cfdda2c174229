"""DeepSpeed expert-parallel MoE with moespec's router as its gate.

:class:`DeepSpeedMoELayer` is a ``deepspeed.moe.layer.MoE`` (so the DeepSpeed engine finds
it, builds its expert-parallel groups and reduces expert gradients over the expert-data
group) whose ``MOELayer`` uses a moespec :class:`~moespec.routing.Router`. After the combine
all-to-all, each token's raw outputs from its k experts are gathered on its home rank from
the expert output buffer, by (expert, capacity slot), and handed to the router for the
orthogonality loss; gradients flow back through DeepSpeed's all-to-all.
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
from .config import MoEConfig
from .native import FusedExperts, SwiGLU

# One SwiGLU expert as DeepSpeed's ``Experts`` expects (a module applied to [..., H]); the
# same module as the native layer's shared expert, with Linear weights gate_up [2I,H], down [H,I].
SwiGLUExpert = SwiGLU


class MoespecGate(nn.Module):
    """Adapts a moespec router to the gate protocol of DeepSpeed's ``MOELayer``.

    Returns ``(l_aux, capacity, num_experts, indices, locations, gates, exp_counts)`` with
    per-route tensors laid out [k, S]; routes past the capacity get index -1 (dropped).
    """

    def __init__(self, router: Router, capacity_factor: float, drop_tokens: bool) -> None:
        super().__init__()
        self.router = router
        self.capacity_factor = capacity_factor
        self.drop_tokens = drop_tokens
        self.ep_group = None
        self.dropped_routes = 0

    def _set_ep_group(self, ep_group) -> None:
        self.ep_group = ep_group

    def forward(
        self, x: torch.Tensor, used_token=None, sparse_routes: bool = True, use_tutel: bool = False
    ):
        route = self.router(x)
        s, k = route.idx.shape
        e = self.router.num_experts
        mask = torch.zeros(s, e, dtype=torch.int64, device=x.device).scatter_(1, route.idx, 1)
        exp_counts = mask.sum(0)
        locations = (torch.cumsum(mask, dim=0) - 1).gather(1, route.idx)  # [S,k]
        if self.drop_tokens and self.capacity_factor > 0:
            capacity = max(int(math.ceil(s * k / e * self.capacity_factor)), 1)
        else:
            capacity = int(exp_counts.max()) if s else 1
            if self.ep_group is not None and torch.distributed.get_world_size(self.ep_group) > 1:
                cap = torch.tensor([capacity], device=x.device)
                torch.distributed.all_reduce(
                    cap, op=torch.distributed.ReduceOp.MAX, group=self.ep_group
                )
                capacity = int(cap)
            capacity = max(capacity, 1)
        kept = locations < capacity
        self.dropped_routes = int((~kept).sum())
        indices = torch.where(kept, route.idx, torch.full_like(route.idx, -1))
        gates = route.weights * kept
        aux = self.router.raw_losses["aux"]
        return (
            aux,
            torch.tensor(capacity),
            e,
            indices.t().contiguous().to(torch.int32),
            (locations * kept).t().contiguous().to(torch.int32),
            gates.t().contiguous().float(),
            exp_counts,
        )


class MoespecMOELayer(MOELayer):
    """DeepSpeed's ``MOELayer`` forward, plus the gather of raw expert outputs per token."""

    def forward(self, *inputs: torch.Tensor, **kwargs) -> torch.Tensor:
        if (
            groups.mpu is not None
            and getattr(groups.mpu, "get_tensor_model_parallel_world_size", lambda: 1)() > 1
        ):
            raise NotImplementedError(
                "moe.backend=deepspeed with tensor parallelism is not supported"
            )
        x = inputs[0]
        d_model = x.shape[-1]
        flat = x.reshape(-1, d_model)
        self.l_aux, capacity, num_experts, indices, locations, gates, self.exp_counts = self.gate(
            flat, None, True
        )
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
        # Losses and overlap over the tokens that kept all k routes: a dropped route has no
        # expert output to be orthogonal to (it would enter as a zero vector).
        per_token = raw.transpose(0, 1)
        if self.gate.dropped_routes:
            per_token = per_token[(indices >= 0).all(0)]
        self.gate.router.record_expert_outputs(per_token)
        combined = (raw.float() * gates.unsqueeze(-1)).sum(0).to(expert_output.dtype)
        return combined.reshape(x.shape)


class DeepSpeedMoELayer(MoE):
    """``deepspeed.moe.layer.MoE`` with a moespec router; same interface as the native layer.

    Weights are drawn exactly as the native layer draws them (router, then all E experts),
    and each rank keeps its own ``E / ep_size`` experts, so a model built from the same seed
    is the same model for every backend and expert-parallel degree.
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
        router = self._init_parallel(hidden_size, router_config, moe.ep_size, layer_index)
        e = router_config.num_experts
        full = FusedExperts(e, hidden_size, moe.ffn_size)  # same RNG draws as the native layer
        with torch.random.fork_rng(devices=[]):  # the template's init is overwritten below
            template = SwiGLUExpert(hidden_size, moe.ffn_size)
        experts = self._init_experts(router, template, moe.capacity_factor, moe.drop_tokens)
        with torch.no_grad():
            for i, g in enumerate(self.local_expert_ids()):
                experts.deepspeed_experts[i].gate_up.weight.copy_(full.gate_up[g].T)
                experts.deepspeed_experts[i].down.weight.copy_(full.down[g].T)
        del full
        self.shared_expert = (
            SwiGLU(hidden_size, moe.shared_expert_size) if moe.shared_expert_size > 0 else None
        )

    def _init_parallel(
        self, hidden_size: int, router_config: RouterConfig, ep_size: int, layer_index: int | None
    ) -> Router:
        """Set what DeepSpeed's ``MoE`` and engine read (without ``MoE.__init__``); the router."""
        nn.Module.__init__(self)
        e = router_config.num_experts
        if e % ep_size:
            raise ValueError(
                f"{e} experts per MoE layer are not divisible by moe.ep_size={ep_size}"
            )
        self.use_residual = False
        self.enable_expert_tensor_parallelism = False
        self.ep_size = ep_size
        self.expert_group_name = f"ep_size_{ep_size}"
        self.num_experts = e
        self.num_local_experts = e // ep_size
        self.hidden_size = hidden_size
        return Router(hidden_size, router_config, layer_index=layer_index)

    def _init_experts(
        self, router: Router, template: nn.Module, capacity_factor: float, drop_tokens: bool
    ) -> Experts:
        """This rank's copies of ``template`` and the ``MOELayer`` that routes to them."""
        experts = Experts(template, self.num_local_experts, self.expert_group_name)
        gate = MoespecGate(router, capacity_factor, drop_tokens)
        self.deepspeed_moe = MoespecMOELayer(
            gate, experts, self.expert_group_name, self.ep_size, self.num_local_experts
        )
        return experts

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

    @property
    def router(self) -> Router:
        return self.deepspeed_moe.gate.router

    @property
    def top_k(self) -> int:
        return self.router.top_k

    def ensure_groups(self) -> None:
        """Create the expert-parallel groups if the DeepSpeed engine has not done so yet."""
        if self.deepspeed_moe.ep_group is None:
            self.set_deepspeed_parallelism()

    def forward(
        self, hidden_states: torch.Tensor, used_token: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.deepspeed_moe.ep_group is None:
            self.ensure_groups()
        out = self.deepspeed_moe(hidden_states)
        if self.shared_expert is not None:
            out = out + self.shared_expert(hidden_states)
        return out

    def local_expert_ids(self) -> list[int]:
        """Global ids of the experts that live on this rank."""
        start = self._ep_rank() * self.num_local_experts
        return list(range(start, start + self.num_local_experts))
