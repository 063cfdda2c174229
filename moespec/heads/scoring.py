"""Per-head attention mass from the last prompt token onto the image tokens (or a token span)."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from moespec.hooks import HookRegistry, find_attention_output_projections

Span = tuple[int, int]

_GROUP = "moespec.heads.score"


def image_token_id_of(model: nn.Module) -> int | None:
    """The image placeholder token id from the model config, or None if it has none."""
    config = getattr(model, "config", None)
    for attr in ("image_token_id", "image_token_index", "media_placeholder_token_id"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return None


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Switch ``model`` to eager attention inside the block and restore every config after."""
    configs = {}
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation_internal"):
            configs[id(cfg)] = (cfg, cfg._attn_implementation_internal)
    text_cfg = _text_config(model)
    if text_cfg is None or getattr(text_cfg, "_attn_implementation", "eager") == "eager":
        yield
        return
    if not hasattr(model, "set_attn_implementation"):
        raise ValueError(
            f"{type(model).__name__} uses {text_cfg._attn_implementation!r} attention; head scores "
            "need attention weights: load the model with attn_implementation='eager'"
        )
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        for cfg, impl in configs.values():
            cfg._attn_implementation_internal = impl


def _text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


def _attended(batch: Mapping[str, Any], input_ids: torch.Tensor) -> torch.Tensor:
    """Boolean [batch, seq] mask of the real (not padding) tokens, from ``attention_mask``."""
    mask = batch.get("attention_mask")
    if mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    mask = mask.to(input_ids.device).bool()
    return mask.unsqueeze(0) if mask.dim() == 1 else mask


def _span_mask(attended: torch.Tensor, span: Span, index: int) -> torch.Tensor:
    """Mask of the span in each row, counted from the row's first attended token.

    Under left padding, position 0 is the first real token of the row, as in the row alone;
    negative positions count from the row's end. A span reaching unattended positions raises.
    """
    mask = torch.zeros_like(attended)
    for row in range(attended.shape[0]):
        real = attended[row].nonzero().flatten().tolist()
        where = f" of row {row}" if attended.shape[0] > 1 else ""
        if not real:
            raise ValueError(f"input {index}: row {row} has no attended tokens (attention_mask)")
        first, length = real[0], real[-1] - real[0] + 1
        start, end = (int(s) for s in span)
        start, end = (start + length if start < 0 else start), (end + length if end < 0 else end)
        if not 0 <= start < end <= length:
            raise ValueError(
                f"input {index}: span {tuple(span)} is empty or outside the sequence of "
                f"{length} tokens{where}; valid: 0 <= start < end <= {length}, counted from "
                "the first attended token"
            )
        if not bool(attended[row, first + start : first + end].all()):
            raise ValueError(
                f"input {index}: span {tuple(span)}{where} covers positions that "
                "attention_mask marks as padding; give the span of each row separately"
            )
        mask[row, first + start : first + end] = True
    return mask


def _context_mask(
    input_ids: torch.Tensor,
    attended: torch.Tensor,
    span: Span | None,
    image_token_id: int | None,
    index: int,
) -> torch.Tensor:
    """Boolean [batch, seq] mask of the attended context positions (image tokens or the span)."""
    if span is not None:
        return _span_mask(attended, span, index)
    if image_token_id is None:
        raise ValueError(
            "the model config has no image_token_id; pass image_token_id= or span=(start, end)"
        )
    # padding never counts, also when the pad id equals the image token id
    mask = (input_ids == image_token_id) & attended
    empty = (~mask.any(dim=-1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"input {index}: row(s) {empty} have no image tokens (image_token_id={image_token_id}) "
            "among the attended positions; pass inputs made by the model's processor with an "
            "image, or a span=(start, end)"
        )
    return mask


def _last_positions(batch: Mapping[str, Any], input_ids: torch.Tensor) -> torch.Tensor:
    """Index of the last prompt token per row (honours right padding via attention_mask)."""
    seq = input_ids.shape[-1]
    mask = batch.get("attention_mask")
    if mask is None:
        return torch.full((input_ids.shape[0],), seq - 1, dtype=torch.long)
    positions = torch.arange(seq, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, -1).amax(dim=-1).cpu()


def score_heads(
    model: nn.Module,
    inputs_iter: Iterable[Mapping[str, Any] | torch.Tensor],
    *,
    image_token_id: int | None = None,
    span: Span | None = None,
) -> torch.Tensor:
    """Attention mass of the last prompt token's query on the image tokens, per head.

    Returns a float32 tensor [num_layers, num_heads] averaged over all rows of ``inputs_iter``
    (dicts of model inputs, or input_ids tensors; a dict may carry its own ``"span"``).
    Padded batches score like their rows alone: positions that ``attention_mask`` marks as
    padding never count as context, the query is each row's last attended token, and a span is
    counted from each row's first attended token (so left padding needs no shifted span).
    """
    outputs = find_attention_output_projections(model)
    attn_modules = [model.get_submodule(o.name.rsplit(".", 1)[0]) for o in outputs]
    num_heads = outputs[0].num_heads
    if image_token_id is None and span is None:
        image_token_id = image_token_id_of(model)
    totals = torch.zeros(len(outputs), num_heads, dtype=torch.float64)
    state: dict[str, Any] = {}

    def make_hook(layer: int):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise RuntimeError(
                    f"layer {layer}: the attention module returned no weights; "
                    "head scores need eager attention"
                )
            rows = torch.arange(weights.shape[0], device=weights.device)
            last = weights[rows, :, state["last"].to(weights.device), :].float()
            mask = state["mask"].to(weights.device)[:, None, : last.shape[-1]]
            state["mass"][layer] = (last * mask).sum(dim=-1).double().cpu()

        return hook

    forward_params = inspect.signature(model.forward).parameters
    registry = HookRegistry()
    rows_seen = 0
    with eager_attention(model), registry.group(_GROUP), torch.inference_mode():
        for i, module in enumerate(attn_modules):
            registry.add_forward(_GROUP, module, make_hook(i))
        for index, item in enumerate(inputs_iter):
            batch = dict(item) if isinstance(item, Mapping) else {"input_ids": item}
            item_span = batch.pop("span", None)
            item_span = span if item_span is None else item_span
            input_ids = batch["input_ids"]
            if input_ids.dim() == 1:
                input_ids = batch["input_ids"] = input_ids.unsqueeze(0)
            attended = _attended(batch, input_ids)
            mask = _context_mask(input_ids, attended, item_span, image_token_id, index)
            state.update(mask=mask.float(), last=_last_positions(batch, input_ids), mass={})
            if "logits_to_keep" in forward_params:
                batch.setdefault("logits_to_keep", 1)
            model(**batch, use_cache=False)
            if len(state["mass"]) != len(outputs):
                raise RuntimeError(
                    f"only {len(state['mass'])} of {len(outputs)} attention layers ran"
                )
            totals += torch.stack([state["mass"][i].sum(dim=0) for i in range(len(outputs))])
            rows_seen += input_ids.shape[0]
    if rows_seen == 0:
        raise ValueError("score_heads got no inputs: inputs_iter was empty")
    return (totals / rows_seen).float()
