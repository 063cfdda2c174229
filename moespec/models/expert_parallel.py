"""Expert parallelism for transformers MoE blocks through DeepSpeed's ``MOELayer``.

The routed experts of every block are sharded over ``moe.ep_size`` ranks; the router is
moespec's, configured from the family's spec (score function, correction bias, grouped top-k,
routed scaling); shared experts and their gate stay plain modules. Expert weights keep the
loaded model's dtype. :meth:`HFExpertParallelBlock.gather_hf_state` gathers them back for
export under the original names.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..hooks import find_moe_blocks
from ..routing import LossConfig, Router, RouterConfig, validate_router_config
from .hf import _gate_of, model_type_of
from .specs import first_attr, spec_for

logger = logging.getLogger("moespec")

EP_MODEL_TYPES = (
    "deepseek_v3",
    "mixtral",
    "olmoe",
    "qwen2_moe",
    "qwen3_moe",
)  # tested with 2 ranks
_SHARED_ATTRS = ("shared_expert", "shared_expert_gate", "shared_experts")


def _check_layout(experts: nn.Module, block_name: str) -> None:
    """DeepSpeed's experts here are gated ``[gate; up]`` linears without bias: refuse others."""
    flags = {
        "has_gate": True,
        "is_concatenated": True,
        "is_transposed": False,
        "has_bias": False,
        "has_post_expert_norm": False,
    }
    wrong = {
        f: getattr(experts, f, None)
        for f, want in flags.items()
        if getattr(experts, f, want) != want
    }
    if wrong:
        raise ValueError(
            f"moe.backend=deepspeed: {block_name}.experts has layout {wrong}; expert parallel "
            f"supports experts with {flags} (use moe.backend=native for this family)"
        )


class HFExpert(nn.Module):
    """One gated expert of a transformers MoE block as DeepSpeed's ``Experts`` applies it."""

    def __init__(
        self, hidden_size: int, ffn_size: int, act_fn: Callable[[torch.Tensor], torch.Tensor]
    ):
        super().__init__()
        self.gate_up = nn.Linear(
            hidden_size, 2 * ffn_size, bias=False
        )  # [2I,H]: gate rows, then up
        self.down = nn.Linear(ffn_size, hidden_size, bias=False)  # [H,I]
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.act_fn(g) * u)


def _deepspeed_moe_class() -> type:

    from ..moe.deepspeed import DeepSpeedMoELayer

    class HFDeepSpeedMoE(DeepSpeedMoELayer):
        """A moespec ``DeepSpeedMoELayer`` holding this rank's share of an HF block's experts."""

        def __init__(
            self,
            hidden_size: int,
            ffn_size: int,
            router_config: RouterConfig,
            act_fn: Callable[[torch.Tensor], torch.Tensor],
            *,
            ep_size: int,
            capacity_factor: float,
            drop_tokens: bool,
            layer_index: int | None,
        ) -> None:
            router = self._init_parallel(hidden_size, router_config, ep_size, layer_index)
            template = HFExpert(hidden_size, ffn_size, act_fn)
            self._init_experts(router, template, capacity_factor, drop_tokens)
            self.shared_expert = None

    return HFDeepSpeedMoE


