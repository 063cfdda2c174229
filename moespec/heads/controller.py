"""Class-conditioned rescaling of attention heads at the input of the output projection."""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch
from torch import nn

from moespec.hooks import AttentionOutput, HookRegistry, find_attention_output_projections

from .selection import HeadProfile

MODES = ("hook", "fold")

log = logging.getLogger("moespec")

# o_proj modules that an active controller hooks or folds, with a description of that controller
_CONTROLLED: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def check_profile(profile: HeadProfile, outputs: list[AttentionOutput], model: nn.Module) -> None:
    """Raise ValueError if the profile's layer/head counts differ from the model's.

    A different ``model_type`` (when both are known) only logs a warning on the ``moespec`` logger.
    """
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
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type and profile.model_type not in ("", "unknown", model_type):
        log.warning(
            "head profile was made for model_type %r but the model is %r (%s); "
            "the selected heads may not mean the same here",
            profile.model_type,
            model_type,
            type(model).__name__,
        )


def _offloaded(module: nn.Module) -> bool:
    """True if the module's weight lives elsewhere (meta device, accelerate offload hook)."""
    if module.weight.is_meta:
        return True
    hook = getattr(module, "_hf_hook", None)
    hooks = getattr(hook, "hooks", None) or ([hook] if hook is not None else [])
    return any(getattr(h, "offload", False) for h in hooks)


def _memory(tensor: torch.Tensor) -> tuple[int, int, int]:
    """(storage pointer, first byte, end byte) that ``tensor`` can touch in its storage."""
    size = tensor.element_size()
    reach = sum((n - 1) * abs(s) for n, s in zip(tensor.shape, tensor.stride())) + 1
    start = tensor.storage_offset() * size
    return tensor.untyped_storage().data_ptr(), start, start + reach * size


class HeadController:
    """Context manager that scales the selected heads' outputs while the block runs.

    ``mode="hook"`` multiplies the o_proj input, viewed as (..., heads, head_dim), in a forward
    pre-hook; ``mode="fold"`` scales the o_proj weight columns and restores them bit-exactly.
    The model is checked before anything changes: an o_proj module used by more than one layer
    (both modes), an o_proj weight shared with another parameter or offloaded to the meta device
    (``fold``), and an o_proj already controlled by another active controller are ``ValueError``.
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
        self._claimed: list[nn.Module] = []
        self._active = False
        self.check_model()

    def __repr__(self) -> str:
        return f"HeadController(mode={self.mode!r}, id={id(self):#x})"

    def layer_gains(self) -> dict[int, torch.Tensor]:
        """Per-head float32 gains of the layers that have at least one gain other than 1."""
        gains = self.profile.gain_matrix()
        return {i: gains[i] for i in range(gains.shape[0]) if bool((gains[i] != 1.0).any())}

    def check_model(self) -> None:
        """Raise ValueError if the selected layers' o_proj cannot be scaled on their own."""
        layers = list(self.layer_gains())
        for layer in layers:
            out = self.outputs[layer]
            sharing = [o.layer for o in self.outputs if o.module is out.module]
            if len(sharing) > 1:
                raise ValueError(
                    f"layers {sharing} share one o_proj module ({out.name}); scaling head gains "
                    f"of layer {layer} would also scale the others (or apply the gain twice): "
                    "give each layer its own o_proj to use a HeadController"
                )
        if self.mode != "fold" or not layers:
            return
        for layer in layers:
            out = self.outputs[layer]
            if _offloaded(out.module):
                raise ValueError(
                    f"layer {layer}: the weight of {out.name} is offloaded (device "
                    f"{out.module.weight.device}, e.g. accelerate cpu_offload/device_map); "
                    "mode='fold' cannot change it in place: use mode='hook'"
                )
        params = [
            (name, _memory(param))
            for name, param in self.model.named_parameters(remove_duplicate=False)
            if not param.is_meta and param.numel()
        ]
        for layer in layers:
            out = self.outputs[layer]
            mine = _memory(out.module.weight)
            others = [
                name
                for name, memory in params
                if name != f"{out.name}.weight"
                and memory[0] == mine[0]
                and memory[1] < mine[2]
                and mine[1] < memory[2]
            ]
            if others:
                raise ValueError(
                    f"layer {layer}: the weight of {out.name} shares its storage with {others}; "
                    "mode='fold' would scale those too: use mode='hook' or untie the weights"
                )

    def __enter__(self) -> HeadController:
        if self._active:
            raise RuntimeError("HeadController is already active; it is not re-entrant")
        layer_gains = self.layer_gains()
        self.check_model()
        for layer in layer_gains:
            out = self.outputs[layer]
            owner = _CONTROLLED.get(out.module)
            if owner is not None:
                raise ValueError(
                    f"layer {layer}: {out.name} is already controlled by an active {owner}; "
                    "two controllers cannot scale the same o_proj at once: exit the other one "
                    "first, or use one profile with the combined gains"
                )
        self._active = True
        try:
            for layer, gains in layer_gains.items():
                out = self.outputs[layer]
                _CONTROLLED[out.module] = repr(self)
                self._claimed.append(out.module)
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
        # built on the CPU and moved to the input's device on first use: the weight may be on
        # the meta device (accelerate offload) and tells nothing about where inputs arrive
        scale32 = gains.repeat_interleave(out.head_dim)
        cache: dict[tuple[torch.dtype, torch.device, bool], torch.Tensor] = {}
        low_precision = (torch.float16, torch.bfloat16)

        def pre_hook(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0]
            low = x.dtype in low_precision
            dtype = torch.float32 if low else x.dtype
            # inference tensors made under inference_mode cannot be reused by autograd later
            key = (dtype, x.device, torch.is_inference_mode_enabled())
            scale = cache.get(key)
            if scale is None:
                scale = cache[key] = scale32.to(device=x.device, dtype=dtype)
            scaled = (x.float() * scale).to(x.dtype) if low else x * scale
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
        try:
            self.registry.remove(self.group)
            with torch.no_grad():
                while self._saved:
                    module, cols, original = self._saved.pop()
                    module.weight.data[:, cols] = original
        finally:
            while self._claimed:
                module = self._claimed.pop()
                if _CONTROLLED.get(module) == repr(self):
                    del _CONTROLLED[module]
            self._active = False
