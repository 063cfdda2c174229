"""A batch of the data pipeline as model inputs: packed-row positions and the per-token
labels (sequence, domain, padding) the routers read."""

from __future__ import annotations

import torch

from ..routing import TokenContext


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """``position_ids``/``document_ids`` of packed rows; nothing for plain causal windows."""
    docs, pos = batch.get("document_ids"), batch.get("position_ids")
    if docs is None or pos is None:
        return {}
    plain = bool((docs == 0).all()) and bool((pos == torch.arange(pos.shape[1])).all())
    return {} if plain else {"position_ids": pos.to(device), "document_ids": docs.to(device)}


def token_context(batch: dict[str, torch.Tensor], device: torch.device) -> TokenContext:
    """Per-token sequence (row × example), domain and padding labels for the routers."""
    ids = batch["input_ids"]
    b, s = ids.shape
    seq = torch.arange(b).repeat_interleave(s)
    if "document_ids" in batch:
        seq = seq * s + batch["document_ids"].reshape(-1).clamp_min(0)
    mask = batch.get("attention_mask")
    return TokenContext(
        sequence_ids=seq.to(device),
        domain_ids=batch["domain_ids"].reshape(-1).to(device),
        token_mask=None if mask is None else mask.reshape(-1).bool().to(device),
    )
