"""Tests of the synthetic instruction task: determinism, exact answers, splits, forms, CLI."""

from __future__ import annotations

import json
import operator
import os
import re
import subprocess
import sys
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest

from moespec.data import synth
from moespec.eval import extract
from tests.common import ROOT

# Independent references: a pattern for each kind of prompt and the answer computed from the
# numbers and words read back out of it (no code of the generator involved).
P = "(?:She|He)"
p = "(?:she|he)"
KIND = r"(?:word|string)"


def _units_table() -> dict[str, tuple[str, int]]:
    """Unit name (plural and singular) -> (dimension, size in the dimension's smallest unit)."""
    sizes = {
        "kilometer": ("length", 1_000_000),
        "meter": ("length", 1000),
        "centimeter": ("length", 10),
        "millimeter": ("length", 1),
        "kilogram": ("mass", 1000),
        "gram": ("mass", 1),
        "liter": ("volume", 1000),
        "milliliter": ("volume", 1),
        "week": ("time", 7 * 24 * 3600),
        "day": ("time", 24 * 3600),
        "hour": ("time", 3600),
        "minute": ("time", 60),
        "second": ("time", 1),
        "yard": ("imperial", 36),
        "foot": ("imperial", 12),
        "inch": ("imperial", 1),
        "dozen": ("count", 12),
        "egg": ("count", 1),
    }
    plural = {"foot": "feet", "inch": "inches", "dozen": "dozen"}
    table = dict(sizes)
    table.update({plural.get(k, k + "s"): v for k, v in sizes.items()})
    return table


UNITS = _units_table()


def _convert(value: str, src: str, dst: str) -> Fraction:
    (dim_a, a), (dim_b, b) = UNITS[src], UNITS[dst]
    assert dim_a == dim_b, (src, dst)
    return Fraction(int(value) * a, b)


def _options(prompt: str) -> dict[str, str]:
    lines = prompt.split("\n")[1:]
    assert [line[:3] for line in lines] == ["A. ", "B. ", "C. ", "D. "], prompt
    options = {line[0]: line[3:] for line in lines}
    assert len(set(options.values())) == 4, f"options not distinct: {prompt!r}"
    return options


def _only(options: dict[str, str], value_of, best) -> str:
    values = {k: value_of(v) for k, v in options.items()}
    target = best(values.values())
    letters = [k for k, v in values.items() if v == target]
    assert len(letters) == 1, f"not exactly one right option: {options}"
    return letters[0]


def _meters(text: str) -> Fraction:
    number, unit = text.split()
    return Fraction(number) * {"m": 1, "km": 1000}[unit]


OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}

