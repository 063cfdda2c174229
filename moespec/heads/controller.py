"""Class-conditioned rescaling of attention heads at the input of the output projection."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moespec.hooks import AttentionOutput, HookRegistry, find_attention_output_projections

from .selection import HeadProfile

MODES = ("hook", "fold")


def check_profile(profile: HeadProfile, outputs: list[AttentionOutput], model: nn.Module) -> None:
    """Raise ValueError if the profile's layer/head counts differ from the model's."""
    model_shape = (len(outputs), outputs[0].num_heads)
    profile_shape = (profile.num_layers, profile.num_heads)
    if model_shape != profile_shape:
        raise ValueError(
            f"head profile is for {profile_shape[0]} layers x {profile_shape[1]} heads "
            f"(model_type {profile.model_type!r}) but {type(model).__name__} has "
            f"{model_shape[0]} layers x {model_shape[1]} heads"
        )
    uneven = [o.layer for o in outputs if o.num_heads != model_shape[1]]
    if uneven:
        raise ValueError(f"layers {uneven} have a head count other than {model_shape[1]}")


class HeadController:
    """Context manager that scales the selected heads' outputs while the block runs.

    ``mode="hook"`` multiplies the o_proj input, viewed as (..., heads, head_dim), in a forward
    pre-hook; ``mode="fold"`` scales the o_proj weight columns and restores them bit-exactly.
    """

    def __init__(
        self,
        model: nn.Module,
        profile: HeadProfile,
        mode: str = "hook",
        *,
        registry: HookRegistry | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
        self.model = model
        self.profile = profile
        self.mode = mode
        self.registry = registry or HookRegistry()
        self.group = f"moespec.heads.controller.{id(self)}"
        self.outputs = find_attention_output_projections(model)
        check_profile(profile, self.outputs, model)
        self._saved: list[tuple[nn.Linear, slice, torch.Tensor]] = []
        self._active = False

    def layer_gains(self) -> dict[int, torch.Tensor]:
        """Per-head float32 gains of the layers that have at least one gain other than 1."""
        gains = self.profile.gain_matrix()
        return {i: gains[i] for i in range(gains.shape[0]) if bool((gains[i] != 1.0).any())}

    def __enter__(self) -> HeadController:
        if self._active:
            raise RuntimeError("HeadController is already active; it is not re-entrant")
        self._active = True
        try:
            for layer, gains in self.layer_gains().items():
                out = self.outputs[layer]
                if self.mode == "hook":
                    self._add_hook(out, gains)
                else:
                    self._fold(out, gains)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    def _add_hook(self, out: AttentionOutput, gains: torch.Tensor) -> None:
        weight = out.module.weight
        scale32 = gains.repeat_interleave(out.head_dim).to(weight.device)
        cache: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        low_precision = (torch.float16, torch.bfloat16)

        def pre_hook(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0]
            if x.dtype in low_precision:
                scaled = (x.float() * scale32.to(x.device)).to(x.dtype)
            else:
                key = (x.dtype, x.device)
                scale = cache.get(key)
                if scale is None:
                    scale = cache[key] = scale32.to(device=x.device, dtype=x.dtype)
                scaled = x * scale
            return (scaled, *args[1:])

        self.registry.add_forward_pre(self.group, out.module, pre_hook)

    def _fold(self, out: AttentionOutput, gains: torch.Tensor) -> None:
        weight = out.module.weight
        with torch.no_grad():
            for head in (gains != 1.0).nonzero().flatten().tolist():
                cols = slice(head * out.head_dim, (head + 1) * out.head_dim)
                original = weight.data[:, cols].clone()
                self._saved.append((out.module, cols, original))
                scaled = original.float() * float(gains[head])
                weight.data[:, cols] = scaled.to(weight.dtype)

    def _restore(self) -> None:
        self.registry.remove(self.group)
        with torch.no_grad():
            while self._saved:
                module, cols, original = self._saved.pop()
                module.weight.data[:, cols] = original
        self._active = False
