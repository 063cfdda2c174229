"""The expert specialization report: routing statistics of trained MoE models over labelled
data, accumulated as counts, written as ``report.json``, PNG figures and ``report.html``."""

from .collect import ReportOptions, collect
from .probe import routing_probe
from .stats import ReportStats, layer_summary, top_tokens

__all__ = [
    "ReportOptions",
    "ReportStats",
    "collect",
    "layer_summary",
    "routing_probe",
    "top_tokens",
]
