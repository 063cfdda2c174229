"""MoE layers: one :class:`MoELayer` (router, experts, shared expert) over registered backends.

Backends: native (dropless), deepspeed (expert parallel), megablocks (CUDA only); see
:mod:`moespec.moe.backend` for the interface and :func:`register_backend`.
"""

from __future__ import annotations

from ..routing import LossConfig, validate_loss_config, validate_router_config
from .backend import (
    BackendUnavailableError,
    ExpertOutput,
    MoEBackend,
    backend_names,
    register_backend,
)
from .config import BACKENDS, MoEConfig
from .layer import MoELayer
from .native import FusedExperts, SwiGLU


def build_moe_layer(
    hidden_size: int, moe: MoEConfig, loss: LossConfig, *, layer_index: int | None = None
) -> MoELayer:
    """The MoE layer of ``moe`` on backend ``moe.backend``, with the given loss weights."""
    moe.validate()
    router_cfg = moe.router_config(loss)
    validate_router_config(router_cfg)
    validate_loss_config(router_cfg.loss)
    return MoELayer(
        hidden_size,
        moe.ffn_size,
        router_cfg,
        shared_expert_size=moe.shared_expert_size,
        layer_index=layer_index,
        backend=moe.backend,
        ep_size=moe.ep_size,
        capacity_factor=moe.capacity_factor,
        drop_tokens=moe.drop_tokens,
    )


__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "ExpertOutput",
    "FusedExperts",
    "MoEBackend",
    "MoEConfig",
    "MoELayer",
    "SwiGLU",
    "backend_names",
    "build_moe_layer",
    "register_backend",
]
