"""Batched greedy generation for moespec's LMs (the tiny MoE LM and the HF wrapper).

Prompts are left-padded into one batch; padding gets ``document_ids`` -1 and the prompts'
``position_ids`` start at 0 after it, so each row computes what it would alone. No KV cache:
every step runs the whole prefix, which keeps the code obviously right at evaluation sizes.
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
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    tracking = [(r, r.track_stats) for r in iter_routers(model)]
    for r, _ in tracking:
        r.track_stats = False
    rows = [list(p) for p in prompts]
    out: list[list[int]] = [[] for _ in rows]
    live = [i for i in range(len(rows)) if not max_length or len(rows[i]) < max_length]
    stop = set(stop_ids)
    try:
        for _ in range(max_new_tokens):
            if not live:
                break
            batch = left_pad([rows[i] for i in live], pad_id)
            logits = model(
                batch["input_ids"].to(device),
                position_ids=batch["position_ids"].to(device),
                document_ids=batch["document_ids"].to(device),
            ).logits
            nxt = logits[:, -1].argmax(-1).tolist()
            still = []
            for i, token in zip(live, nxt):
                rows[i].append(token)
                out[i].append(token)
                full = max_length is not None and len(rows[i]) >= max_length
                if token not in stop and not full:
                    still.append(i)
            live = still
    finally:
        clear_router_losses(model)
        for r, track in tracking:
            r.track_stats = track
        model.train(was_training)
    return out
