"""Evaluation sets: teacher-forced completion loss, generation accuracy and routing per set.

A set is a local file in any SFT format (``eval.sets.<name>.source``). Every example splits
into its prompt (the tokens before the first trained token) and its reference completion.
``loss`` runs the examples teacher-forced (loss and perplexity on the trained tokens, and the
routing statistics of the set); ``generate`` decodes greedily from the prompts, extracts the
answer from prediction and reference the same way and counts exact matches.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.sft_cache import SftSources, encode_sources
from ..data.tokenizer import pad_id
from ..routing import TokenContext, set_token_context
from .extract import METHODS, exact_match, extract
from .generate import greedy_generate
from .routing import EvalRouting

SET_METRICS = ("loss", "generate")


@dataclass
class EvalSetConfig:
    """One evaluation set; ``None`` fields take the value of the recipe's ``data.*``."""

    source: str = ""
    metrics: list[str] = field(default_factory=lambda: ["loss"])
    format: str | None = None
    prompt_field: str | None = None
    completion_field: str | None = None
    prompt_template: str | None = None
    messages_field: str | None = None
    max_examples: int = 0  # 0: all
    batch_size: int = 8
    max_new_tokens: int = 64
    extract: str = "gsm8k"  # regex, last_number, gsm8k, choice
    pattern: str | None = None  # for extract=regex: one capture group
    stop: list[str] = field(default_factory=list)  # stop strings (cut the prediction there)
    #: domain -> {extract, pattern, letters}: another extraction for that domain's examples
    per_domain: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalConfig:
    """``eval.sets.<name>`` (see :class:`EvalSetConfig`), evaluated every ``every`` steps
    (0: ``trainer.eval_every``), at the end, and before training when ``at_start``."""

    sets: dict[str, Any] = field(default_factory=dict)
    every: int = 0
    at_start: bool = False