REFERENCES = {
    "arithmetic": {
        "wage": (
            rf"\w+ earns \$(\d+) an hour\. {P} worked (\d+) hours on Monday and (\d+) hours on "
            rf"Tuesday\. How much did {p} earn in total\?",
            lambda r, a, b: int(r) * (int(a) + int(b)),
        ),
        "change": (
            rf"\w+ buys (\d+) \w+ at \$(\d+) each and (\d+) \w+ at \$(\d+) each\. {P} pays with a "
            rf"\$(\d+) bill\. How much change does {p} get\?",
            lambda a, x, b, y, bill: int(bill) - int(a) * int(x) - int(b) * int(y),
        ),
        "collection": (
            rf"\w+ has (\d+) (\w+)\. {P} gives (\d+) to a friend and then buys (\d+) bags with "
            rf"(\d+) \2 each\. How many \2 does {p} have now\?",
            lambda a, _, b, c, d: int(a) - int(b) + int(c) * int(d),
        ),
        "boxes": (
            r"A baker makes (\d+) trays of (\d+) (\w+)\. She sells (\d+) \3 and packs the rest "
            r"equally into (\d+) boxes\. How many \3 go in each box\?",
            lambda t, k, _, s, m: Fraction(int(t) * int(k) - int(s), int(m)),
        ),
        "trip": (
            r"A train travels at (\d+) km per hour for (\d+) hours, then at (\d+) km per hour for "
            r"(\d+) hours\. How many kilometers does it travel in total\?",
            lambda v, h, w, g: int(v) * int(h) + int(w) * int(g),
        ),
        "ages": (
            r"(\w+) is (\d+) years old\. (\w+) is (\d+) times as old as \1\. How old will \3 be in "
            r"(\d+) years\?",
            lambda _, a, __, k, y: int(a) * int(k) + int(y),
        ),
        "savings": (
            rf"\w+ saves \$(\d+) each week\. After (\d+) weeks, {p} spends \$(\d+) on a game\. "
            rf"How much money does {p} have left\?",
            lambda s, w, c: int(s) * int(w) - int(c),
        ),
    },
    "string": {
        "reverse": (rf'Reverse the {KIND} "([a-z]+)"\.', lambda w: w[::-1]),
        "reverse2": (
            rf'Write the letters of the {KIND} "([a-z]+)" in reverse order\.',
            lambda w: "".join(reversed(list(w))),
        ),
        "sort": (
            rf'Sort the letters of the {KIND} "([a-z]+)" in alphabetical order\.',
            lambda w: "".join(sorted(w)),
        ),
        "count": (
            rf'How many times does the letter "([a-z])" appear in the {KIND} "([a-z]+)"\?',
            lambda c, w: sum(1 for x in w if x == c),
        ),
    },
    "units": {
        "convert": (r"Convert (\d+) (\w+) to (\w+)\.", _convert),
        "how_many": (r"How many (\w+) are in (\d+) (\w+)\?", lambda d, v, s: _convert(v, s, d)),
        "mixed": (
            r"How many (\w+) are in (\d+) (\w+) and (\d+) \1\?",
            lambda d, v, s, extra: _convert(v, s, d) + int(extra),
        ),
    },
    "choice": {
        "sum": (
            r"What is (\d+) ([-+*]) (\d+)\?\n.*",
            lambda a, op, b, prompt: _only(
                _options(prompt), int, lambda vs: OPS[op](int(a), int(b))
            ),
        ),
        "largest": (
            r"Which number is the largest\?\n.*",
            lambda prompt: _only(_options(prompt), int, max),
        ),
        "first": (
            r"Which word comes first in alphabetical order\?\n.*",
            lambda prompt: _only(_options(prompt), str, min),
        ),
        "longest": (
            r"Which distance is the longest\?\n.*",
            lambda prompt: _only(_options(prompt), _meters, max),
        ),
    },
}


def reference_answer(example: dict) -> tuple[str, str]:
    """(kind, answer) from the prompt alone; exactly one reference pattern must match."""
    hits = []
    for kind, (pattern, fn) in REFERENCES[example["domain"]].items():
        m = re.fullmatch(pattern, example["prompt"], flags=re.DOTALL)
        if m:
            args = m.groups() + ((example["prompt"],) if example["domain"] == "choice" else ())
            hits.append((kind, fn(*args)))
    assert len(hits) == 1, f"{len(hits)} reference patterns match {example['prompt']!r}"
    kind, value = hits[0]
    if isinstance(value, Fraction):
        assert value.denominator == 1, f"answer {value} is not an integer: {example['prompt']!r}"
        value = value.numerator
    if isinstance(value, int):
        assert value >= 0, example
    return kind, str(value)


EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = \$?(\d+)")


@pytest.fixture(scope="module")
def examples() -> list[dict]:
    return synth.generate(1200, seed=7)


