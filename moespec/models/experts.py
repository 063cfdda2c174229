"""moespec's experts implementation in transformers' ``ExpertsInterface``.

Shapes: T tokens, k experts per token, H hidden, E experts. transformers dispatches the forward
of every experts class declared with ``use_experts_implementation`` by
``config._experts_implementation``. Attaching moespec sets it to ``"moespec"``: the experts run
once, as transformers' ``grouped_mm`` runs them (the class's own ``_apply_gate``, biases and
layout flags), the raw (ungated) outputs [T,k,H] go to the block's probe, and the block gets
the gated sum it would get from its configured implementation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .specs import EXPERTS_LAYOUT_FLAGS

IMPLEMENTATION = "moespec"
EXPERTS_PROBE_ATTR = "_moespec_experts_probe"  # plain attribute of an experts module: its probe


def _moe_module() -> Any:
    from transformers.integrations import moe

    return moe


def check_interface() -> None:
    """Fail with one clear line when the installed transformers moved its experts dispatch."""
    import transformers

    moe = _moe_module()
    missing = [
        name
        for name in ("ALL_EXPERTS_FUNCTIONS", "ExpertsInterface", "_grouped_linear")
        if not hasattr(moe, name)
    ]
    if missing:
        raise RuntimeError(
            f"transformers {transformers.__version__}: transformers.integrations.moe lacks "
            f"{missing}; moespec's experts implementation needs the v5 ExpertsInterface"
        )


def register() -> None:
    """Register moespec's implementation in transformers' ``ExpertsInterface`` (idempotent)."""
    check_interface()
    moe = _moe_module()
    if moe.ALL_EXPERTS_FUNCTIONS.get(IMPLEMENTATION) is not moespec_experts_forward:
        moe.ExpertsInterface.register(IMPLEMENTATION, moespec_experts_forward)


def own_implementation(experts: nn.Module, name: str | None) -> Callable[..., torch.Tensor]:
    """The forward that implementation ``name`` gives ``experts`` (``eager``: the class's own)."""
    wrapped = getattr(type(experts).forward, "__wrapped__", None)
    if wrapped is None:
        raise RuntimeError(
            f"{type(experts).__name__}.forward is not dispatched by use_experts_implementation "
            "(no __wrapped__); the installed transformers changed its experts decorator"
        )
    if name in (None, "eager", IMPLEMENTATION):
        return wrapped
    return _moe_module().ALL_EXPERTS_FUNCTIONS.get_interface(name, wrapped)


def check_experts(experts: nn.Module, where: str) -> None:
    """Refuse experts whose layout flags moespec's implementation does not know."""
    missing = [f for f in EXPERTS_LAYOUT_FLAGS if not hasattr(experts, f)]
    if missing:
        raise ValueError(
            f"{where}.experts ({type(experts).__name__}) lacks the layout flags {missing}; "
            "expected experts declared with transformers' use_experts_implementation"
        )
    if getattr(experts, "_is_expert_parallel", False):
        raise ValueError(
            f"{where}.experts runs transformers' own expert parallelism; moespec needs all "
            "experts on each rank (use moe.backend=deepspeed for expert parallelism)"
        )


def raw_expert_outputs(
    experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor
) -> torch.Tensor:
    """Each token's k raw expert outputs [T,k,H] in one grouped pass (as ``grouped_mm`` runs)."""
    moe = _moe_module()
    t, k = top_k_index.shape
    ids = top_k_index.reshape(-1)
    ids_g, perm = torch.sort(ids)
    x_g = hidden_states[perm // k]
    hist = ids_g.float() if hidden_states.device.type in ("cpu", "mps") else ids_g.int()
    n = experts.num_experts
    counts = torch.histc(hist, bins=n, min=0, max=n - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    if experts.has_gate:
        w, b = experts.gate_up_proj, getattr(experts, "gate_up_proj_bias", None)
    else:
        w, b = experts.up_proj, getattr(experts, "up_proj_bias", None)
    bias = b[ids_g] if experts.has_bias else None
    h = moe._grouped_linear(x_g, w, offsets, bias=bias, is_transposed=experts.is_transposed)
    h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
    bias = experts.down_proj_bias[ids_g] if experts.has_bias else None
    y = moe._grouped_linear(
        h, experts.down_proj, offsets, bias=bias, is_transposed=experts.is_transposed
    )
    if experts.has_post_expert_norm:
        y = experts.post_expert_norm(y)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return y[inverse].view(t, k, -1)


def moespec_experts_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The ``"moespec"`` entry of ``ExpertsInterface``: one expert pass, outputs to the probe."""
    probe = self.__dict__.get(EXPERTS_PROBE_ATTR)
    if probe is None:
        return own_implementation(self, None)(self, hidden_states, top_k_index, top_k_weights)
    if not probe.needs_expert_outputs():
        probe.observe_choice(top_k_index, top_k_weights)
        return probe.own_forward(self, hidden_states, top_k_index, top_k_weights)
    raw = raw_expert_outputs(self, hidden_states, top_k_index)
    probe.observe_choice(top_k_index, top_k_weights, raw)
    out = (raw * top_k_weights.unsqueeze(-1)).sum(dim=1)
    return out.to(hidden_states.dtype)
