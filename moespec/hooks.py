"""Shared hook layer: the only place in moespec that registers PyTorch hooks.

A :class:`HookRegistry` keeps handles under group names so that one intervention (a loss
attachment, a head controller) can be removed as a whole, and ``with registry.group(...)``
detaches in ``finally`` so nothing stays hooked after the block, even when it raises.
The discovery helpers find decoder layers, attention output projections and MoE blocks in
moespec's own models and in transformers v5 models.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

HookKind = str  # "forward" | "forward_pre" | "backward" | "full_backward_pre"

_KINDS = ("forward", "forward_pre", "backward", "full_backward_pre")


class HookRegistry:
    """Registers hooks under group names and removes them group by group."""

    def __init__(self) -> None:
        self._groups: dict[str, list[RemovableHandle]] = {}

    def add(
        self,
        group: str,
        module: nn.Module,
        hook: Callable[..., Any],
        kind: HookKind = "forward",
        *,
        with_kwargs: bool = False,
        prepend: bool = False,
    ) -> RemovableHandle:
        """Register ``hook`` on ``module`` under ``group`` and return its handle."""
        if kind == "forward":
            handle = module.register_forward_hook(hook, with_kwargs=with_kwargs, prepend=prepend)
        elif kind == "forward_pre":
            handle = module.register_forward_pre_hook(
                hook, with_kwargs=with_kwargs, prepend=prepend
            )
        elif kind == "backward":
            handle = module.register_full_backward_hook(hook, prepend=prepend)
        elif kind == "full_backward_pre":
            handle = module.register_full_backward_pre_hook(hook, prepend=prepend)
        else:
            raise ValueError(f"unknown hook kind {kind!r}; valid kinds: {', '.join(_KINDS)}")
        self._groups.setdefault(group, []).append(handle)
        return handle

    def add_forward(
        self, group: str, module: nn.Module, hook: Callable[..., Any], **kw
    ) -> RemovableHandle:
        """Shorthand for a forward hook."""
        return self.add(group, module, hook, "forward", **kw)

    def add_forward_pre(
        self, group: str, module: nn.Module, hook: Callable[..., Any], **kw
    ) -> RemovableHandle:
        """Shorthand for a forward pre-hook."""
        return self.add(group, module, hook, "forward_pre", **kw)

    def add_backward(
        self, group: str, module: nn.Module, hook: Callable[..., Any], **kw
    ) -> RemovableHandle:
        """Shorthand for a full backward hook."""
        return self.add(group, module, hook, "backward", **kw)

    def remove(self, group: str) -> int:
        """Remove every hook of ``group``; returns how many were removed."""
        handles = self._groups.pop(group, [])
        for handle in handles:
            handle.remove()
        return len(handles)

    def remove_all(self) -> int:
        """Remove every hook this registry registered."""
        return sum(self.remove(g) for g in list(self._groups))

    def groups(self) -> list[str]:
        """Names of the groups that currently hold hooks."""
        return [g for g, hs in self._groups.items() if hs]

    def count(self, group: str | None = None) -> int:
        """Number of live hooks, in one group or in all."""
        if group is not None:
            return len(self._groups.get(group, []))
        return sum(len(h) for h in self._groups.values())

    @contextlib.contextmanager
    def group(self, name: str) -> Iterator[HookRegistry]:
        """Context manager: hooks added to ``name`` inside the block are removed on exit."""
        try:
            yield self
        finally:
            self.remove(name)


def count_hooks(model: nn.Module) -> int:
    """Total number of forward, pre-forward and backward hooks on all modules of ``model``."""
    total = 0
    for m in model.modules():
        total += len(m._forward_hooks) + len(m._forward_pre_hooks)
        total += len(m._backward_hooks) + len(getattr(m, "_backward_pre_hooks", {}))
    return total


# --------------------------------------------------------------------------- discovery

_DECODER_LIST_NAMES = ("layers", "h", "blocks", "decoder_layers")
# path components of encoder towers whose layer lists must never be taken for the text decoder
_ENCODER_PATH = re.compile(r"vision|visual|image|audio|speech|whisper|encoder")


def _decoder_root(model: nn.Module) -> nn.Module:
    """The module that holds the text decoder: ``get_decoder()``, else the text config's owner.

    Falls back to ``model`` itself when neither tells (moespec's own models, plain modules).
    """
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            decoder = get_decoder()
        except (AttributeError, NotImplementedError, ValueError):
            decoder = None
        if isinstance(decoder, nn.Module) and decoder is not model:
            return decoder
    config = getattr(model, "config", None)
    text_config = _text_config(model)
    if text_config is not None and text_config is not config:
        for _, mod in model.named_modules():
            if mod is not model and getattr(mod, "config", None) is text_config:
                return mod
    return model


def _layer_lists(root: nn.Module, prefix: str) -> list[tuple[str, list[nn.Module]]]:
    """(qualified name, items) of every candidate decoder-layer list under ``root``."""
    found = []
    for name, mod in root.named_modules():
        if not isinstance(mod, nn.ModuleList) or name.rsplit(".", 1)[-1] not in _DECODER_LIST_NAMES:
            continue
        if any(_ENCODER_PATH.search(part) for part in name.lower().split(".")):
            continue
        items = list(mod)
        if items and all(_find_attention(item) is not None for item in items):
            found.append((f"{prefix}.{name}" if prefix and name else prefix or name, items))
    return found


def find_decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of the language model, in order.

    The text decoder is resolved explicitly: ``model.get_decoder()`` where it exists, else the
    submodule that owns the text config, else (or when that holds no layers) ``model``. Inside
    it, the layers are the ``nn.ModuleList`` named ``layers``/``h``/``blocks``/``decoder_layers``
    whose items hold an attention module; lists under vision, audio, speech or encoder paths never
    count. When several lists remain the longest wins; a tie for the longest is a ``ValueError``.
    """
    root = _decoder_root(model)
    prefix = ""
    if root is not model:
        prefix = next((n for n, m in model.named_modules() if m is root), "")
    found = _layer_lists(root, prefix)
    if not found and root is not model:
        found = _layer_lists(model, "")
    if not found:
        raise ValueError(
            f"no decoder layers found in {type(model).__name__}"
            + (f" (text decoder {prefix!r})" if prefix else "")
            + f": expected an nn.ModuleList named one of {_DECODER_LIST_NAMES} whose items have "
            "a self-attention module, outside vision/audio/speech/encoder towers"
        )
    longest = max(len(items) for _, items in found)
    best = [(name, items) for name, items in found if len(items) == longest]
    if len(best) > 1:
        names = ", ".join(f"{name!r}" for name, _ in best)
        raise ValueError(
            f"cannot tell the text decoder of {type(model).__name__}: {len(best)} layer lists of "
            f"{longest} layers each ({names}); give the model a get_decoder() that returns the "
            "language model"
        )
    return best[0][1]


def _find_attention(layer: nn.Module) -> nn.Module | None:
    for attr in ("self_attn", "attn", "attention", "self_attention"):
        mod = getattr(layer, attr, None)
        if isinstance(mod, nn.Module):
            return mod
    return None


@dataclass
class AttentionOutput:
    """One attention output projection: where it is and how its input splits into heads."""

    layer: int
    name: str
    module: nn.Linear
    num_heads: int
    head_dim: int


_OUT_PROJ_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "wo", "proj")


