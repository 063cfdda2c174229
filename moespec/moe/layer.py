"""The MoE layer of every backend: router, the backend's experts, optional shared expert.

Shapes: T tokens, E experts, k experts per token, H hidden size.

The layer routes the flat tokens [T,H], runs the experts of its registered backend, hands
each token's raw expert outputs [T,k,H] (tokens with a dropped route left out) back to the
router for the orthogonality loss, and adds the shared expert.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..routing import Router, RouterConfig
from .backend import ExpertOutput, backend_builder, record_dispatch_rows
from .config import MoEConfig
from .native import SwiGLU


def run_experts(
    router: Router,
    experts: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], ExpertOutput],
    flat: torch.Tensor,
) -> torch.Tensor:
    """Route ``flat`` [T,H], run ``experts``, record their raw outputs on the router; [T,H]."""
    route = router(flat)
    out = experts(flat, route.idx, route.gate_weights)
    record_dispatch_rows(router, out)
    if out.dropped_tokens is None:
        router.record_expert_outputs(out.raw)
        return out.combined
    kept = ~out.dropped_tokens
    router.record_expert_outputs(out.raw[kept], kept=kept)
    if router.track_stats:  # share of tokens that lost a route, per layer and window
        router.stats.window.add(
            "dropped_tokens", float(out.dropped_tokens.float().mean()), "mean", count=len(kept)
        )
    return out.combined


class MoELayer(nn.Module):
    """Top-k MoE: router, the experts of backend ``backend``, optional shared expert.

    Input [..., H] → output [..., H]. The router keeps the losses and statistics. Weights are
    drawn router first, then the E experts, then the shared expert, whatever the backend.
    """

    is_moespec_moe = True

    def __init__(
        self,
        hidden_size: int,
        ffn_size: int,
        router_config: RouterConfig,
        *,
        shared_expert_size: int = 0,
        layer_index: int | None = None,
        backend: str = "native",
        **options: Any,
    ) -> None:
        """``options`` are the further :class:`MoEConfig` fields a backend reads (``ep_size``...)."""
        super().__init__()
        if hidden_size < 1 or ffn_size < 1:
            raise ValueError(
                f"hidden_size and ffn_size must be >= 1, got {hidden_size}, {ffn_size}"
            )
        build = backend_builder(backend)
        moe = MoEConfig(
            backend=backend,
            num_experts=router_config.num_experts,
            top_k=router_config.top_k,
            ffn_size=ffn_size,
            shared_expert_size=shared_expert_size,
            **options,
        )
        self.hidden_size = hidden_size
        self.ffn_size = ffn_size
        self.backend = backend
        self.router = Router(hidden_size, router_config, layer_index=layer_index)
        self.experts = build(hidden_size, moe)
        self.shared_expert = (
            SwiGLU(hidden_size, shared_expert_size) if shared_expert_size > 0 else None
        )
        weight = next(self.experts.parameters(), None)
        if weight is not None and weight.device != self.router.weight.device:
            self.router.to(weight.device)  # megablocks builds its experts on the GPU
            if self.shared_expert is not None:
                self.shared_expert.to(weight.device)

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    @property
    def top_k(self) -> int:
        return self.router.top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        out = run_experts(self.router, self.experts, flat)
        if self.shared_expert is not None:
            out = out + self.shared_expert(flat)
        return out.view(shape)

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        """Rename the keys of the backend's older layouts (``legacy_prefixes``), then load."""
        for old, new in self.experts.legacy_prefixes.items():
            for key in [k for k in state_dict if k.startswith(prefix + old)]:
                state_dict[prefix + new + key[len(prefix + old) :]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"backend={self.backend}, hidden={self.hidden_size}, ffn={self.ffn_size}, "
            f"shared={self.shared_expert is not None}"
        )