def test_every_answer_matches_an_independent_reference(examples) -> None:
    kinds = Counter()
    for ex in examples:
        kind, answer = reference_answer(ex)
        kinds[ex["domain"], kind] += 1
        assert ex["answer"] == answer, ex
        tail = f"The answer is {answer}." if ex["domain"] == "choice" else f"#### {answer}"
        assert ex["completion"].endswith("\n" + tail), ex
        assert ex["completion"].count("####") <= 1
        # The worked steps are right too.
        for a, op, b, c in EQUATION.findall(ex["completion"]):
            value = Fraction(int(a), int(b)) if op == "/" else OPS[op](int(a), int(b))
            assert value == int(c), (ex["completion"], a, op, b, c)
        # The scoring method the task names reads the answer back out of the completion.
        method, kw = synth.ANSWER_EXTRACTION[ex["domain"]]
        assert extract.extract(ex["completion"], method, **kw) == answer, ex
        assert len(ex["prompt"]) < 200 and len(ex["completion"]) < 300, ex
    expected = {(d, k) for d, refs in REFERENCES.items() for k in refs}
    assert set(kinds) == expected, f"kinds never generated: {expected - set(kinds)}"


def test_domains_cycle_and_prompts_are_unique(examples) -> None:
    assert [ex["domain"] for ex in examples[:8]] == list(synth.DOMAINS) * 2
    assert Counter(ex["domain"] for ex in examples) == {d: 300 for d in synth.DOMAINS}
    assert len({ex["prompt"] for ex in examples}) == len(examples)
    assert all(set(ex) == {"prompt", "completion", "answer", "domain"} for ex in examples)
    letters = Counter(ex["answer"] for ex in examples if ex["domain"] == "choice")
    assert set(letters) == set("ABCD") and min(letters.values()) > 40, letters


def test_same_seed_same_examples_and_other_seed_differs() -> None:
    assert synth.generate(50, seed=3) == synth.generate(50, seed=3)
    assert synth.generate(50, seed=3) != synth.generate(50, seed=4)
    assert synth.generate(20, seed=3) == synth.generate(50, seed=3)[:20]
    units = synth.generate(12, seed=1, domains=["units"])
    assert {ex["domain"] for ex in units} == {"units"}
    assert synth.generate(0) == []


