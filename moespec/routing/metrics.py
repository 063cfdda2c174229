"""Specialization metrics and a window accumulator of routing statistics.

Each metric is a small function of accumulated counts so that it can be checked by hand;
:class:`RoutingStats` sums what they need over a logging window (and across ranks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.distributed as dist


def load_fraction(counts: torch.Tensor) -> torch.Tensor:
    """Share of routed slots per expert (sums to 1; zeros when nothing was routed)."""
    total = counts.sum()
    return counts / total if total > 0 else torch.zeros_like(counts)


def load_cv(counts: torch.Tensor) -> float:
    """Coefficient of variation of the expert loads (population std / mean)."""
    mean = counts.float().mean()
    return float(counts.float().std(unbiased=False) / mean) if mean > 0 else 0.0


def max_violation(counts: torch.Tensor) -> float:
    """MaxVio = max_e |load_e − mean| / mean (0 under perfect balance)."""
    mean = counts.float().mean()
    return float((counts.float() - mean).abs().max() / mean) if mean > 0 else 0.0


def dead_experts(counts: torch.Tensor) -> int:
    """Number of experts that received no token in the window."""
    return int((counts == 0).sum())


def load_entropy(counts: torch.Tensor) -> float:
    """Entropy of the load distribution normalised by log E (1 = perfectly balanced)."""
    p = load_fraction(counts.float())
    if counts.numel() < 2 or p.sum() == 0:
        return 0.0
    h = -(p[p > 0] * p[p > 0].log()).sum()
    return float(h / math.log(counts.numel()))


def routing_entropy(scores: torch.Tensor) -> torch.Tensor:
    """Per-token entropy (nats) of the routing distribution ``scores`` [T,E] (normalised)."""
    p = scores.float() / scores.float().sum(-1, keepdim=True).clamp_min(1e-30)
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


def token_set_jaccard(cooccurrence: torch.Tensor) -> float:
    """Mean pairwise Jaccard overlap of the experts' token sets.

    ``cooccurrence`` [E,E] counts tokens routed to both i and j (diagonal: tokens of i).
    """
    e = cooccurrence.shape[0]
    if e < 2:
        return 0.0
    c = cooccurrence.float()
    diag = torch.diagonal(c)
    union = diag[:, None] + diag[None, :] - c
    jac = torch.where(union > 0, c / union.clamp_min(1e-30), torch.zeros_like(c))
    off = ~torch.eye(e, dtype=torch.bool)
    return float(jac[off].mean())


def domain_mutual_information(joint_counts: torch.Tensor) -> float:
    """I(expert; domain) / H(domain) from an [E,D] table of (expert, domain) slot counts."""
    j = joint_counts.double()
    total = j.sum()
    if total <= 0:
        return 0.0
    p = j / total
    pe = p.sum(1, keepdim=True)
    pd = p.sum(0, keepdim=True)
    nz = p > 0
    mi = (p[nz] * (p[nz] / (pe @ pd)[nz]).log()).sum()
    pdv = pd[pd > 0]
    hd = -(pdv * pdv.log()).sum()
    return float(mi / hd) if hd > 0 else 0.0


@dataclass
class RoutingStats:
    """Sums of routing statistics over a logging window for one MoE layer."""

    num_experts: int
    num_domains: int = 0
    tokens: float = 0.0
    slot_counts: torch.Tensor = field(default=None)  # [E]
    cooccurrence: torch.Tensor = field(default=None)  # [E,E]
    domain_counts: torch.Tensor = field(default=None)  # [E,D]
    variance_sum: float = 0.0
    entropy_sum: float = 0.0
    overlap_sum: float = 0.0
    overlap_tokens: float = 0.0

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start a new window."""
        e, d = self.num_experts, self.num_domains
        self.tokens = 0.0
        self.slot_counts = torch.zeros(e, dtype=torch.float64)
        self.cooccurrence = torch.zeros(e, e, dtype=torch.float64)
        self.domain_counts = torch.zeros(e, max(d, 0), dtype=torch.float64)
        self.variance_sum = self.entropy_sum = self.overlap_sum = self.overlap_tokens = 0.0

    @torch.no_grad()
    def update(
        self,
        scores: torch.Tensor,
        idx: torch.Tensor,
        domain_ids: torch.Tensor | None = None,
    ) -> None:
        """Add one batch: scores [T,E] (a distribution per token), selected experts idx [T,k]."""
        t = idx.shape[0]
        if t == 0:
            return
        e = self.num_experts
        onehot = torch.zeros(t, e, dtype=torch.float32, device=idx.device)
        onehot.scatter_(1, idx, 1.0)
        self.tokens += t
        self.slot_counts += onehot.sum(0).double().cpu()
        self.cooccurrence += (onehot.T @ onehot).double().cpu()
        s = scores.float()
        self.variance_sum += float(s.var(-1, unbiased=True).sum()) if e > 1 else 0.0
        self.entropy_sum += float(routing_entropy(s).sum())
        if domain_ids is not None:
            dom = domain_ids.reshape(-1).to(idx.device)
            if dom.numel() != t:
                raise ValueError(f"domain_ids has {dom.numel()} entries for {t} routed tokens")
            d = int(dom.max().item()) + 1 if dom.numel() else 0
            if d > self.domain_counts.shape[1]:
                grown = torch.zeros(e, d, dtype=torch.float64)
                grown[:, : self.domain_counts.shape[1]] = self.domain_counts
                self.domain_counts = grown
                self.num_domains = d
            keep = dom >= 0
            if keep.any():
                joint = (
                    onehot[keep].T
                    @ torch.nn.functional.one_hot(dom[keep], self.domain_counts.shape[1]).float()
                )
                self.domain_counts += joint.double().cpu()

    @torch.no_grad()
    def update_overlap(self, overlap_mean: float, tokens: int) -> None:
        """Add the mean |cos| between the k selected outputs over ``tokens`` tokens."""
        self.overlap_sum += overlap_mean * tokens
        self.overlap_tokens += tokens

    def all_reduce(self, group: object | None = None) -> None:
        """Sum the window across the ranks of ``group`` (no-op without torch.distributed)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        scalars = torch.tensor(
            [
                self.tokens,
                self.variance_sum,
                self.entropy_sum,
                self.overlap_sum,
                self.overlap_tokens,
            ],
            dtype=torch.float64,
        )
        d = torch.tensor([float(self.domain_counts.shape[1])], dtype=torch.float64)
        dist.all_reduce(d, op=dist.ReduceOp.MAX, group=group)
        if int(d.item()) > self.domain_counts.shape[1]:
            grown = torch.zeros(self.num_experts, int(d.item()), dtype=torch.float64)
            grown[:, : self.domain_counts.shape[1]] = self.domain_counts
            self.domain_counts = grown
            self.num_domains = int(d.item())
        flat = torch.cat(
            [scalars, self.slot_counts, self.cooccurrence.flatten(), self.domain_counts.flatten()]
        )
        device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
        flat = flat.to(device)
        dist.all_reduce(flat, group=group)
        flat = flat.cpu()
        e = self.num_experts
        (
            self.tokens,
            self.variance_sum,
            self.entropy_sum,
            self.overlap_sum,
            self.overlap_tokens,
        ) = flat[:5].tolist()
        self.slot_counts = flat[5 : 5 + e].clone()
        self.cooccurrence = flat[5 + e : 5 + e + e * e].view(e, e).clone()
        self.domain_counts = flat[5 + e + e * e :].view(e, -1).clone()

    def state_dict(self) -> dict[str, Any]:
        """The window's sums, for a checkpoint taken in the middle of a window."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the window that :meth:`state_dict` saved."""
        if state.get("num_experts") != self.num_experts:
            raise ValueError(
                f"routing statistics of {state.get('num_experts')} experts cannot continue a "
                f"window of {self.num_experts}"
            )
        for f in fields(self):
            value = state[f.name]
            setattr(self, f.name, value.clone() if isinstance(value, torch.Tensor) else value)

    def compute(self) -> dict[str, float]:
        """The window's metrics under the names used in logs (without prefix)."""
        tokens = max(self.tokens, 1.0)
        out = {
            "maxvio": max_violation(self.slot_counts),
            "load_cv": load_cv(self.slot_counts),
            "dead_experts": float(dead_experts(self.slot_counts)),
            "load_entropy": load_entropy(self.slot_counts),
            "routing_entropy": self.entropy_sum / tokens,
            "variance": self.variance_sum / tokens,
            "token_overlap": token_set_jaccard(self.cooccurrence),
        }
        if self.overlap_tokens > 0:
            out["output_overlap"] = self.overlap_sum / self.overlap_tokens
        if self.domain_counts.shape[1] > 0 and self.domain_counts.sum() > 0:
            out["domain_mi"] = domain_mutual_information(self.domain_counts)
        return out