def eval_set_config(node: Any, key: str) -> EvalSetConfig:
    """An ``eval.sets.<name>`` mapping as an :class:`EvalSetConfig`; bad keys are an error."""
    if isinstance(node, EvalSetConfig):
        cfg = node
    else:
        valid = [f.name for f in dataclasses.fields(EvalSetConfig)]
        items = dict(node.items()) if hasattr(node, "items") else None
        if items is None:
            raise ValueError(f"{key} must be a mapping ({', '.join(valid)}), got {node!r}")
        if unknown := [k for k in items if k not in valid]:
            raise ValueError(f"{key}: unknown key {unknown[0]!r} (valid keys: {', '.join(valid)})")
        cfg = EvalSetConfig(
            **{k: list(v) if k in ("metrics", "stop") else v for k, v in items.items()}
        )
    if not cfg.source:
        raise ValueError(f"{key}.source is empty: give a local file")
    if missing := [p for p in cfg.source.split(",") if not Path(p.strip()).expanduser().exists()]:
        raise ValueError(f"{key}.source: no such file {missing[0]!r}")
    if bad := [m for m in cfg.metrics if m not in SET_METRICS]:
        raise ValueError(f"{key}.metrics: {bad[0]!r}; valid: {', '.join(SET_METRICS)}")
    if cfg.extract not in METHODS:
        raise ValueError(f"{key}.extract={cfg.extract!r}; valid: {', '.join(METHODS)}")
    if cfg.extract == "regex":
        extract("", "regex", pattern=cfg.pattern or "")  # no capture group: ValueError
    for domain, rule in cfg.per_domain.items():
        method, kw = _rule(dict(rule), f"{key}.per_domain.{domain}")
        extract("", method, **kw)
    for name in ("batch_size", "max_new_tokens"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{key}.{name} must be >= 1, got {getattr(cfg, name)}")
    return cfg


def _rule(rule: dict[str, Any], key: str) -> tuple[str, dict[str, Any]]:
    """``{extract, pattern, letters}`` as ``(method, keyword arguments)``."""
    if bad := [k for k in rule if k not in ("extract", "pattern", "letters")]:
        raise ValueError(f"{key}: unknown key {bad[0]!r} (valid keys: extract, pattern, letters)")
    method = rule.get("extract", "gsm8k")
    if method not in METHODS:
        raise ValueError(f"{key}.extract={method!r}; valid: {', '.join(METHODS)}")
    return method, {k: v for k, v in rule.items() if k != "extract" and v is not None}


def extraction_for(cfg: EvalSetConfig, domain: str | None) -> tuple[str, dict[str, Any]]:
    """The extraction method and its arguments for an example of ``domain``."""
    if domain is not None and domain in cfg.per_domain:
        return _rule(dict(cfg.per_domain[domain]), domain)
    return cfg.extract, ({"pattern": cfg.pattern} if cfg.extract == "regex" else {})


def validate_eval_config(cfg: EvalConfig, prefix: str = "eval") -> dict[str, EvalSetConfig]:
    """The sets of ``cfg`` checked; ``ValueError`` names the first bad key."""
    if cfg.every < 0:
        raise ValueError(f"{prefix}.every must be >= 0, got {cfg.every}")
    return {n: eval_set_config(s, f"{prefix}.sets.{n}") for n, s in cfg.sets.items()}


@dataclass
class EvalSet:
    """A loaded set: examples as ``(ids, trained)``, their domains, prompts and references."""

    name: str
    cfg: EvalSetConfig
    examples: list[tuple[list[int], list[int]]]
    domains: list[str | None]
    prompts: list[list[int]]
    references: list[str]


def load_eval_set(name: str, cfg: EvalSetConfig, data_cfg: Any, tokenizer: Any) -> EvalSet:
    """Tokenize the set's file as the recipe's data would be (its format and fields)."""
    overrides = {
        k: getattr(cfg, k)
        for k in ("format", "prompt_field", "completion_field", "prompt_template", "messages_field")
        if getattr(cfg, k) is not None
    }
    fmt = overrides.get("format", data_cfg.format)
    overrides["format"] = "auto" if fmt == "text" else fmt
    set_data = dataclasses.replace(data_cfg, source=cfg.source, **overrides)
    ids, trained, doms = encode_sources(set_data, SftSources(set_data), tokenizer)
    if cfg.max_examples:
        ids, trained, doms = (
            ids[: cfg.max_examples],
            trained[: cfg.max_examples],
            doms[: cfg.max_examples],
        )
    if not ids:
        raise ValueError(f"eval.sets.{name}: {cfg.source} holds no example")
    prompts, refs = [], []
    for x, m in zip(ids, trained):
        first = m.index(1) if 1 in m else len(m)
        prompts.append(x[:first])
        refs.append(tokenizer.decode(x[first:], skip_special_tokens=True))
    es = EvalSet(name, cfg, list(zip(ids, trained)), doms, prompts, refs)
    if "generate" in cfg.metrics:
        check_references(es)
    return es


def check_references(es: EvalSet) -> None:
    """Every reference yields an answer by its extraction, else one ``ValueError`` naming the
    first that does not and the extractions that read every reference (before any decoding)."""
    for i, (ref, domain) in enumerate(zip(es.references, es.domains)):
        method, kw = extraction_for(es.cfg, domain)
        if extract(ref, method, **kw) is not None:
            continue
        plain = [m for m in METHODS if m != "regex"]  # regex needs a pattern of the user's
        works = [m for m in plain if _reads_all(es.references, m)]
        hint = (
            f"eval.sets.{es.name}.extract={works[0]} reads an answer from every reference"
            if works
            else f"set eval.sets.{es.name}.extract=regex with a pattern (one capture group) "
            "that finds the answer, or per_domain rules"
        )
        raise ValueError(
            f"eval.sets.{es.name}: extract={method} finds no answer in the reference of example "
            f"{i + 1} ({ref[:80]!r}); {hint}"
        )


def _reads_all(references: list[str], method: str) -> bool:
    return all(extract(r, method) is not None for r in references)


@torch.no_grad()
def teacher_forced(
    model: nn.Module, es: EvalSet, device: torch.device, pad_id: int
) -> dict[str, float]:
    """Mean loss over the trained tokens, perplexity, and the set's routing statistics
    (every rank runs every example, so the counts are not summed over ranks)."""
    model.eval()
    total, count = 0.0, 0
    index = {d: i for i, d in enumerate(sorted({d for d in es.domains if d is not None}))}
    with EvalRouting(model) as routing:
        for start in range(0, len(es.examples), es.cfg.batch_size):
            chunk = es.examples[start : start + es.cfg.batch_size]
            width = max(len(x) for x, _ in chunk) - 1
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            labels = torch.full_like(ids, -100)
            docs = torch.full_like(ids, -1)
            doms = torch.full_like(ids, -1)
            for i, (x, m) in enumerate(chunk):
                n = len(x) - 1
                ids[i, :n] = torch.tensor(x[:-1])
                target = torch.tensor(x[1:])
                labels[i, :n] = torch.where(torch.tensor(m[1:]) == 1, target, -100)
                docs[i, :n] = 0
                doms[i, :n] = index.get(es.domains[start + i], -1)
            context = TokenContext(
                domain_ids=doms.reshape(-1).to(device),
                token_mask=(docs >= 0).reshape(-1).to(device),
            )
            set_token_context(model, context)
            out = model(
                ids.to(device), labels.to(device),
                position_ids=torch.arange(width).expand_as(ids).contiguous().to(device),
                document_ids=docs.to(device),
            )  # fmt: skip
            valid = labels.to(device) != -100
            total += float((out.token_losses * valid).sum())
            count += int(valid.sum())
        figures = routing.figures(all_reduce=False)
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": float(count), **figures}


def generation_accuracy(
    model: nn.Module, es: EvalSet, tokenizer: Any, pad_id: int, out_path: Path | None
) -> dict[str, float]:
    """Greedy decoding of every prompt; exact-match accuracy overall and per domain."""
    cfg = es.cfg
    stop_ids = [tokenizer.eos_token_id] + [
        i for s in cfg.stop if (i := tokenizer.convert_tokens_to_ids(s)) not in (None, tokenizer.unk_token_id)
    ]  # fmt: skip
    rows, hits = [], []
    for start in range(0, len(es.prompts), cfg.batch_size):
        prompts = es.prompts[start : start + cfg.batch_size]
        for j, new in enumerate(greedy_generate(
            model, prompts, max_new_tokens=cfg.max_new_tokens, stop_ids=stop_ids, pad_id=pad_id
        )):  # fmt: skip
            i = start + j
            text = tokenizer.decode(new, skip_special_tokens=True)
            for s in cfg.stop:
                text = text.split(s, 1)[0]
            method, kw = extraction_for(cfg, es.domains[i])
            ok = exact_match(text, es.references[i], method, **kw)
            hits.append(ok)
            rows.append({
                "index": i, "domain": es.domains[i], "prompt": tokenizer.decode(es.prompts[i]),
                "prediction": text, "reference": es.references[i],
                "predicted": extract(text, method, **kw), "correct": ok,
            })  # fmt: skip
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = {"accuracy": float(np.mean(hits))}
    for d in sorted({d for d in es.domains if d is not None}):
        mine = [h for h, dd in zip(hits, es.domains) if dd == d]
        out[f"accuracy/{d}"] = float(np.mean(mine))
    return out


def evaluate_set(
    model: nn.Module,
    es: EvalSet,
    tokenizer: Any,
    device: torch.device,
    out_dir: Path | None,
    step: int,
) -> dict[str, float]:
    """Every metric of the set as ``eval/<set>/<metric>``."""
    pad = pad_id(tokenizer)
    was_training = model.training
    figures: dict[str, float] = {}
    try:
        if "loss" in es.cfg.metrics:
            figures.update(teacher_forced(model, es, device, pad))
        if "generate" in es.cfg.metrics:
            path = None if out_dir is None else out_dir / es.name / f"step{step:06d}.jsonl"
            figures.update(generation_accuracy(model, es, tokenizer, pad, path))
    finally:
        model.train(was_training)
    return {f"eval/{es.name}/{k}": v for k, v in figures.items()}