def read_all(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_files_are_byte_identical_for_a_seed(tmp_path) -> None:
    first = synth.write_task(tmp_path / "a", train=60, val=20, seed=5)
    synth.write_task(tmp_path / "b", train=60, val=20, seed=5)
    synth.write_task(tmp_path / "c", train=60, val=20, seed=6)
    a, b, c = (read_all(tmp_path / x) for x in "abc")
    assert sorted(first) == [
        "chat/train",
        "chat/val",
        "prompt_completion/train",
        "prompt_completion/val",
        "task",
    ]
    assert set(a) == {
        "chat/train.jsonl",
        "chat/val.jsonl",
        "prompt_completion/train.jsonl",
        "prompt_completion/val.jsonl",
        "task.json",
    }
    assert a == b
    assert all(a[k] != c[k] for k in a if k.endswith(".jsonl"))


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_splits_forms_and_fields(tmp_path) -> None:
    paths = synth.write_task(tmp_path, train=400, val=150, seed=11)
    pc = {s: load(paths[f"prompt_completion/{s}"]) for s in ("train", "val")}
    chat = {s: load(paths[f"chat/{s}"]) for s in ("train", "val")}
    assert (len(pc["train"]), len(pc["val"])) == (400, 150)
    train_q = {r["prompt"] for r in pc["train"]}
    val_q = {r["prompt"] for r in pc["val"]}
    assert len(train_q) == 400 and len(val_q) == 150 and not train_q & val_q
    # The training split is generate(train, seed); the prompt gains a newline before the answer.
    assert [r["prompt"] for r in pc["train"]] == [
        e["prompt"] + "\n" for e in synth.generate(400, 11)
    ]
    for split in ("train", "val"):
        for row, conv in zip(pc[split], chat[split], strict=True):
            assert set(row) == {"prompt", "completion", "answer", "domain"}
            assert set(conv) == {"messages", "answer", "domain"}
            user, assistant = conv["messages"]
            assert (user["role"], assistant["role"]) == ("user", "assistant")
            assert user["content"] + "\n" == row["prompt"]
            assert assistant["content"] == row["completion"]
            assert (conv["answer"], conv["domain"]) == (row["answer"], row["domain"])
            ex = {**row, "prompt": user["content"]}
            assert reference_answer(ex)[1] == row["answer"]
    meta = json.loads(paths["task"].read_text())
    assert meta["seed"] == 11 and meta["counts"]["val"] == Counter(r["domain"] for r in pc["val"])
    assert meta["scoring"]["choice"] == {"method": "choice", "letters": "ABCD"}


def test_no_shared_question_even_in_a_small_space(tmp_path) -> None:
    # Dictionary words make the string questions few enough that two independent draws of this
    # size would share some; the validation split must skip those of the training split.
    paths = synth.write_task(tmp_path, 600, 300, seed=2, domains="string", formats="chat")
    train, val = (
        {r["messages"][0]["content"] for r in load(paths[f"chat/{s}"])} for s in ("train", "val")
    )
    assert len(train) == 600 and len(val) == 300 and not train & val
    independent = {e["prompt"] for e in synth.generate(300, "other", domains="string")}
    assert train & independent, "the space is not small enough to test anything"


def test_one_format_and_domain_subset(tmp_path) -> None:
    paths = synth.write_task(tmp_path, 8, 4, seed=0, domains="string,units", formats="chat")
    assert sorted(paths) == ["chat/train", "chat/val", "task"]
    assert not (tmp_path / "prompt_completion").exists()
    assert {r["domain"] for r in load(paths["chat/train"])} == {"string", "units"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"train": -1}, "train must be a non-negative integer"),
        ({"val": 2.5}, "val must be a non-negative integer"),
        ({"domains": ["arithmetic", "poetry"]}, "unknown domain 'poetry'; valid: arithmetic"),
        ({"domains": ""}, "no domains given"),
        ({"formats": "xml"}, "unknown format 'xml'; valid: prompt_completion, chat, both"),
    ],
)
def test_write_task_rejects_bad_arguments(tmp_path, kwargs, match) -> None:
    with pytest.raises(ValueError, match=re.escape(match)):
        synth.write_task(tmp_path, **{"train": 4, "val": 2, **kwargs})


def test_exhausted_question_space_is_a_clear_error() -> None:
    first = synth.generate(1, seed=0, domains=["units"])[0]["prompt"]
    with pytest.raises(ValueError, match="could not find a new 'units' question after 1 tries"):
        synth.generate(1, seed=0, domains=["units"], exclude=[first], max_tries=1)


def cli(*args: str, hashseed: str = "0") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONHASHSEED": hashseed}
    return subprocess.run(
        [sys.executable, "-m", "moespec.data.synth", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )


def test_cli_writes_the_same_files_as_the_api(tmp_path) -> None:
    proc = cli(
        "--out",
        str(tmp_path / "cli"),
        "--train",
        "30",
        "--val",
        "10",
        "--seed",
        "9",
        hashseed="123",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    out = proc.stdout
    assert (
        "prompt_completion/train.jsonl: 30 examples (arithmetic 8, string 8, units 7, choice 7)"
        in out
    )
    assert "chat/val.jsonl: 10 examples (arithmetic 3, string 3, units 2, choice 2)" in out
    synth.write_task(tmp_path / "api", 30, 10, seed=9)
    assert read_all(tmp_path / "cli") == read_all(tmp_path / "api")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--train", "-3"], "--train: expected a non-negative integer, got '-3'"),
        (["--val", "many"], "--val: expected a non-negative integer, got 'many'"),
        (["--domains", "arithmetic,poetry"], "unknown domain 'poetry'"),
        (["--format", "xml"], "invalid choice: 'xml'"),
    ],
)
def test_cli_rejects_bad_arguments(tmp_path, args, needle) -> None:
    proc = cli("--out", str(tmp_path / "out"), *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()
