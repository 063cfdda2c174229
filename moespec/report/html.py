"""``report.html``: one self-contained page (figures as base64 PNG, no script, no network)."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from ..routing.metric_table import shown_in
from .build import DIFF_METRICS

STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1500px}
h1{font-size:22px} h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ccc}
h3{font-size:15px} table{border-collapse:collapse;font-size:12px;margin:8px 0}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:right;vertical-align:top}
th{background:#f3f3f3} td.l,th.l{text-align:left} .row{display:flex;flex-wrap:wrap;gap:16px}
.fig{flex:1 1 0;min-width:320px} .fig img{max-width:100%} .note{color:#8a4b00}
code{background:#f5f5f5;padding:0 3px} .tok{font-family:monospace;background:#eef}
.snip{color:#555;font-family:monospace;font-size:11px} details{margin:6px 0}
"""


def _e(text: Any) -> str:
    return html.escape(str(text))


def _tok(text: str) -> str:
    shown = text.replace(" ", "\u2423").replace("\n", "\u23ce").replace("\t", "\u21e5")
    return f'<span class="tok">{_e(shown)}</span>'


def _num(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, int) or float(v).is_integer():
        return str(int(v))
    return f"{v:.4g}"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f'<th class="{"l" if i == 0 else ""}">{h}</th>' for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(f'<td class="{"l" if i == 0 else ""}">{c}</td>' for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )  # fmt: skip
    return f"<table><tr>{head}</tr>{body}</table>"


def _summary(report: dict[str, Any]) -> str:
    models = report["models"]
    keys = [k for k in DIFF_METRICS if any(k in m["mean"] for m in models)]
    rows = [[_e(m["name"]), str(m["step"]), str(m["tokens"]), *(_num(m["mean"].get(k)) for k in keys)]
            for m in models]  # fmt: skip
    out = _table(["model", "step", "tokens", *keys], rows)
    for d in report["differences"]:
        diff_rows = [[k, _num(v), " ".join(_num(x) for x in d["per_layer"].get(k, []))]
                     for k, v in d["mean"].items()]  # fmt: skip
        out += f"<h3>{_e(d['model'])} − {_e(d['baseline'])}</h3>"
        out += _table(["metric", "layer mean", "per layer"], diff_rows)
    return out


def _layers_table(model: dict[str, Any]) -> str:
    keys = [m.name for m in shown_in("report")]
    keys = [k for k in keys if any(k in ly["metrics"] for ly in model["layers"])]
    rows = [[str(ly["layer"]), *(_num(ly["metrics"].get(k)) for k in keys),
             ", ".join(map(str, ly["near_dead"])) or "-"] for ly in model["layers"]]  # fmt: skip
    return _table(["layer", *keys, "near-dead experts"], rows)


def _experts(model: dict[str, Any]) -> str:
    out = []
    for li, layer in enumerate(model["layers"]):
        rows = []
        for ex in layer["experts"]:
            share = " ".join(
                f"{_tok(r['text'])} {100 * r['share']:.1f}%" for r in ex["top_by_share"]
            )
            lift = " ".join(f"{_tok(r['text'])} ×{r['lift']:.1f}" for r in ex["top_by_lift"])
            snippets = "<br>".join(
                f"{_e(a)}<b>[{_e(b)}]</b>{_e(c)}"
                for r in ex["top_by_lift"][:3] for a, b, c in r["snippets"][:1]
            )  # fmt: skip
            rows.append([str(ex["expert"]), f"{100 * layer['load'][ex['expert']]:.1f}%", share,
                         lift, f'<span class="snip">{snippets}</span>'])  # fmt: skip
        table = _table(["expert", "load", "top tokens (share of the expert's slots)",
                        "top tokens (lift over corpus frequency)", "in context"], rows)  # fmt: skip
        opened = " open" if li == 0 else ""
        out.append(f"<details{opened}><summary>layer {layer['layer']}</summary>{table}</details>")
    return "".join(out)


def write_html(report: dict[str, Any], figures: dict[str, list[Path]], path: Path) -> Path:
    """The page: data, summary and differences, figures side by side, per-expert tokens.

    ``figures`` maps a figure kind (``load``, ``expert_domain``, ...) to one PNG per model;
    ``figures["summary"]`` holds the single layer-wise summary figure.
    """
    models = report["models"]
    data = report["data"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>moespec expert "
             f"specialization report</title><style>{STYLE}</style></head><body>",
             "<h1>Expert specialization report</h1>",
             f"<p>Data: {_e(', '.join(data['sources']))}; {data['tokens']} tokens per model; "
             f"domains: {_e(', '.join(data['domains']) or 'none')}.</p>"]  # fmt: skip
    parts += [f'<p class="note">{_e(n)}</p>' for n in data.get("notes", [])]
    parts += ["<h2>Summary (layer means)</h2>", _summary(report)]
    parts += ["<h2>Layer-wise summary</h2>", _img(figures["summary"][0], "layer-wise summary")]
    titles = {
        "load": "Expert load",
        "expert_domain": "Expert × domain routing share",
        "coactivation": "Expert co-activation",
        "similarity": "Expert output similarity",
    }
    for kind, title in titles.items():
        if kind not in figures:
            continue
        cells = "".join(
            f'<div class="fig"><h3>{_e(m["name"])}</h3>{_img(p, kind + " " + m["name"])}</div>'
            for m, p in zip(models, figures[kind])
        )
        parts += [f"<h2>{title}</h2>", f'<div class="row">{cells}</div>']
    for m in models:
        parts += [f"<h2>{_e(m['name'])}: layers and experts</h2>",
                  f"<p>{_e(m['path'])}, step {m['step']}</p>", _layers_table(m), _experts(m)]  # fmt: skip
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
