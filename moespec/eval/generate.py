"""Batched greedy generation for moespec's LMs (the tiny MoE LM and the HF wrapper).

Prompts are left-padded into one batch; padding gets ``document_ids`` -1 and the prompts'
``position_ids`` start at 0 after it, so each row computes what it would alone. The tiny LM
has no KV cache: every step runs the whole prefix. Hugging Face models decode with their own
``generate`` (KV cache, attention mask over the left padding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..routing import clear_router_losses, iter_routers


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids``, ``position_ids`` and ``document_ids`` [B,S] of left-padded ``rows``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros_like(ids)
    docs = torch.full_like(ids, -1)
    for i, row in enumerate(rows):
        n = len(row)
        if n:
            ids[i, width - n :] = torch.tensor(list(row), dtype=torch.long)
            pos[i, width - n :] = torch.arange(n)
            docs[i, width - n :] = 0
    return {"input_ids": ids, "position_ids": pos, "document_ids": docs}


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    max_length: int | None = None,
) -> list[list[int]]:
    """The greedy continuation of each prompt (token ids), ending at a stop id (kept) or
    after ``max_new_tokens`` tokens; ``max_length`` caps prompt + continuation."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    was_training = model.training
    model.eval()
    tracking = [(r, r.track_stats) for r in iter_routers(model)]
    for r, _ in tracking:
        r.track_stats = False
    try:
        if hasattr(model, "hf_model") and max_length is None:
            return _hf_generate(model.hf_model, prompts, max_new_tokens, list(stop_ids), pad_id)
        return _loop_generate(model, prompts, max_new_tokens, set(stop_ids), pad_id, max_length)
    finally:
        clear_router_losses(model)
        for r, track in tracking:
            r.track_stats = track
        model.train(was_training)


def _loop_generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop: set[int],
    pad_id: int,
    max_length: int | None,
) -> list[list[int]]:
    """No cache: each step runs every unfinished row's whole sequence, left-padded."""
    device = next(model.parameters()).device
    rows = [list(p) for p in prompts]
    out: list[list[int]] = [[] for _ in rows]
    live = [i for i in range(len(rows)) if not max_length or len(rows[i]) < max_length]
    for _ in range(max_new_tokens):
        if not live:
            break
        batch = left_pad([rows[i] for i in live], pad_id)
        logits = model(
            batch["input_ids"].to(device),
            position_ids=batch["position_ids"].to(device),
            document_ids=batch["document_ids"].to(device),
        ).logits
        still = []
        for i, token in zip(live, logits[:, -1].argmax(-1).tolist()):
            rows[i].append(token)
            out[i].append(token)
            full = max_length is not None and len(rows[i]) >= max_length
            if token not in stop and not full:
                still.append(i)
        live = still
    return out


def _hf_generate(
    hf_model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_ids: list[int],
    pad_id: int,
) -> list[list[int]]:
    """transformers' greedy ``generate``; each row cut after its first stop id."""
    batch = left_pad(prompts, pad_id)
    device = next(hf_model.parameters()).device
    ids = batch["input_ids"].to(device)
    mask = (batch["document_ids"] >= 0).long().to(device)
    out = hf_model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=stop_ids or None, pad_token_id=pad_id, use_cache=True,
        temperature=None, top_p=None, top_k=None,
    )  # fmt: skip
    rows = []
    for row in out[:, ids.shape[1] :].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
        rows.append(row[:cut])
    return rows
