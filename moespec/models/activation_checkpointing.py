"""Activation checkpointing that keeps the routing losses and statistics of the forward.

Non-reentrant checkpointing (``torch.utils.checkpoint(..., use_reentrant=False)``) runs a
layer's forward a second time inside backward. The routers of that layer then see the same
tokens again; :func:`replaying` keeps what the first forward recorded (raw losses with their
graph, statistics, pending score-bias counts) so that nothing is counted twice. Reentrant
checkpointing runs the first forward under ``no_grad``, so routing losses would carry no
gradient: it is refused while a routing loss is weighted.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..routing import iter_routers
from ..routing.router import Router


def recomputing() -> bool:
    """True inside backward, where non-reentrant checkpointing recomputes a forward."""
    return torch._C._current_graph_task_id() != -1


@contextlib.contextmanager
def replaying(routers: list[Router]) -> Iterator[None]:
    """Run a recomputation: the routers' recorded losses, statistics and bias counts stay those
    of the first forward."""
    kept = [
        (r, dict(r.raw_losses), r._loss_inputs, r._token_mask, r._pending_counts, r.track_stats)
        for r in routers
    ]
    biases = [_bias(r) for r in routers]
    for r in routers:
        r.track_stats = False
    try:
        yield
    finally:
        for (r, raw, inputs, mask, pending, track), bias in zip(kept, biases, strict=True):
            r.raw_losses, r._loss_inputs, r._token_mask = raw, inputs, mask
            r._pending_counts, r.track_stats = pending, track
            if bias is not None:
                with torch.no_grad():
                    r.score_correction_bias.copy_(bias)


def _bias(router: Router) -> torch.Tensor | None:
    bias = getattr(router, "score_correction_bias", None)
    return bias.detach().clone() if isinstance(bias, torch.Tensor) else None


def weighted_routing_losses(model: nn.Module) -> list[str]:
    """Names of the routing losses that enter the total (weight > 0 or ``auto``)."""
    routers = iter_routers(model)
    if not routers:
        return []
    return [a.name for a in routers[0].losses if routers[0].loss_weights.is_on(a.name)]


def check_reentrant(model: nn.Module, reentrant: bool) -> None:
    """Refuse reentrant checkpointing while a routing loss is weighted (it would be 0)."""
    names = weighted_routing_losses(model) if reentrant else []
    if names:
        raise ValueError(
            f"reentrant activation checkpointing with routing losses {names}: its forward runs "
            "without gradient, so they would silently train nothing; use use_reentrant=False "
            "(trainer.activation_checkpointing=true does)"
        )


def enable_activation_checkpointing(model: nn.Module, *, reentrant: bool = False) -> nn.Module:
    """Checkpoint every decoder layer of a tiny MoE LM, an HF wrapper or a transformers model."""
    check_reentrant(model, reentrant)
    if hasattr(model, "enable_activation_checkpointing"):  # the tiny MoE LM
        model.enable_activation_checkpointing()
        return model
    hf: Any = getattr(model, "hf_model", model)
    if not getattr(hf, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"trainer.activation_checkpointing=true: {type(hf).__name__} does not support "
            "activation checkpointing (expected the tiny MoE LM or a transformers model)"
        )
    hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    return model


__all__ = [
    "check_reentrant",
    "enable_activation_checkpointing",
    "recomputing",
    "replaying",
    "weighted_routing_losses",
]