def _head_counts(attn: nn.Module, config: Any, out_proj: nn.Linear) -> tuple[int, int]:
    num_heads = None
    for attr in ("num_heads", "num_attention_heads", "n_heads", "n_head"):
        if isinstance(getattr(attn, attr, None), int):
            num_heads = getattr(attn, attr)
            break
    if num_heads is None and config is not None:
        num_heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(attn, "head_dim", None)
    if head_dim is None and config is not None:
        head_dim = getattr(config, "head_dim", None)
    if num_heads is None and head_dim:
        num_heads = out_proj.in_features // head_dim
    if num_heads is None:
        raise ValueError(f"cannot tell the head count of {type(attn).__name__}")
    if head_dim is None:
        head_dim = out_proj.in_features // num_heads
    if num_heads * head_dim != out_proj.in_features:
        # e.g. DeepSeek-V3 (MLA): o_proj input is num_heads * v_head_dim
        head_dim = out_proj.in_features // num_heads
    return int(num_heads), int(head_dim)


def _text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        return config.get_text_config()
    return getattr(config, "text_config", config)


def find_attention_output_projections(model: nn.Module) -> list[AttentionOutput]:
    """The attention output projection (``o_proj`` or equivalent) of every decoder layer."""
    config = _text_config(model)
    found = []
    for i, layer in enumerate(find_decoder_layers(model)):
        attn = _find_attention(layer)
        proj = None
        for attr in _OUT_PROJ_NAMES:
            cand = getattr(attn, attr, None)
            if isinstance(cand, nn.Linear):
                proj = cand
                break
        if proj is None:
            raise ValueError(
                f"layer {i}: no output projection in {type(attn).__name__}; "
                f"looked for {_OUT_PROJ_NAMES}"
            )
        name = next(n for n, m in model.named_modules() if m is proj)
        heads, head_dim = _head_counts(attn, config, proj)
        found.append(AttentionOutput(i, name, proj, heads, head_dim))
    return found


#: attributes that mark experts declared with ``use_experts_implementation``
_EXPERTS_MARKERS = ("is_concatenated", "is_transposed", "has_gate", "_apply_gate")
#: where a transformers MoE block keeps its router (the default of ``models.specs.MoESpec``)
ROUTER_NAMES = ("gate", "router")


def base_module(module: Any) -> Any:
    """``module`` without peft's LoRA wrappers (the module itself when it has none)."""
    while hasattr(module, "get_base_layer") and hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def is_hf_experts(module: object) -> bool:
    """True for experts declared with transformers' ``use_experts_implementation`` (v5),
    also when peft wraps them (LoRA on the fused expert weights)."""
    module = base_module(module)
    return isinstance(module, nn.Module) and all(hasattr(module, a) for a in _EXPERTS_MARKERS)


def is_moe_block(module: nn.Module) -> bool:
    """True for moespec MoE layers and transformers MoE blocks (a router beside decorated experts)."""
    if getattr(module, "is_moespec_moe", False):
        return True
    if not is_hf_experts(getattr(module, "experts", None)):
        return False
    return any(isinstance(getattr(module, a, None), nn.Module) for a in ROUTER_NAMES)


def find_moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All MoE blocks of ``model`` as (qualified name, module), outermost first, no nesting."""
    found: list[tuple[str, nn.Module]] = []
    for name, mod in model.named_modules():
        if any(name.startswith(prev + ".") for prev, _ in found):
            continue
        if is_moe_block(mod):
            found.append((name, mod))
    return found
