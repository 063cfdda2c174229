"""The router probe: moespec's losses and statistics read from a transformers MoE block.

A forward hook on the block's router keeps the router's logits (or probabilities); the
block's experts, run by moespec's experts implementation, hand the probe the experts each
token chose, their gate weights and the raw expert outputs of that same (single) pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..routing import LossConfig, Router, RouterConfig, RouterOutput
from . import experts as X
from .activation_checkpointing import recomputing
from .lora import base_module
from .specs import MoESpec, first_attr, router_of


def _hidden_size(experts: nn.Module) -> int:
    if getattr(experts, "runs_probe", False):  # expert parallel: no fused weights here
        return int(experts.hidden_size)
    w = experts.gate_up_proj if experts.has_gate else experts.up_proj
    return int(w.shape[1] if experts.is_transposed else w.shape[2])


def _top_k(router: nn.Module, block: nn.Module, experts: nn.Module) -> int:
    names = ("top_k", "num_experts_per_tok", "moe_topk", "top_k_experts")
    k = first_attr(router, names) or first_attr(block, names)
    if k is None:
        k = first_attr(experts.config, names)
    if not isinstance(k, int):
        raise ValueError(f"{type(block).__name__}: cannot tell top-k (looked for {names})")
    return k


class HFRouterProbe(Router):
    """A :class:`Router` view of one transformers MoE block; owns no parameters.

    The block, its router and its experts are plain attributes, so the probe never becomes
    part of the model's module tree, state dict or parameters.
    """

    def __init__(
        self,
        block: nn.Module,
        loss_config: LossConfig,
        spec: MoESpec,
        *,
        model_type: str,
        layer_index: int | None = None,
        name: str = "",
    ) -> None:
        nn.Module.__init__(self)  # Router.__init__ would create a new gate weight
        experts = base_module(block.experts)  # peft's ParamWrapper adapts it in place
        self_dispatching = getattr(experts, "runs_probe", False)  # expert parallel
        if not self_dispatching:
            X.check_experts(experts, name or type(block).__name__)
        router = base_module(router_of(block, spec))
        if router is None:
            raise ValueError(
                f"{name or type(block).__name__} ({type(block).__name__}) has no router module "
                f"at {spec.router}; give its model_type a spec in moespec.models.specs.SPECS"
            )
        score = spec.score_func
        if score is None:
            has_bias = first_attr(router, spec.correction_bias) is not None
            score = "sigmoid" if has_bias else "softmax"
        config = RouterConfig(
            num_experts=int(experts.num_experts),
            top_k=_top_k(router, block, experts),
            score_func=score,
            normalize_topk=bool(first_attr(router, spec.norm_topk, True)),
            normalize_top1=True,
            score_bias=False,  # the router's correction bias is the model's own
            loss=loss_config,
        )
        self._init_state(_hidden_size(experts), config, layer_index)
        self.name = name
        self.model_type = model_type
        self.spec = spec
        self.track_overlap = True
        self._logits: torch.Tensor | None = None
        object.__setattr__(self, "block", block)
        object.__setattr__(self, "gate", router)
        object.__setattr__(self, "experts", experts)
        own = None if self_dispatching else X.own_implementation(experts, None)
        object.__setattr__(self, "own_forward", own)

    @property
    def weight(self) -> torch.Tensor | None:  # type: ignore[override]
        """The router's own weight [E,H] (shared, not copied), when it has one."""
        w = getattr(self.gate, "weight", None)
        return w if isinstance(w, torch.Tensor) else None

    def set_own_implementation(self, forward: Callable[..., torch.Tensor]) -> None:
        """The experts forward to run when no raw output is needed (the model's configured one)."""
        object.__setattr__(self, "own_forward", forward)

    def needs_expert_outputs(self) -> bool:
        """Whether this forward needs the raw expert outputs (a loss, or the overlap metric)."""
        return self.wants_expert_outputs() or (self.track_stats and self.track_overlap)

    def observe_router(self, output: Any) -> None:
        """Keep the router's logits (or probabilities) [T,E] of this forward."""
        first = output[0] if isinstance(output, tuple) else output
        if not isinstance(first, torch.Tensor) or first.shape[-1] != self.num_experts:
            found = tuple(first.shape) if isinstance(first, torch.Tensor) else type(first).__name__
            raise ValueError(
                f"{self.name}: the router {type(self.gate).__name__} returned {found}; expected "
                f"its {self.spec.router_output} [..., {self.num_experts}] first"
            )
        self._logits = first.reshape(-1, self.num_experts)

    def _output(self, idx: torch.Tensor, weights: torch.Tensor) -> RouterOutput:
        if self._logits is None:
            raise RuntimeError(
                f"{self.name}: the experts ran before the router {type(self.gate).__name__} "
                "gave its output; the block does not call its router as a module"
            )
        first, self._logits = self._logits.float(), None
        if self.spec.router_output == "probs":
            scores, logits = first, first.clamp_min(1e-20).log()
        elif self.config.score_func == "sigmoid":
            probs = first.sigmoid()
            scores, logits = probs / probs.sum(-1, keepdim=True).clamp_min(1e-20), first
        else:
            scores, logits = first.softmax(-1), first
        return RouterOutput(logits=logits, scores=scores, idx=idx, gate_weights=weights)

    def observe_choice(
        self, idx: torch.Tensor, weights: torch.Tensor, raw: torch.Tensor | None = None
    ) -> None:
        """The losses and statistics from the experts' call: choices, gate weights, raw outputs.

        Inside backward (a checkpoint recomputing the forward) the same ops run again so the
        checkpoint sees the same saved tensors, but the forward's losses and stats are kept.
        """
        out = self._output(idx, weights)
        replay = recomputing()
        kept, track = self.raw_losses, self.track_stats
        if replay:
            self.track_stats = False
        try:
            self._compute_losses(out)
            if raw is not None:
                self.record_expert_outputs(raw)
        finally:
            if replay:
                self.raw_losses, self.track_stats = kept, track

    def forward(self, x: torch.Tensor) -> RouterOutput:
        """Never called: the block routes with its own router and the hooks report to the probe
        (a ``Router`` module must define ``forward``)."""
        raise RuntimeError(f"{type(self).__name__} observes the block's router; it is not called")

    def extra_repr(self) -> str:
        return f"{self.name or self.model_type}: " + super().extra_repr()
