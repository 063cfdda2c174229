"""The interface of a MoE backend (token dispatcher + experts) and the registry of backends.

Shapes: T tokens, E experts, k experts per token, H hidden size.

A backend receives the flat tokens [T,H] and the router's choice, ``idx`` [T,k] and
``weights`` [T,k], and returns an :class:`ExpertOutput`: each token's k raw (ungated) expert
outputs [T,k,H], the gate-weighted output [T,H] and the tokens it dropped. The router and the
shared expert belong to :class:`~moespec.moe.layer.MoELayer`, the same for every backend.
``moe.backend`` names a builder in the registry; :func:`register_backend` adds one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from ..routing import Router
    from .config import MoEConfig


class BackendUnavailableError(RuntimeError):
    """A MoE backend cannot run on this machine (missing accelerator or package)."""


@dataclass
class ExpertOutput:
    """What a backend computed for T tokens."""

    raw: torch.Tensor  # [T,k,H] each token's k expert outputs before gating (0 where dropped)
    combined: torch.Tensor  # [T,H] the gate-weighted sum of the k outputs
    dropped_tokens: torch.Tensor | None = None  # [T] bool: tokens that lost a route; None: none
    #: expert parallel: (rows this rank's experts computed, routes this rank sent) in this pass
    dispatch_rows: tuple[int, int] | None = None


def record_dispatch_rows(router: Router, out: ExpertOutput) -> None:
    """Log ``dispatch_rows_ratio``, rows computed per routed row (1: nothing padded), on
    ``router``; summed over micro-batches and ranks before the ratio is taken."""
    if out.dispatch_rows is None or not router.track_stats:
        return
    computed, routed = out.dispatch_rows
    if routed:
        router.stats.window.add("dispatch_rows_ratio", computed / routed, "mean", count=routed)


class MoEBackend(nn.Module):
    """Token dispatcher + experts: ``forward(flat [T,H], idx [T,k], weights [T,k])``.

    ``legacy_prefixes`` maps state-dict prefixes of older layouts (relative to the MoE layer)
    to the names they load as now.
    """

    legacy_prefixes: ClassVar[dict[str, str]] = {}

    def forward(self, flat: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> ExpertOutput:
        raise NotImplementedError


def combine(raw: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Gate-weighted sum of the k expert outputs: ``raw`` [T,k,H], ``weights`` [T,k] → [T,H]."""
    return torch.bmm(weights.to(raw.dtype).unsqueeze(1), raw).squeeze(1)


#: ``builder(hidden_size, moe)`` → the experts of one MoE layer.
BackendBuilder = Callable[[int, "MoEConfig"], MoEBackend]

_REGISTRY: dict[str, BackendBuilder] = {}


def register_backend(name: str) -> Callable[[BackendBuilder], BackendBuilder]:
    """Decorator: register ``builder(hidden_size, moe)`` as ``moe.backend=name``."""

    def add(builder: BackendBuilder) -> BackendBuilder:
        if name in _REGISTRY:
            raise ValueError(f"a MoE backend named {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder

    return add


def backend_names() -> tuple[str, ...]:
    """The registered backend names, in registration order."""
    return tuple(_REGISTRY)


def backend_builder(name: str) -> BackendBuilder:
    """The builder registered as ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"moe.backend={name!r}; valid: {', '.join(_REGISTRY)}") from None


# The built-in backends import their modules (deepspeed, megablocks) only when built.
@register_backend("native")
def _native(hidden_size: int, moe: MoEConfig) -> MoEBackend:
    from .native import FusedExperts

    return FusedExperts(moe.num_experts, hidden_size, moe.ffn_size)


@register_backend("deepspeed")
def _deepspeed(hidden_size: int, moe: MoEConfig) -> MoEBackend:
    from .deepspeed import DeepSpeedExperts

    return DeepSpeedExperts(hidden_size, moe)


@register_backend("megablocks")
def _megablocks(hidden_size: int, moe: MoEConfig) -> MoEBackend:
    from .megablocks import MegaBlocksExperts

    return MegaBlocksExperts(hidden_size, moe)
