"""MoE layers: native (dropless), deepspeed (expert parallel), megablocks (CUDA only)."""

from __future__ import annotations

from torch import nn

from ..routing import LossConfig, validate_router_config
from .config import BACKENDS, MoEConfig
from .native import FusedExperts, MoELayer, SwiGLU


def build_moe_layer(
    hidden_size: int, moe: MoEConfig, loss: LossConfig, *, layer_index: int | None = None
) -> nn.Module:
    """Build the MoE layer of ``moe.backend``; every backend exposes ``.router`` the same way."""
    moe.validate()
    router_cfg = moe.router_config(loss)
    validate_router_config(router_cfg)
    if moe.backend == "native":
        return MoELayer(
            hidden_size,
            moe.ffn_size,
            router_cfg,
            shared_expert_size=moe.shared_expert_size,
            layer_index=layer_index,
        )
    if moe.backend == "deepspeed":
        from .deepspeed import DeepSpeedMoELayer

        return DeepSpeedMoELayer(hidden_size, moe, router_cfg, layer_index=layer_index)
    from .megablocks import MegaBlocksMoELayer

    return MegaBlocksMoELayer(hidden_size, moe, router_cfg, layer_index=layer_index)


__all__ = ["BACKENDS", "FusedExperts", "MoEConfig", "MoELayer", "SwiGLU", "build_moe_layer"]