class CollapseMonitor:
    """Warns when an expert stays dead or MaxVio stays above a bound for several windows."""

    def __init__(self, patience: int = 3, maxvio_bound: float = 1.0) -> None:
        self.patience = patience
        self.maxvio_bound = maxvio_bound
        self._dead: dict[int, int] = {}
        self._hot: dict[int, int] = {}

    def update(self, per_layer: list[dict[str, float]]) -> list[str]:
        """Feed one window's per-layer metrics; returns the alarms raised by this window."""
        alarms = []
        for i, m in enumerate(per_layer):
            self._dead[i] = self._dead.get(i, 0) + 1 if m.get("dead_experts", 0) > 0 else 0
            self._hot[i] = self._hot.get(i, 0) + 1 if m.get("maxvio", 0) > self.maxvio_bound else 0
            if self._dead[i] == self.patience:
                alarms.append(
                    f"layer {i}: {int(m['dead_experts'])} expert(s) dead for {self.patience} windows"
                )
            if self._hot[i] == self.patience:
                alarms.append(
                    f"layer {i}: MaxVio {m['maxvio']:.2f} > {self.maxvio_bound} for "
                    f"{self.patience} windows (routing collapse?)"
                )
        return alarms

    def state_dict(self) -> dict[str, dict[int, int]]:
        """How many windows in a row each layer has been dead or hot."""
        return {"dead": dict(self._dead), "hot": dict(self._hot)}

    def load_state_dict(self, state: dict[str, dict[int, int]]) -> None:
        """Continue the counts that :meth:`state_dict` saved."""
        self._dead, self._hot = dict(state["dead"]), dict(state["hot"])
