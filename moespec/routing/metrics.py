"""Specialization metrics and a window accumulator of routing statistics.

Each metric is a small function of accumulated counts so that it can be checked by hand;
:class:`RoutingStats` sums what they need over a logging window (and across ranks).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..distributed import collective_device
from .metric_table import layer_reductions


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


def max_possible_maxvio(num_experts: int, top_k: int) -> float:
    """The largest MaxVio: ``E/k − 1`` when k experts take every token, or 1 for a dead expert
    when that is more (E < 2k); 0 when k = E (every expert takes every token)."""
    if top_k >= num_experts:
        return 0.0
    return max(num_experts / top_k - 1.0, 1.0)


def relative_load_metrics(counts: torch.Tensor, top_k: int) -> dict[str, float]:
    """The load measured against its extremes, so that it reads the same for any E and k:
    ``relative_maxvio`` = MaxVio / :func:`max_possible_maxvio` (1 when k experts take every
    token, for E ≥ 2k) and
    ``relative_load_entropy`` = (H(load) − log k) / (log E − log k) (1 uniform, 0 collapsed)."""
    e = counts.numel()
    if top_k >= e or counts.sum() <= 0:
        return {"relative_maxvio": 0.0, "relative_load_entropy": 1.0}
    worst = max_possible_maxvio(e, top_k)
    h = load_entropy(counts) * math.log(e)  # nats
    floor, top = math.log(top_k), math.log(e)
    return {
        "relative_maxvio": max_violation(counts) / worst,
        "relative_load_entropy": (h - floor) / (top - floor),
    }


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


def token_set_jaccard(coactivation: torch.Tensor) -> float:
    """Mean pairwise Jaccard overlap of the experts' token sets.

    ``coactivation`` [E,E] counts tokens routed to both i and j (diagonal: tokens of i).
    """
    e = coactivation.shape[0]
    if e < 2:
        return 0.0
    c = coactivation.float()
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


REDUCTIONS = ("sum", "mean", "max")
#: A metric as a module reports it: ``(value, reduce)`` or ``(value, "mean", count)``.
Metric = tuple[Any, ...]


def _as_tensor(value: Any) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float64).detach().cpu()


def _pad_to(t: torch.Tensor, shape: tuple[int, ...], fill: float) -> torch.Tensor:
    if tuple(t.shape) == shape:
        return t
    out = torch.full(shape, fill, dtype=t.dtype)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


class MetricWindow:
    """Named metrics summed, averaged or maxed over micro-batches and then across ranks.

    ``mean`` entries keep ``Σ value·count`` and ``Σ count`` (``value`` is a mean over ``count``
    items: micro-batches, tokens), so the window mean weighs every item alike. Values are
    numbers or tensors; a tensor entry may grow between updates (padded with zeros).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start a new window."""
        self._values: dict[str, torch.Tensor] = {}
        self._counts: dict[str, float] = {}
        self._reduce: dict[str, str] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._values

    def names(self) -> list[str]:
        """The metrics seen in this window, sorted."""
        return sorted(self._values)

    def add(self, name: str, value: Any, reduce: str = "mean", count: float = 1.0) -> None:
        """Add one report of ``name``; its reduction must stay the same within a window."""
        if reduce not in REDUCTIONS:
            raise ValueError(f"metric {name}: reduce={reduce!r}; valid: {', '.join(REDUCTIONS)}")
        if self._reduce.setdefault(name, reduce) != reduce:
            raise ValueError(f"metric {name} reported as {reduce} and as {self._reduce[name]}")
        v = _as_tensor(value) * (count if reduce == "mean" else 1.0)
        old = self._values.get(name)
        if old is not None:
            shape = tuple(max(a, b) for a, b in zip(old.shape, v.shape))
            fill = -math.inf if reduce == "max" else 0.0
            old, v = _pad_to(old, shape, fill), _pad_to(v, shape, fill)
            v = torch.maximum(old, v) if reduce == "max" else old + v
        self._values[name] = v
        self._counts[name] = self._counts.get(name, 0.0) + (count if reduce == "mean" else 1.0)

    def update(self, metrics: dict[str, Metric]) -> None:
        """Add ``{name: (value, reduce[, count])}``."""
        for name, entry in metrics.items():
            self.add(name, *entry)

    def get(self, name: str) -> torch.Tensor | None:
        """The window's value of ``name`` (a mean divided out), or ``None`` if never reported."""
        v = self._values.get(name)
        if v is None or self._reduce[name] != "mean":
            return v
        return v / self._counts[name] if self._counts[name] > 0 else torch.full_like(v, math.nan)

    def reductions(self) -> dict[str, str]:
        """``{name: reduce}`` of every entry seen in this window."""
        return dict(self._reduce)

    def count(self, name: str) -> float:
        """How many items (micro-batches, tokens) a mean entry has seen; reports otherwise."""
        return self._counts.get(name, 0.0)

    def values(self) -> dict[str, float | torch.Tensor]:
        """Every entry reduced: floats for scalars, tensors otherwise."""
        out: dict[str, float | torch.Tensor] = {}
        for name in self.names():
            v = self.get(name)
            out[name] = float(v) if v.dim() == 0 else v
        return out

    def all_reduce(self, group: object | None = None) -> None:
        """Reduce the window across the ranks of ``group``; each entry by its own reduction.

        Ranks may have seen different entries or shapes: the union is reduced (no-op without
        torch.distributed)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        meta = {n: (self._reduce[n], tuple(self._values[n].shape)) for n in self._values}
        everyone: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(everyone, meta, group=group)
        merged: dict[str, tuple[str, tuple[int, ...]]] = {}
        for theirs in everyone:
            for name, (reduce, shape) in theirs.items():
                mine = merged.setdefault(name, (reduce, shape))
                if mine[0] != reduce or len(mine[1]) != len(shape):
                    raise ValueError(f"metric {name} is reported differently across ranks")
                merged[name] = (reduce, tuple(max(a, b) for a, b in zip(mine[1], shape)))
        names = sorted(merged)
        device = collective_device(group)
        for op, kinds in ((dist.ReduceOp.SUM, ("sum", "mean")), (dist.ReduceOp.MAX, ("max",))):
            chosen = [n for n in names if merged[n][0] in kinds]
            if not chosen:
                continue
            fill = -math.inf if op == dist.ReduceOp.MAX else 0.0
            parts = [
                _pad_to(self._values.get(n, torch.full(merged[n][1], fill, dtype=torch.float64)),
                        merged[n][1], fill).flatten()
                for n in chosen
            ]  # fmt: skip
            parts.append(
                torch.tensor([self._counts.get(n, 0.0) for n in chosen], dtype=torch.float64)
            )
            flat = torch.cat(parts).to(device)
            dist.all_reduce(flat, op=op, group=group)
            flat = flat.cpu()
            start = 0
            for n in chosen:
                size = math.prod(merged[n][1])
                self._values[n] = flat[start : start + size].view(merged[n][1]).clone()
                self._reduce[n] = merged[n][0]
                start += size
            for n, c in zip(chosen, flat[start:].tolist()):
                self._counts[n] = c

    def state_dict(self) -> dict[str, Any]:
        """The window's sums, for a checkpoint taken in the middle of a window."""
        return {
            "values": {n: v.clone() for n, v in self._values.items()},
            "counts": dict(self._counts),
            "reduce": dict(self._reduce),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the window that :meth:`state_dict` saved."""
        self._values = {n: torch.as_tensor(v).clone() for n, v in state["values"].items()}
        self._counts = dict(state["counts"])
        self._reduce = dict(state["reduce"])


#: Window entries that feed the derived routing metrics rather than being logged themselves.
_ROUTING_SUMS = ("tokens", "slot_counts", "coactivation", "domain_counts")


class RoutingStats:
    """Routing statistics of one MoE layer over a logging window (a :class:`MetricWindow`).

    Each forward reports counts and per-token means by name; layers may add their own entries
    (``stats.window.add(...)``), which are logged as they are reduced.
    """

    def __init__(self, num_experts: int, top_k: int | None = None) -> None:
        self.num_experts = num_experts
        self.top_k = top_k  # known: relative_maxvio and relative_load_entropy are logged too
        self.window = MetricWindow()

    def reset(self) -> None:
        """Start a new window."""
        self.window.reset()

    @property
    def tokens(self) -> float:
        """Tokens routed in the window."""
        v = self.window.get("tokens")
        return float(v) if v is not None else 0.0

    @property
    def slot_counts(self) -> torch.Tensor:
        """[E] routed slots per expert."""
        v = self.window.get("slot_counts")
        return v if v is not None else torch.zeros(self.num_experts, dtype=torch.float64)

    @property
    def domain_counts(self) -> torch.Tensor:
        """[E,D] routed slots per expert and domain (D = 0 without domain labels)."""
        v = self.window.get("domain_counts")
        return v if v is not None else torch.zeros(self.num_experts, 0, dtype=torch.float64)

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
        s = scores.float()
        report: dict[str, Metric] = {
            "tokens": (t, "sum"),
            "slot_counts": (onehot.sum(0), "sum"),
            "coactivation": (onehot.T @ onehot, "sum"),
            "variance": (float(s.var(-1, unbiased=True).mean()) if e > 1 else 0.0, "mean", t),
            "routing_entropy": (float(routing_entropy(s).mean()), "mean", t),
        }
        if domain_ids is not None:
            dom = domain_ids.reshape(-1).to(idx.device)
            if dom.numel() != t:
                raise ValueError(f"domain_ids has {dom.numel()} entries for {t} routed tokens")
            keep = dom >= 0
            if keep.any():
                d = int(dom.max().item()) + 1
                onehot_dom = torch.nn.functional.one_hot(dom[keep], d).float()
                report["domain_counts"] = (onehot[keep].T @ onehot_dom, "sum")
        self.window.update(report)

    @torch.no_grad()
    def update_overlap(self, overlap_mean: float, tokens: int) -> None:
        """Add the mean |cos| between the k selected outputs over ``tokens`` tokens."""
        self.window.add("output_overlap", overlap_mean, "mean", tokens)

    def all_reduce(self, group: object | None = None) -> None:
        """Reduce the window across the ranks of ``group`` (no-op without torch.distributed)."""
        self.window.all_reduce(group)

    def state_dict(self) -> dict[str, Any]:
        """The window's sums, for a checkpoint taken in the middle of a window."""
        return {"num_experts": self.num_experts, "window": self.window.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the window that :meth:`state_dict` saved."""
        if state.get("num_experts") != self.num_experts:
            raise ValueError(
                f"routing statistics of {state.get('num_experts')} experts cannot continue a "
                f"window of {self.num_experts}"
            )
        window = state["window"]
        for part in ("values", "counts", "reduce"):  # checkpoints before the rename
            if "cooccurrence" in window.get(part, {}):
                window[part]["coactivation"] = window[part].pop("cooccurrence")
        self.window.load_state_dict(window)

    def reductions(self) -> dict[str, str]:
        """How each metric of :meth:`compute` combines over layers: its reported reduction;
        the derived load metrics average, dead experts add up."""
        own = {n: r for n, r in self.window.reductions().items() if n not in _ROUTING_SUMS}
        return {**layer_reductions(), **own}

    def compute(self) -> dict[str, float]:
        """The window's metrics under the names used in logs (without prefix)."""
        counts = self.slot_counts
        out = {
            "maxvio": max_violation(counts),
            "load_cv": load_cv(counts),
            "dead_experts": float(dead_experts(counts)),
            "load_entropy": load_entropy(counts),
            "token_overlap": 0.0,
            "top_expert_share": float(counts.max() / counts.sum()) if counts.sum() > 0 else 0.0,
        }
        if self.top_k is not None:
            out.update(relative_load_metrics(counts, self.top_k))
        if (co := self.window.get("coactivation")) is not None:
            out["token_overlap"] = token_set_jaccard(co)
        domain = self.domain_counts
        if domain.shape[1] > 0 and domain.sum() > 0:
            out["domain_mi"] = domain_mutual_information(domain)
        for name, value in self.window.values().items():
            if name not in _ROUTING_SUMS and isinstance(value, float):
                out[name] = value
        return dict(sorted(out.items()))


class CollapseMonitor:
    """Warns when an expert stays dead, or a layer's load stays collapsed, for several windows.

    Collapsed means ``relative_maxvio`` at or above ``max_relative_maxvio`` and
    ``relative_load_entropy`` at or below ``min_relative_entropy``: both measured against the
    most uneven load possible (k experts taking every token), so the thresholds mean the same
    for any E and k. Both are needed: with E = 2k one starved expert alone reaches the largest
    MaxVio, while the load entropy stays high until few experts take nearly every token.
    """

    def __init__(
        self,
        patience: int = 3,
        max_relative_maxvio: float = 0.75,
        min_relative_entropy: float = 0.25,
    ) -> None:
        self.patience = patience
        self.max_relative_maxvio = max_relative_maxvio
        self.min_relative_entropy = min_relative_entropy
        self._dead: dict[int, int] = {}
        self._hot: dict[int, int] = {}

    def _collapsed(self, m: dict[str, float]) -> bool:
        return (
            m.get("relative_maxvio", 0.0) >= self.max_relative_maxvio
            and m.get("relative_load_entropy", 1.0) <= self.min_relative_entropy
        )

    def update(self, per_layer: list[dict[str, float]]) -> list[str]:
        """Feed one window's per-layer metrics; returns the alarms raised by this window."""
        alarms = []
        for i, m in enumerate(per_layer):
            self._dead[i] = self._dead.get(i, 0) + 1 if m.get("dead_experts", 0) > 0 else 0
            self._hot[i] = self._hot.get(i, 0) + 1 if self._collapsed(m) else 0
            if self._dead[i] == self.patience:
                alarms.append(
                    f"layer {i}: {int(m['dead_experts'])} expert(s) dead for {self.patience} windows"
                )
            if self._hot[i] == self.patience:
                alarms.append(
                    f"layer {i}: routing collapse for {self.patience} windows: MaxVio "
                    f"{m.get('maxvio', 0.0):.2f} is {m.get('relative_maxvio', 0.0):.0%} of the "
                    f"largest possible (alarm at {self.max_relative_maxvio:.0%}) and the load entropy "
                    f"is {m.get('relative_load_entropy', 1.0):.0%} of the way from collapsed to "
                    f"uniform (alarm at {self.min_relative_entropy:.0%})"
                )
        return alarms

    def state_dict(self) -> dict[str, dict[int, int]]:
        """How many windows in a row each layer has been dead or hot."""
        return {"dead": dict(self._dead), "hot": dict(self._hot)}

    def load_state_dict(self, state: dict[str, dict[int, int]]) -> None:
        """Continue the counts that :meth:`state_dict` saved."""
        self._dead, self._hot = dict(state["dead"]), dict(state["hot"])


_ACROSS_LAYERS = {"sum": np.sum, "mean": np.mean, "max": np.max}


def routing_metrics(
    per_layer: list[dict[str, float]], reductions: dict[str, str] | None = None
) -> dict[str, float]:
    """``layer{i}/routing/<name>`` and ``routing/<name>``: the layers reduced by each metric's
    own reduction (``reductions``; mean where none is given, dead experts summed)."""
    reductions = {**layer_reductions(), **(reductions or {})}
    out: dict[str, float] = {}
    names = sorted({k for m in per_layer for k in m})
    for name in names:
        vals = [m[name] for m in per_layer if name in m]
        if vals:
            reduce = _ACROSS_LAYERS[reductions.get(name, "mean")]
            out[f"routing/{name}"] = float(reduce(vals))
        for i, m in enumerate(per_layer):
            if name in m:
                out[f"layer{i}/routing/{name}"] = float(m[name])
    return out
