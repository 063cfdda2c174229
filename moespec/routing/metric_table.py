"""The routing metrics: one row each, read by every place that shows them.

:class:`~moespec.routing.metrics.RoutingStats` computes the statistics of a layer; this table
says what each is called, which way is better, how layers combine, and where it is shown:
``compare`` (``moespec-compare``'s table), ``plot`` (its curves), ``validation`` (the
validation and evaluation-set tables, and compare's ``validation:`` and ``<set>:`` rows),
``eval`` (the routing figures an evaluation pass logs), ``report`` (the report's tables) and
``report_figure`` (the report's layer-wise panels). A metric computed but not in the table is
logged by training and shown nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

PLACES = ("compare", "plot", "validation", "eval", "report", "report_figure")


@dataclass(frozen=True)
class RoutingMetric:
    """A routing statistic, logged as ``routing/<name>`` and ``layer{i}/routing/<name>``."""

    name: str
    label: str  # what tables call it
    short: str  # beside a set's name ("validation: output overlap")
    better: str | None  # "lower", "higher" or None (no direction)
    reduction: str = "mean"  # how the layers combine: mean, sum or max
    unit: str = ""  # how it is measured, for figure titles
    shown: frozenset[str] = frozenset()
    computed_by: str = "stats"  # RoutingStats, or "dispatch": an expert-parallel backend

    @property
    def title(self) -> str:
        return f"{self.label} ({self.unit})" if self.unit else self.label


def _metric(*args: object, shown: str = "", **kw: object) -> RoutingMetric:
    places = frozenset(shown.split())
    if unknown := places - set(PLACES):
        raise ValueError(f"unknown places {sorted(unknown)}; valid: {', '.join(PLACES)}")
    return RoutingMetric(*args, shown=places, **kw)  # type: ignore[arg-type]


ROUTING_METRICS: tuple[RoutingMetric, ...] = (
    _metric("output_overlap", "expert output overlap", "output overlap", "lower",
            unit="mean |cos|", shown="compare plot validation eval report report_figure"),
    _metric("token_overlap", "expert token-set overlap", "token overlap", "lower",
            unit="Jaccard", shown="compare report report_figure"),
    _metric("domain_mi", "domain MI (normalised)", "domain MI", "higher",
            unit="I(expert; domain) / H(domain)",
            shown="compare plot validation eval report report_figure"),
    _metric("variance", "routing variance", "variance", "higher", shown="compare plot"),
    _metric("maxvio", "MaxVio (load imbalance)", "MaxVio", None,
            shown="compare plot validation eval report report_figure"),
    _metric("relative_maxvio", "MaxVio / largest possible", "relative MaxVio", None,
            shown="compare"),
    _metric("top_expert_share", "share of slots to the top expert", "top expert share", None,
            shown="eval report"),
    _metric("load_cv", "load CV", "load CV", None, shown="compare eval"),
    _metric("dead_experts", "dead experts", "dead experts", None, reduction="sum",
            shown="compare eval report report_figure"),
    _metric("routing_entropy", "routing entropy", "routing entropy", None, unit="nats",
            shown="report report_figure"),
    _metric("load_entropy", "load entropy", "load entropy", None, unit="nats", shown="report"),
    _metric("dispatch_rows_ratio", "expert rows computed per routed row", "rows per route",
            "lower", shown="compare", computed_by="dispatch"),
)  # fmt: skip


def shown_in(place: str) -> tuple[RoutingMetric, ...]:
    """The metrics shown in ``place`` (one of :data:`PLACES`), in table order."""
    if place not in PLACES:
        raise ValueError(f"unknown place {place!r}; valid: {', '.join(PLACES)}")
    return tuple(m for m in ROUTING_METRICS if place in m.shown)


def layer_reductions() -> dict[str, str]:
    """How each metric of the table combines over layers (``mean`` where not said)."""
    return {m.name: m.reduction for m in ROUTING_METRICS if m.reduction != "mean"}
