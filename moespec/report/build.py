"""The numbers of one report: per model and layer, decoded top tokens, differences."""

from __future__ import annotations

from typing import Any

from ..routing.metric_table import shown_in
from ..routing.metrics import routing_metrics
from .collect import Collected, ReportOptions, summarise

#: Layer-mean metrics shown in the table of differences.
DIFF_METRICS = tuple(m.name for m in shown_in("report"))


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def model_report(
    name: str,
    path: str,
    step: int,
    collected: Collected,
    tokenizer: Any,
    opts: ReportOptions,
) -> dict[str, Any]:
    """Every number of one model over the data, its top tokens decoded with snippets."""
    layers = summarise(collected, opts)
    for li, layer in enumerate(layers):
        for ex in layer["experts"]:
            for key in ("top_by_share", "top_by_lift"):
                for row in ex[key]:
                    row["text"] = _decode(tokenizer, [row["token"]])
                    shown = collected.snippets.get((li, ex["expert"], row["token"]), [])
                    row["snippets"] = [
                        [_decode(tokenizer, w[:p]), _decode(tokenizer, w[p : p + 1]),
                         _decode(tokenizer, w[p + 1 :])]
                        for w, p in shown
                    ]  # fmt: skip
    first = collected.stats[0]
    return {
        "name": name,
        "path": path,
        "step": step,
        "tokens": collected.tokens,
        "num_experts": first.num_experts,
        "top_k": int(sum(layers[0]["slots"]) / max(collected.tokens, 1)),
        "mean": {
            k.removeprefix("routing/"): v
            for k, v in routing_metrics([ly["metrics"] for ly in layers]).items()
            if not k.startswith("layer")
        },
        "layers": layers,
    }


def differences(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each model against the first: layer means and per-layer values, other − first."""
    if len(models) < 2:
        return []
    base = models[0]
    rows = []
    for m in models[1:]:
        row: dict[str, Any] = {"model": m["name"], "baseline": base["name"], "mean": {},
                               "per_layer": {}}  # fmt: skip
        for key in DIFF_METRICS:
            if key in m["mean"] and key in base["mean"]:
                row["mean"][key] = m["mean"][key] - base["mean"][key]
            if len(m["layers"]) == len(base["layers"]):
                pairs = [(a["metrics"].get(key), b["metrics"].get(key))
                         for a, b in zip(m["layers"], base["layers"])]  # fmt: skip
                if all(a is not None and b is not None for a, b in pairs):
                    row["per_layer"][key] = [a - b for a, b in pairs]
        rows.append(row)
    return rows