class HFExpertParallelBlock(nn.Module):
    """A transformers MoE block whose routed experts run through DeepSpeed's ``MOELayer``.

    The router reproduces the block's own (softmax, top-k, optional renormalisation); shared
    experts and their gate stay plain modules. :meth:`to_hf_block` rebuilds the original block.
    """

    def __init__(
        self, block: nn.Module, model_type: str, loss: LossConfig, moe_cfg: Any, layer_index: int
    ) -> None:
        super().__init__()
        gate = _gate_of(block)
        experts = block.experts
        num_experts, hidden = gate.weight.shape
        _check_layout(experts, type(block).__name__)
        ffn = experts.down_proj.shape[2]
        spec = spec_for(model_type)
        bias = first_attr(gate, spec.correction_bias)
        score = spec.score_func or ("sigmoid" if bias is not None else "softmax")
        routing: dict[str, Any] = {
            "score_func": score,
            "num_groups": int(first_attr(gate, spec.num_groups, 1)),
            "topk_groups": int(first_attr(gate, spec.topk_groups, 1)),
            "scaling": float(first_attr(gate, spec.routed_scaling, 1.0)),
        }
        if bias is not None:  # the model's fixed correction bias, not updated by moespec
            routing.update(score_bias=True, bias_update_rate=0.0)
        router_cfg = RouterConfig(
            num_experts=int(num_experts),
            top_k=int(gate.top_k),
            normalize_topk=bool(first_attr(gate, spec.norm_topk, True)),
            normalize_top1=True,  # Hugging Face gates renormalise a single weight to 1.0 too
            jitter=0.0,
            loss=loss,
            **routing,
        )
        validate_router_config(router_cfg)
        self.moe = _deepspeed_moe_class()(
            int(hidden),
            int(ffn),
            router_cfg,
            experts.act_fn,
            ep_size=moe_cfg.ep_size,
            capacity_factor=moe_cfg.capacity_factor,
            drop_tokens=moe_cfg.drop_tokens,
            layer_index=layer_index,
        )
        dtype = experts.down_proj.dtype  # the loaded model's, whatever the engine's precision
        self.moe.deepspeed_moe.experts.to(dtype)
        with torch.no_grad():
            self.moe.router.weight.copy_(gate.weight.float())
            if bias is not None:
                self.moe.router.score_correction_bias.copy_(bias)
            for i, e in enumerate(self.moe.local_expert_ids()):
                ds_expert = self.moe.deepspeed_moe.experts.deepspeed_experts[i]
                ds_expert.gate_up.weight.copy_(experts.gate_up_proj[e])
                ds_expert.down.weight.copy_(experts.down_proj[e])
        for attr in _SHARED_ATTRS:
            module = getattr(block, attr, None)
            setattr(self, attr, module)
        self.jitter_noise = float(getattr(block, "jitter_noise", 0.0) or 0.0)
        self.model_type = model_type
        self.has_correction_bias = bias is not None
        self.top_k = int(gate.top_k)
        self.router_dtype = gate.weight.dtype
        object.__setattr__(self, "_hf_block_class", type(block))
        object.__setattr__(self, "_hf_config", getattr(block, "config", None))

    @property
    def router(self) -> Router:
        """The moespec router (carries the losses and statistics)."""
        return self.moe.router

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.training and self.jitter_noise > 0:
            noise = torch.empty_like(hidden_states).uniform_(
                1.0 - self.jitter_noise, 1.0 + self.jitter_noise
            )
            hidden_states = hidden_states * noise
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        out = self.moe(flat)
        if self.shared_expert is not None:
            shared = self.shared_expert(flat)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
            out = out + shared
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.reshape(shape)

    @torch.no_grad()
    def gather_hf_state(self) -> dict[str, torch.Tensor]:
        """The block's weights under the original block's names, experts from every EP rank."""
        ds_experts = self.moe.deepspeed_moe.experts.deepspeed_experts
        gate_up = torch.stack([x.gate_up.weight.detach() for x in ds_experts])
        down = torch.stack([x.down.weight.detach() for x in ds_experts])
        group = self.moe.deepspeed_moe.ep_group
        if self.moe.ep_size > 1:
            if group is None:
                raise RuntimeError("expert-parallel group not created; run a forward first")
            gate_ups = [torch.empty_like(gate_up) for _ in range(self.moe.ep_size)]
            downs = [torch.empty_like(down) for _ in range(self.moe.ep_size)]
            dist.all_gather(gate_ups, gate_up.contiguous(), group=group)
            dist.all_gather(downs, down.contiguous(), group=group)
            gate_up, down = torch.cat(gate_ups), torch.cat(downs)
        state = {
            "gate.weight": self.moe.router.weight.detach().to(self.router_dtype).cpu(),
            "experts.gate_up_proj": gate_up.cpu(),
            "experts.down_proj": down.cpu(),
        }
        if self.has_correction_bias:
            state["gate.e_score_correction_bias"] = (
                self.moe.router.score_correction_bias.detach().cpu()
            )
        for attr in _SHARED_ATTRS:
            module = getattr(self, attr)
            if module is not None:
                state.update(
                    {f"{attr}.{k}": v.detach().cpu() for k, v in module.state_dict().items()}
                )
        return state


def convert_expert_parallel(model: nn.Module, loss: LossConfig, moe_cfg: Any) -> int:
    """Replace every MoE block of ``model`` by an :class:`HFExpertParallelBlock`; returns the count."""
    model_type = model_type_of(model)
    blocks = find_moe_blocks(model)
    if not blocks:
        raise ValueError(
            f"no MoE blocks found in {type(model).__name__} (model_type {model_type!r})"
        )
    for i, (name, block) in enumerate(blocks):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        ep_block = HFExpertParallelBlock(block, model_type, loss, moe_cfg, i)
        setattr(parent, attr, ep_block)
    experts = blocks[0][1].experts.gate_up_proj.shape[0]
    logger.info(
        "expert parallel: %d %s MoE blocks run their %d experts through DeepSpeed MOELayer (ep_size=%d)",
        len(blocks),
        model_type,
        experts,
        moe_cfg.ep_size,
    )
    return len(blocks)
