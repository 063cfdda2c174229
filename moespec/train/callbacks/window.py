"""The logging window: losses and routing statistics reduced over micro-batches and ranks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ...routing import collect_routing_stats, iter_routers
from ...routing.metrics import MetricWindow, load_fraction, routing_metrics
from .base import Callback, MicroBatch

if TYPE_CHECKING:
    from ..trainer import Trainer


@dataclass
class WindowResult:
    """A closed window's per-layer routing metrics, load fractions [L,E] and counts [L,E,D]."""

    per_layer: list[dict[str, float]]
    load: np.ndarray
    domain_counts: np.ndarray | None
    reductions: dict[str, str]


def close_routing_window(model: Any) -> WindowResult:
    """Reduce every router's statistics across ranks, read them, and start a new window."""
    per_layer = collect_routing_stats(model, reset=False)
    routers = iter_routers(model)
    reductions = {k: v for r in routers for k, v in r.stats.reductions().items()}
    loads = [load_fraction(r.stats.slot_counts).numpy() for r in routers]
    joints = [r.stats.domain_counts.numpy() for r in routers]
    for r in routers:
        r.stats.reset()
    load = np.stack(loads) if loads else np.zeros((0, 0))
    width = max((j.shape[1] for j in joints), default=0)
    joint = (
        np.stack([np.pad(j, ((0, 0), (0, width - j.shape[1]))) for j in joints]) if width else None
    )
    return WindowResult(per_layer, load, joint, reductions)


def layer_losses(values: dict[str, Any]) -> dict[str, float]:
    """``loss/<name>``: the mean over layers of each ``layer{i}/loss/<name>`` window value."""
    by_name: dict[str, list[float]] = {}
    for key, value in values.items():
        if key.startswith("layer") and "/loss/" in key:
            by_name.setdefault(key.split("/loss/", 1)[1], []).append(float(value))
    return {f"loss/{name}": float(np.mean(v)) for name, v in sorted(by_name.items())}


class LoggingWindow(Callback):
    """Every ``trainer.log_every`` steps: train loss, routing losses (per layer and their mean
    over layers), loss weights in force (``weights/<name>``, with the balance yield), each
    weighted loss relative to the LM loss (``loss_share/<name>``), the balance yields, routing
    statistics and throughput of the window."""

    name = "window"

    def __init__(self) -> None:
        self.window = MetricWindow()
        self.seconds = 0.0
        self.tokens = 0
        self.in_force: dict[str, float] = {}  # loss weights × yields at the last micro-batch
        self.yields: list[float] = []

    def on_micro_batch(self, trainer: Trainer, micro: MicroBatch) -> None:
        self.window.add("train/loss", micro.loss)
        self.window.add("train/lm_loss", micro.lm_loss, "mean", count=max(micro.trained, 1))
        for i, layer in enumerate(micro.routed.per_layer):
            for name, value in layer.items():
                self.window.add(f"layer{i}/loss/{name}", value)
        if micro.lm_loss > 0:
            for name, value in micro.routed.contributions.items():
                if micro.routed.in_force.get(name, 0.0) > 0:
                    self.window.add(f"loss_share/{name}", abs(value) / micro.lm_loss)
        self.in_force, self.yields = micro.routed.in_force, micro.routed.yields
        self.tokens += micro.tokens

    def on_step_end(self, trainer: Trainer) -> None:
        self.seconds += trainer.step_seconds  # the training step only: no eval, no save
        if not trainer.is_log_step:
            return
        self.window.all_reduce()
        values = self.window.values()
        trainer.window = close_routing_window(trainer.model)
        trainer.metrics.update(values)
        trainer.metrics.update(layer_losses(values))
        trainer.metrics["train/lr"] = trainer.scheduler.get_last_lr()[0]
        trainer.metrics["train/tokens_per_s"] = (
            self.tokens * trainer.world / max(self.seconds, 1e-9)
        )
        weights = {**trainer.loss_weights, **self.in_force}
        trainer.metrics.update({f"weights/{k}": v for k, v in weights.items()})
        if self.yields:
            trainer.metrics["balance/yield"] = float(np.mean(self.yields))
            trainer.metrics.update(
                {f"layer{i}/balance/yield": y for i, y in enumerate(self.yields)}
            )
        trainer.metrics.update(routing_metrics(trainer.window.per_layer, trainer.window.reductions))
        self.window.reset()
        self.seconds, self.tokens = 0.0, 0

    def state_dict(self, trainer: Trainer) -> dict[str, Any]:
        return {
            "window": self.window.state_dict(),
            "routing": [r.stats.state_dict() for r in iter_routers(trainer.model)],
            "seconds": self.seconds,
            "tokens": self.tokens,
        }

    def load_state_dict(self, trainer: Trainer, state: dict[str, Any]) -> None:
        routers = iter_routers(trainer.model)
        if len(state["routing"]) != len(routers):
            return
        self.window.load_state_dict(state["window"])
        for router, stats in zip(routers, state["routing"]):
            router.stats.load_state_dict(stats)
        self.seconds, self.tokens = state["seconds"], state["tokens"]
