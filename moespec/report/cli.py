"""``moespec-report``: what each expert learned, from trained runs over labelled data.

    moespec-report runs/demo/aux_only runs/demo/specialization --data val --out runs/demo/report
    moespec-report runs/x --data eval.jsonl --out report            # jsonl: text, domain
    moespec-report runs/x/hf_model --data code=a.py prose=b.txt --out report

A target is a run directory (its recipe and latest checkpoint), one checkpoint
(``RUN/checkpoints/stepN``) or a Hugging Face model directory. ``--out`` receives
``report.html`` (self-contained), ``report.json`` (every number) and the figures as PNG.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
from pathlib import Path
from typing import Any

from ..cli import fail, prepare_environment
from .collect import ReportOptions, collect
from .data import VAL, dataset_batches, domain_names, parse_sources, text_batches

log = logging.getLogger("moespec")

REPORT_JSON, REPORT_HTML, SUMMARY_PNG = "report.json", "report.html", "summary.png"


def parser() -> argparse.ArgumentParser:
    """The command line of ``moespec-report``."""
    p = argparse.ArgumentParser(prog="moespec-report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("targets", nargs="+", type=Path, help="run, checkpoint or HF model directories")
    p.add_argument("--data", nargs="+", default=[VAL],
                   help="FILE.jsonl (text, domain), NAME=FILE pairs, or 'val' (default)")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("report"), help="output directory")
    p.add_argument("--names", nargs="+", help="one label per target (default: directory names)")
    p.add_argument("--override", nargs="*", default=[], help="Hydra overrides for every run")
    p.add_argument("--max-tokens", type=int, default=0, help="stop after this many (0: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=0, help="window length (0: the recipe's)")
    p.add_argument("--top", type=int, default=10, help="top tokens per expert")
    p.add_argument("--snippets", type=int, default=2, help="contexts per top token (0: none)")
    p.add_argument("--wandb", action="store_true", help="log figures and a table to wandb")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def labels(targets: list[Path], names: list[str] | None) -> list[str]:
    """``--names`` or the targets' directory names (with the parent when they clash)."""
    if names:
        if len(names) != len(targets):
            raise ValueError(f"--names gives {len(names)} labels for {len(targets)} targets")
        return names
    short = [t.resolve().name for t in targets]
    if len(set(short)) < len(short):
        short = [f"{t.resolve().parent.name}/{t.resolve().name}" for t in targets]
    return short


def run(args: argparse.Namespace) -> Path:
    """Collect every model's statistics, write the JSON, figures and page; returns the page."""
    from ..train.runs import load_model
    from .build import differences, model_report

    names = labels(args.targets, args.names)
    for t in args.targets:
        if not t.is_dir():
            raise ValueError(f"{t}: no such directory (give a run, checkpoint or HF model dir)")
    use_val = args.data == [VAL]
    sources = [] if use_val else parse_sources(args.data)
    file_domains = [] if use_val else domain_names(sources)
    opts = ReportOptions(top_n=args.top, snippets=args.snippets, progress=not args.no_progress)
    models, notes, domains = [], [], file_domains
    for target, name in zip(args.targets, names):
        loaded = load_model(target, list(args.override), with_data=use_val)
        tok = loaded.tokenizer
        if use_val:
            domains = list(loaded.data.domains)
            val = loaded.data.val

            def batches(val=val):
                return dataset_batches(val, args.batch_size, args.max_tokens)
        else:
            seq = args.seq_len or loaded.cfg.data.seq_len

            def batches(tok=tok, seq=seq, domains=domains):
                return text_batches(sources, tok, domains, seq, args.batch_size, args.max_tokens)

        collected = collect(loaded.model, batches, len(tok), len(domains), opts, name)
        if collected.tokens == 0:
            raise ValueError(f"{name}: the data gave no token to route")
        models.append(model_report(name, str(target), loaded.step, collected, tok, opts))
        del loaded, collected
        gc.collect()
    if not domains:
        notes.append("The data carries no domain labels: the expert × domain figures and the "
                     "domain MI are left out (give a jsonl with a 'domain' field or NAME=FILE).")  # fmt: skip
    report = {
        "data": {
            "sources": args.data,
            "domains": domains,
            "tokens": models[0]["tokens"],
            "notes": notes,
        },  # fmt: skip
        "models": models,
        "differences": differences(models),
    }
    return write_outputs(report, args.out, wandb=args.wandb)


def write_outputs(report: dict[str, Any], out: Path, *, wandb: bool = False) -> Path:
    """``report.json``, the PNGs and ``report.html`` under ``out`` (fixed names only)."""
    from .figures import model_figures, summary_figure
    from .html import write_html

    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_JSON).write_text(json.dumps(report, indent=1))
    figures: dict[str, list[Path]] = {
        "summary": [summary_figure(report["models"], out / SUMMARY_PNG)]
    }
    for i, m in enumerate(report["models"]):
        for p in model_figures(m, out, f"model{i}", report["data"]["domains"]):
            figures.setdefault(p.stem.split("_", 1)[1], []).append(p)
    page = write_html(report, figures, out / REPORT_HTML)
    if wandb:
        from .wandb_log import log_report

        log_report(report, figures, out)
    return page


def main(argv: list[str] | None = None) -> None:
    """Console entry point; bad input prints one ``error:`` line and exits 2."""
    args = parser().parse_args(argv)
    prepare_environment()
    logging.basicConfig(level=logging.INFO,
                        format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")  # fmt: skip
    try:
        page = run(args)
    except (ValueError, FileNotFoundError) as err:
        fail(err)
    print(f"report: {page}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
