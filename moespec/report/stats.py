"""Routing statistics of one MoE layer over a whole data set, kept as counts.

Shapes: T routed tokens of a batch, E experts, k experts per token, D domains, V vocabulary,
H hidden size. Everything is a sum of fixed size ([E], [E,E], [E,D], [E,V]), so memory does
not grow with the number of tokens. The window metrics (MaxVio, overlap, MI, entropy) are
those of :class:`~moespec.routing.metrics.RoutingStats`, which this class extends.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..routing.metrics import RoutingStats, load_fraction


class ReportStats(RoutingStats):
    """:class:`RoutingStats` (load, co-activation, expert × domain counts, MaxVio, overlap,
    entropy) plus expert × token-id counts, corpus token counts, and the summed cosine
    similarity of two experts' outputs on the same token.

    ``token_ids`` [T] must be set (by the probe) before each forward: the ids of the tokens
    that the router routes, padding left out, in the same order.
    """

    def __init__(self, num_experts: int, vocab_size: int, num_domains: int) -> None:
        super().__init__(num_experts)
        self.vocab_size = vocab_size
        self.num_domains = num_domains
        e = num_experts
        self.expert_tokens = torch.zeros(e, vocab_size, dtype=torch.int64)
        self.corpus_tokens = torch.zeros(vocab_size, dtype=torch.int64)
        self.similarity_sum = torch.zeros(e, e, dtype=torch.float64)
        self.similarity_count = torch.zeros(e, e, dtype=torch.int64)
        self.token_ids: torch.Tensor | None = None
        self._idx: torch.Tensor | None = None  # the last update's idx [T,k]

    @torch.no_grad()
    def update(
        self, scores: torch.Tensor, idx: torch.Tensor, domain_ids: torch.Tensor | None = None
    ) -> None:
        """The window sums of :class:`RoutingStats`, then the token and domain counts."""
        super().update(scores, idx, domain_ids)
        self._idx = idx.detach().cpu()
        if idx.shape[0] == 0:
            return
        tok = self.token_ids
        if tok is None or tok.numel() != idx.shape[0]:
            raise RuntimeError(
                f"the report probe set {0 if tok is None else tok.numel()} token ids for "
                f"{idx.shape[0]} routed tokens"
            )
        flat = self._idx * self.vocab_size + tok[:, None]
        self.expert_tokens += torch.bincount(
            flat.reshape(-1), minlength=self.expert_tokens.numel()
        ).view_as(self.expert_tokens)
        self.corpus_tokens += torch.bincount(tok, minlength=self.vocab_size)

    @torch.no_grad()
    def update_similarity(self, outputs: torch.Tensor, idx: torch.Tensor) -> None:
        """Add cos(y_i, y_j) of every pair of a token's k raw outputs ``outputs`` [T,k,H]
        under the pair of experts ``idx`` [T,k] that produced them."""
        k = idx.shape[1]
        if k < 2 or idx.shape[0] == 0:
            return
        y = F.normalize(outputs.detach().float().cpu(), dim=-1)
        cos = torch.einsum("tih,tjh->tij", y, y).double()
        i, j = torch.triu_indices(k, k, offset=1)
        a, b = idx[:, i].reshape(-1), idx[:, j].reshape(-1)
        c = cos[:, i, j].reshape(-1)
        e = self.num_experts
        for left, right in ((a, b), (b, a)):
            cell = left * e + right
            self.similarity_sum.view(-1).index_add_(0, cell, c)
            self.similarity_count.view(-1).index_add_(0, cell, torch.ones_like(cell))

    def last_idx(self) -> torch.Tensor | None:
        """The experts [T,k] of the last update (for the raw outputs that follow it)."""
        return self._idx


def _share_rows(counts: torch.Tensor) -> list[list[float]]:
    totals = counts.sum(1, keepdim=True).double()
    return torch.where(totals > 0, counts.double() / totals.clamp_min(1), 0.0).tolist()


def top_tokens(
    stats: ReportStats, expert: int, n: int, min_count: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The expert's ``n`` top token ids by share of its routed slots and by lift, as rows
    ``{token, count, share, lift}``; lift = share / corpus frequency, over ids seen at least
    ``min_count`` times by the expert. Ties go to the smaller token id."""
    row = stats.expert_tokens[expert]
    slots = int(row.sum())
    total = int(stats.corpus_tokens.sum())
    if slots == 0 or total == 0:
        return [], []

    def entry(v: int) -> dict[str, Any]:
        share = int(row[v]) / slots
        return {
            "token": v,
            "count": int(row[v]),
            "share": share,
            "lift": share / (int(stats.corpus_tokens[v]) / total),
        }

    seen = [v for v in torch.nonzero(row).flatten().tolist()]
    by_share = sorted(seen, key=lambda v: (-int(row[v]), v))[:n]
    frequent = [v for v in seen if int(row[v]) >= min_count]
    lifts = {v: entry(v)["lift"] for v in frequent}
    by_lift = sorted(frequent, key=lambda v: (-lifts[v], v))[:n]
    return [entry(v) for v in by_share], [entry(v) for v in by_lift]


def layer_summary(
    stats: ReportStats, *, near_dead: float, top_n: int, min_count: int
) -> dict[str, Any]:
    """Every number of one layer: the window metrics, load, shares, co-activation,
    similarity and the top tokens of each expert (ids; the caller decodes them).

    An expert is near-dead when its load is below ``near_dead`` × 1/E.
    """
    e = stats.num_experts
    counts = stats.slot_counts
    load = load_fraction(counts.double())
    co = stats.window.get("coactivation")
    co = torch.zeros(e, e, dtype=torch.float64) if co is None else co
    tokens = stats.tokens
    sim_count = stats.similarity_count
    similarity = torch.where(
        sim_count > 0, stats.similarity_sum / sim_count.clamp_min(1).double(), torch.nan
    )
    out: dict[str, Any] = {
        "metrics": stats.compute(),
        "tokens": int(tokens),
        "slots": counts.long().tolist(),
        "load": load.tolist(),
        "near_dead": [i for i in range(e) if float(load[i]) < near_dead / e],
        "coactivation": (co / tokens if tokens else co).tolist(),
        "similarity": [[None if v != v else v for v in r] for r in similarity.tolist()],
        "similarity_count": sim_count.tolist(),
    }
    if stats.num_domains:
        joint = torch.zeros(e, stats.num_domains, dtype=torch.float64)
        seen = stats.domain_counts
        joint[:, : seen.shape[1]] = seen
        out["domain_slots"] = joint.long().tolist()
        out["expert_domain_share"] = _share_rows(joint)
        out["domain_expert_share"] = _share_rows(joint.T)
    experts = []
    for i in range(e):
        share, lift = top_tokens(stats, i, top_n, min_count)
        experts.append({"expert": i, "top_by_share": share, "top_by_lift": lift})
    out["experts"] = experts
    return out
