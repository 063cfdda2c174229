"""The balance budget: specialization may cost at most a stated share of the load balance.

Notation: E routed experts, k selected per token, MaxVio = max_e |load_e − mean| / mean.
The most uneven load possible (k experts take every token) has MaxVio = E/k − 1, so
``relative_maxvio = MaxVio / (E/k − 1)`` means the same for 4 experts top-2 and 128 top-8.

Two guards keep the losses that move routing (the variance loss, a user's loss that reads
scores or logits) from overpowering load balancing:

- a **cap** on a calibrated variance weight (:func:`variance_weight_cap`). On one token the
  variance loss pulls its top expert's score with at most ``2γ/E`` (at one-hot routing), and
  the batch-scope aux loss pulls an expert's score back with ``α · vio_e`` (its signed load
  violation). The cap ``γ ≤ α · b · E · (E/k − 1) / 2`` makes the largest variance pull no
  stronger than the aux pull at the budget's imbalance ``b · (E/k − 1)``.
- a **yield** per layer (:class:`BalanceBudget`), steered once per optimizer step like
  loss-free balancing steers its bias (arXiv 2408.15664): while a layer's relative MaxVio is
  above the budget its yielding weights shrink by ``exp(−rate)``, below it they grow back to 1.
  The MaxVio it reads is that of the slot counts averaged over recent steps (an exponential
  moving average with ``COUNT_DECAY``), so that the noise of one small batch does not steer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from ..distributed import collective_device
from .metrics import relative_load_metrics

#: Decay of the moving average of the slot counts the yield is steered by (about ten steps).
COUNT_DECAY = 0.9


def variance_weight_cap(aux_weight: float, budget: float, num_experts: int, top_k: int) -> float:
    """The largest γ whose strongest pull the aux loss (weight α) outweighs at the budget's
    imbalance: ``α · b · E · (E/k − 1) / 2`` (see the module docstring)."""
    return aux_weight * budget * num_experts * (num_experts / top_k - 1.0) / 2.0


class BalanceBudget:
    """One layer's yield factor in [``min_yield``, 1] and the slot counts of the current step."""

    def __init__(self, num_experts: int, top_k: int, config: Any) -> None:
        self.num_experts, self.top_k = num_experts, top_k
        self.budget: float | None = config.max_maxvio
        self.rate = float(config.rate)
        self.min_yield = float(config.min_yield)
        self.log_yield = 0.0  # log of the factor: the steering is additive in log space
        self.counts: torch.Tensor | None = None  # [E] slots routed since the last step
        self.average: torch.Tensor | None = None  # [E] moving average of the step counts

    @property
    def enabled(self) -> bool:
        """A budget is set and there is a load to balance (k < E)."""
        return self.budget is not None and self.top_k < self.num_experts

    @property
    def factor(self) -> float:
        """The yield in force: what the yielding weights are multiplied by."""
        return math.exp(self.log_yield)

    @torch.no_grad()
    def observe(self, idx: torch.Tensor) -> None:
        """Count the experts of one training forward's real tokens ``idx`` [T,k] (on their
        device: nothing waits for the accelerator until the step's :func:`steer_budgets`)."""
        flat = idx.reshape(-1)
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=idx.device)
        counts.index_add_(0, flat, torch.ones_like(flat))  # no host sync, unlike bincount
        self.counts = counts if self.counts is None else self.counts + counts

    def steer(self, counts: torch.Tensor) -> None:
        """One optimizer step's (all-reduced) counts: yield above the budget, recover below."""
        share = counts.double() / counts.sum()
        avg = self.average
        self.average = share if avg is None else COUNT_DECAY * avg + (1 - COUNT_DECAY) * share
        over = relative_load_metrics(self.average, self.top_k)["relative_maxvio"] > self.budget
        direction = 1.0 if over else -1.0
        low = math.log(self.min_yield)
        self.log_yield = min(0.0, max(low, self.log_yield - direction * self.rate))


def steer_budgets(budgets: list[BalanceBudget]) -> None:
    """After an optimizer step: sum every layer's counts over ranks (one collective) and steer.

    Every rank calls it with the same layers; a layer with no counts this step is left alone."""
    active = [b for b in budgets if b.enabled]
    if not active:
        return
    distributed = dist.is_available() and dist.is_initialized()
    device = collective_device() if distributed else torch.device("cpu")
    rows = [
        torch.zeros(b.num_experts, dtype=torch.float64, device=device)
        if b.counts is None else b.counts.to(device, torch.float64)
        for b in active
    ]  # fmt: skip
    flat = torch.cat(rows)  # layers may differ in their number of experts
    if distributed:
        dist.all_reduce(flat)
    flat = flat.cpu().split([b.num_experts for b in active])
    for budget, counts in zip(active, flat):
        budget.counts = None
        if counts.sum() > 0:
            budget.steer(counts)


def budget_state(budgets: list[BalanceBudget]) -> dict[str, Any]:
    """What a checkpoint keeps: the budget in force and each layer's yield."""
    budget = budgets[0].budget if budgets else None
    return {
        "max_maxvio": budget,
        "yield": [b.factor for b in budgets],
        "average": [None if b.average is None else b.average.tolist() for b in budgets],
    }


def restore_budgets(
    budgets: list[BalanceBudget], state: dict[str, Any] | None, key: str = "loss.balance"
) -> None:
    """Continue the yields of a checkpoint (:func:`budget_state`); ``ValueError`` naming the key
    when the stored budget is not the recipe's or its yields cannot belong to this model."""
    if not state or not budgets:
        return
    was, now = state.get("max_maxvio"), budgets[0].budget
    if was != now:
        raise ValueError(
            f"{key}.max_maxvio={now} but the checkpoint was trained with {was}; resume with "
            f"{key}.max_maxvio={'null' if was is None else was} (or start afresh with "
            "trainer.resume=none)"
        )
    stored = list(state.get("yield", []))
    if len(stored) != len(budgets):
        raise ValueError(
            f"{key}: the checkpoint holds balance yields for {len(stored)} MoE layers, the "
            f"model has {len(budgets)}; resume with the model the checkpoint was saved from"
        )
    bad = [y for y in stored if not (isinstance(y, int | float) and 0 < y <= 1)]
    if bad:
        raise ValueError(f"{key}: the checkpoint holds an invalid yield {bad[0]!r} (valid: (0, 1])")
    averages = state.get("average") or [None] * len(budgets)
    for budget, y, avg in zip(budgets, stored, averages):
        budget.log_yield = max(math.log(budget.min_yield), math.log(y))
        if avg is not None and len(avg) == budget.num_experts:
            budget.average = torch.tensor(avg, dtype=torch.float64)
