"""Accuracy and latency on a JSONL benchmark, with and without the head controller."""

from __future__ import annotations

import re
import statistics
import string
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from tqdm import tqdm

from ..data.tokenizer import pad_id
from ..eval.extract import extract_choice
from .controller import HeadController
from .data import Example, PromptEncoder
from .model_io import generate
from .selection import HeadProfile


def normalize(text: str) -> str:
    """Lowercase, drop punctuation and squeeze whitespace."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def is_correct(prediction: str, example: Example) -> bool:
    """Multiple choice: the letter ``extract_choice`` finds; free form: the answer's words appear.

    The letter is the last "answer is X" / "answer: X" / "(X)" phrase, else a letter alone ("B.")
    or leading ("B. Paris"), so "I think the answer is B." is B and the "I" does not count.
    """
    if example.answer is None:
        raise ValueError(f"{example.source}: no 'answer' to score against")
    if example.choices:
        answer = example.answer.strip()
        if len(answer) != 1 or not answer.isalpha():
            matches = [
                i for i, c in enumerate(example.choices) if normalize(c) == normalize(answer)
            ]
            if not matches:
                raise ValueError(
                    f"{example.source}: answer {answer!r} is neither a letter nor a choice"
                )
            answer = chr(ord("A") + matches[0])
        found = extract_choice(prediction, letters=string.ascii_uppercase[: len(example.choices)])
        return found is not None and found == answer.upper()
    pred, gold = normalize(prediction), normalize(example.answer)
    return bool(gold) and (pred == gold or f" {gold} " in f" {pred} ")


@dataclass
class Setting:
    """Results of one setting (plain model or with the controller)."""

    name: str
    correct: int = 0
    latencies: list[float] = field(default_factory=list)
    predictions: list[str] = field(default_factory=list)

    def row(self, scored: int) -> list[Any]:
        """Markdown table row."""
        acc = self.correct / scored if scored else float("nan")
        mean = statistics.fmean(self.latencies) if self.latencies else float("nan")
        p50 = statistics.median(self.latencies) if self.latencies else float("nan")
        return [self.name, f"{acc:.3f}", f"{self.correct}/{scored}", f"{mean:.3f}", f"{p50:.3f}"]


def evaluate(
    model: nn.Module,
    encoder: PromptEncoder,
    examples: list[Example],
    profile: HeadProfile,
    *,
    mode: str = "hook",
    max_new_tokens: int = 16,
    failures: list[tuple[str, str]] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every example plain and with the controller (alternating order) and collect results."""
    failures = list(failures or [])
    total = len(examples) + len(failures)
    controller = HeadController(model, profile, mode=mode)
    plain, steered = Setting("plain"), Setting(f"heads ({mode})")
    tokenizer = encoder.tokenizer
    pad = pad_id(tokenizer)
    scored = 0
    for index, example in enumerate(
        tqdm(examples, desc="eval", disable=not (progress and sys.stderr.isatty()))
    ):
        try:
            inputs = encoder.encode(example)
            outputs: dict[str, tuple[str, float]] = {}
            order = ("plain", "heads") if index % 2 == 0 else ("heads", "plain")
            for which in order:
                if which == "heads":
                    with controller:
                        t0 = time.perf_counter()
                        ids = generate(model, inputs, max_new_tokens, pad)
                        elapsed = time.perf_counter() - t0
                else:
                    t0 = time.perf_counter()
                    ids = generate(model, inputs, max_new_tokens, pad)
                    elapsed = time.perf_counter() - t0
                outputs[which] = (encoder.decode(ids), elapsed)
            results = {k: is_correct(text, example) for k, (text, _) in outputs.items()}
        except Exception as err:  # noqa: BLE001 - every failure is reported with its reason
            failures.append((example.source, f"{example.source}: {type(err).__name__}: {err}"))
            continue
        scored += 1
        for setting, key in ((plain, "plain"), (steered, "heads")):
            text, elapsed = outputs[key]
            setting.correct += int(results[key])
            setting.latencies.append(elapsed)
            setting.predictions.append(text)
    reasons = Counter(_reason_kind(r) for _, r in failures)
    return {
        "total": total,
        "scored": scored,
        "failed": len(failures),
        "failures": [{"source": s, "reason": r} for s, r in failures],
        "failure_kinds": dict(reasons),
        "settings": {
            s.name: {
                "accuracy": s.correct / scored if scored else None,
                "correct": s.correct,
                "mean_latency_s": statistics.fmean(s.latencies) if s.latencies else None,
                "median_latency_s": statistics.median(s.latencies) if s.latencies else None,
            }
            for s in (plain, steered)
        },
        "table": _table([plain, steered], scored),
    }


def _reason_kind(reason: str) -> str:
    """A short category of a failure reason (the text after the source)."""
    tail = reason.split(": ", 1)[-1]
    return re.sub(r"'[^']*'|\([^)]*\)|\d+", "…", tail)[:80]


def _table(settings: list[Setting], scored: int) -> str:
    header = ["setting", "accuracy", "correct", "mean latency (s)", "median latency (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in s.row(scored)) + " |" for s in settings]
    return "\n".join(lines)
