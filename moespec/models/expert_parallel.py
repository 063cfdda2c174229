"""Expert parallelism for transformers MoE blocks: the routed experts on moespec's dispatch.

Shapes: T tokens, k experts per token, H hidden, E experts, I expert FFN width. Only the
block's experts module is replaced: its routed experts are sharded over ``moe.ep_size`` ranks
and run through the dropless dispatch of :mod:`moespec.moe.deepspeed` on the routes the block's
own router chose, so the router, shared experts, jitter and every family's routing rule stay the
model's own. Each expert keeps the class's layout (biases, transposed or interleaved weights,
its ``_apply_gate``) and the loaded model's dtype. The router probe
(:func:`moespec.models.hf.attach`) gets each token's k raw outputs from the same pass.
:meth:`HFExpertParallelExperts.gather_hf_state` gathers the experts back for export under the
original names.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..hooks import find_moe_blocks
from ..moe.backend import record_dispatch_rows
from . import experts as X
from .hf import model_type_of
from .specs import EXPERTS_LAYOUT_FLAGS

logger = logging.getLogger("moespec")


def _first_proj(experts: nn.Module) -> str:
    return "gate_up_proj" if experts.has_gate else "up_proj"


class HFExpert(nn.Module):
    """One routed expert of a transformers experts module, as DeepSpeed's ``Experts`` applies it.

    ``proj`` [D,H] (D = 2I gated, else I) and ``down`` [H,I] are ``nn.Linear`` layers (biases
    when the class has them); the gate is the class's own ``_apply_gate`` on this module, which
    carries the class's plain attributes (``act_fn``, clamp limits, layout flags).
    """

    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        first = getattr(experts, _first_proj(experts))
        d_first = first.shape[2] if experts.is_transposed else first.shape[1]
        down = experts.down_proj
        hidden, ffn = (down.shape[2], down.shape[1]) if experts.is_transposed else down.shape[1:]
        self.proj = nn.Linear(int(hidden), int(d_first), bias=bool(experts.has_bias))
        self.down = nn.Linear(int(ffn), int(hidden), bias=bool(experts.has_bias))
        for name, value in experts.__dict__.items():
            if not name.startswith("_") and name not in ("training", "config"):
                setattr(self, name, value)
        for name, module in experts.named_children():
            if name != "post_expert_norm":  # shared by the experts: applied after the dispatch
                setattr(self, name, module)  # act_fn
        self._gate = type(experts)._apply_gate if experts.has_gate else None

    @torch.no_grad()
    def load_from(self, experts: nn.Module, e: int) -> None:
        """Copy expert ``e`` of ``experts`` (the class's layout) into this module."""
        first = getattr(experts, _first_proj(experts))[e]
        down = experts.down_proj[e]
        t = experts.is_transposed
        self.proj.weight.copy_(first.T if t else first)
        self.down.weight.copy_(down.T if t else down)
        if experts.has_bias:
            self.proj.bias.copy_(getattr(experts, _first_proj(experts) + "_bias")[e])
            self.down.bias.copy_(experts.down_proj_bias[e])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        h = self._gate(self, h) if self._gate is not None else self.act_fn(h)
        return self.down(h)


def _deepspeed_experts_class() -> type:
    from ..moe.deepspeed import DeepSpeedExperts

    class HFExpertParallelExperts(DeepSpeedExperts):
        """A transformers experts module whose experts live on ``ep_size`` ranks.

        ``forward(hidden_states [T,H], top_k_index [T,k], top_k_weights [T,k])`` as the class's
        own; the layout flags are kept, so the block is still found as an MoE block.
        """

        runs_probe = True  # hands the probe its raw outputs itself (no ExpertsInterface)
        _apply_gate = None  # each HFExpert applies the class's own

        def __init__(
            self, experts: nn.Module, ep_size: int, capacity_factor: float, drop_tokens: bool
        ) -> None:
            template = HFExpert(experts)
            self._init_moe(template.proj.in_features, int(experts.num_experts), ep_size)
            local = self._init_dispatch(template, capacity_factor, drop_tokens)
            for i, e in enumerate(self.local_expert_ids()):
                local.deepspeed_experts[i].load_from(experts, e)
            self.deepspeed_moe.experts.to(experts.down_proj.dtype)  # the loaded model's dtype
            for flag in EXPERTS_LAYOUT_FLAGS:
                setattr(self, flag, getattr(experts, flag))
            self._is_expert_parallel = False  # transformers' own expert parallelism: not used
            # one norm for all experts (not an expert parameter), on each token's home rank
            self.post_expert_norm = (
                experts.post_expert_norm if experts.has_post_expert_norm else None
            )
            self.config = experts.config
            object.__setattr__(self, "_hf_experts_class", type(experts))

        def forward(
            self,
            hidden_states: torch.Tensor,
            top_k_index: torch.Tensor,
            top_k_weights: torch.Tensor,
        ) -> torch.Tensor:
            if self.deepspeed_moe.ep_group is None:
                self.ensure_groups()
            out = self.deepspeed_moe(hidden_states, top_k_index.long(), top_k_weights)
            raw, combined = out.raw, out.combined
            if self.post_expert_norm is not None:
                raw = self.post_expert_norm(raw)
                combined = (raw.float() * top_k_weights.unsqueeze(-1).float()).sum(dim=1)
            probe = self.__dict__.get(X.EXPERTS_PROBE_ATTR)
            if probe is not None:
                probe.observe_choice(
                    top_k_index, top_k_weights, raw if probe.needs_expert_outputs() else None
                )
                record_dispatch_rows(probe, out)
            return combined.to(hidden_states.dtype)

        @torch.no_grad()
        def gather_hf_state(self) -> dict[str, torch.Tensor]:
            """The experts' weights under the original class's names, from every EP rank."""
            local = self.deepspeed_moe.experts.deepspeed_experts
            parts = {
                "proj.weight": torch.stack([x.proj.weight for x in local]),
                "down.weight": torch.stack([x.down.weight for x in local]),
            }
            if self.has_bias:
                parts["proj.bias"] = torch.stack([x.proj.bias for x in local])
                parts["down.bias"] = torch.stack([x.down.bias for x in local])
            if self.ep_size > 1:
                parts = {k: self._all_gather(v) for k, v in parts.items()}
            first = "gate_up_proj" if self.has_gate else "up_proj"
            t = (lambda w: w.transpose(1, 2)) if self.is_transposed else (lambda w: w)
            state = {first: t(parts["proj.weight"]), "down_proj": t(parts["down.weight"])}
            if self.has_bias:
                state[first + "_bias"] = parts["proj.bias"]
                state["down_proj_bias"] = parts["down.bias"]
            if self.post_expert_norm is not None:
                for k, v in self.post_expert_norm.state_dict().items():
                    state[f"post_expert_norm.{k}"] = v
            return {k: v.detach().contiguous().cpu() for k, v in state.items()}

        def _all_gather(self, value: torch.Tensor) -> torch.Tensor:
            group = self.deepspeed_moe.ep_group
            if group is None:
                raise RuntimeError("expert-parallel group not created; run a forward first")
            out = [torch.empty_like(value) for _ in range(self.ep_size)]
            dist.all_gather(out, value.contiguous(), group=group)
            return torch.cat(out)

    return HFExpertParallelExperts


def is_expert_parallel(module: nn.Module) -> bool:
    """True for an experts module converted by :func:`convert_expert_parallel`."""
    return getattr(module, "runs_probe", False) and hasattr(module, "gather_hf_state")


def convert_expert_parallel(model: nn.Module, moe_cfg: Any) -> int:
    """Replace the experts of every MoE block of ``model`` by expert-parallel ones; the count.

    ``moe_cfg``: ``ep_size``, ``capacity_factor``, ``drop_tokens`` (a ``MoEConfig``).
    """
    model_type = model_type_of(model)
    blocks = find_moe_blocks(model)
    if not blocks:
        raise ValueError(
            f"no MoE blocks found in {type(model).__name__} (model_type {model_type!r})"
        )
    cls = _deepspeed_experts_class()
    for name, block in blocks:
        experts = block.experts
        X.check_experts(experts, name)
        if experts.num_experts % moe_cfg.ep_size:
            raise ValueError(
                f"{name}.experts: {experts.num_experts} experts are not divisible by "
                f"moe.ep_size={moe_cfg.ep_size}"
            )
        block.experts = cls(experts, moe_cfg.ep_size, moe_cfg.capacity_factor, moe_cfg.drop_tokens)
    logger.info(
        "expert parallel: %d %s MoE blocks run their %d experts through moespec's dispatch "
        "(ep_size=%d)",
        len(blocks),
        model_type,
        blocks[0][1].experts.num_experts,
        moe_cfg.ep_size,
    )
    return len(blocks)
