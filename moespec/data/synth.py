"""A deterministic instruction task with exact answers, for supervised fine-tuning and evaluation.

Domains (each example's ``answer`` is exact; the completion shows the work and ends in it):

* ``arithmetic``: GSM8K-style word problems of 2-4 steps with small integers, ``#### <number>``;
* ``string``: reverse a word, sort its letters, count a letter, ``#### <answer>``;
* ``units``: unit conversions with integer answers, ``#### <number>``;
* ``choice``: a multiple-choice question (A-D), ending "The answer is X."

``generate(n, seed)`` draws from ``random.Random(seed)`` alone (same seed, same examples), cycling
through the domains so their counts differ by at most one. ``write_task`` writes the TRL forms::

    DIR/prompt_completion/{train,val}.jsonl  {"prompt", "completion", "answer", "domain"}
    DIR/chat/{train,val}.jsonl               {"messages": [user, assistant], "answer", "domain"}
    DIR/task.json                            seed, counts per domain, how to score each domain

The prompt of the prompt-completion form is the user message plus a newline, so ``prompt +
completion`` reads as plain text; the assistant message is the completion itself. The training
split is ``generate(train, seed)``; the validation split comes from its own stream and shares no
prompt with it. ``ANSWER_EXTRACTION`` names the ``moespec.eval.extract`` method that scores a
domain: ``exact_match(generated, example["completion"], method, **kw)``.

Command line: ``python -m moespec.data.synth --out DIR [--train N] [--val N] [--seed S]
[--format prompt_completion|chat|both] [--domains arithmetic,string,...]``.
"""

from __future__ import annotations

import argparse
import json
import random
import string
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "ANSWER_EXTRACTION",
    "DOMAINS",
    "FORMATS",
    "generate",
    "main",
    "to_chat",
    "to_prompt_completion",
    "write_task",
]

DOMAINS = ("arithmetic", "string", "units", "choice")
FORMATS = ("prompt_completion", "chat")
ANSWER_EXTRACTION: dict[str, tuple[str, dict[str, Any]]] = {
    "arithmetic": ("gsm8k", {}),
    "string": ("regex", {"pattern": r"####\s*(\S+)"}),
    "units": ("gsm8k", {}),
    "choice": ("choice", {"letters": "ABCD"}),
}

_NAMES = (
    ("Weng", "she"), ("Ali", "he"), ("Maria", "she"), ("James", "he"), ("Priya", "she"),
    ("Tom", "he"), ("Lena", "she"), ("Omar", "he"), ("Sofia", "she"), ("Ken", "he"),
    ("Ana", "she"), ("Raj", "he"), ("Mia", "she"), ("Leo", "he"), ("Zoe", "she"),
    ("Sam", "he"), ("Nora", "she"), ("Ivan", "he"), ("Emma", "she"), ("Yuki", "she"),
)  # fmt: skip
_WORDS = (
    "apple", "banana", "planet", "river", "garden", "window", "pencil", "orange", "silver",
    "market", "castle", "forest", "bridge", "candle", "dragon", "engine", "family", "guitar",
    "harbor", "island", "jacket", "kitten", "ladder", "mirror", "number", "object", "pepper",
    "rabbit", "saddle", "ticket", "velvet", "wallet", "yellow", "zipper", "butter", "cactus",
    "dinner", "feather", "giraffe", "hammer", "jungle", "lemon", "magnet", "needle", "parrot",
    "puzzle", "rocket", "salmon", "tomato", "violin", "winter", "anchor", "basket", "cotton",
    "desert", "falcon", "glove", "honey", "igloo", "jelly", "kettle", "lizard", "meadow",
    "noodle", "oyster", "pillow", "quartz", "ribbon", "spider", "turtle", "umbrella", "valley",
    "walnut", "yogurt", "zebra", "bottle", "cherry", "donkey", "eagle", "fabric", "ginger",
    "helmet", "insect", "jigsaw", "koala", "lantern", "mango", "nickel", "olive", "peanut",
    "quiver", "radish", "sunset", "thunder", "unicorn", "vessel", "wizard", "mississippi",
    "balloon", "coffee", "letter", "grammar", "pepperoni", "committee", "bookkeeper", "success",
)  # fmt: skip
_ITEMS = (
    ("notebooks", "pens"), ("apples", "pears"), ("books", "magazines"), ("shirts", "socks"),
    ("cupcakes", "cookies"), ("tickets", "posters"), ("plates", "cups"), ("candles", "cards"),
)  # fmt: skip
_THINGS = ("marbles", "stickers", "stamps", "shells", "coins", "beads")
_BAKED = ("cookies", "muffins", "rolls", "brownies")


def _units(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _cap(word: str) -> str:
    return word[:1].upper() + word[1:]


def _example(domain: str, question: str, steps: Sequence[str], answer: Any) -> dict[str, Any]:
    answer = str(answer)
    tail = f"The answer is {answer}." if domain == "choice" else f"#### {answer}"
    completion = "\n".join([*steps, tail])
    return {"prompt": question, "completion": completion, "answer": answer, "domain": domain}


# --- arithmetic: GSM8K-style word problems ---------------------------------------------------


def _wage(rng: random.Random) -> dict[str, Any]:
    (name, she), rate = rng.choice(_NAMES), rng.randint(8, 25)
    a, b = rng.randint(2, 8), rng.randint(2, 8)
    hours, pay = a + b, (a + b) * rate
    return _example(
        "arithmetic",
        f"{name} earns ${rate} an hour. {_cap(she)} worked {a} hours on Monday and {b} hours on "
        f"Tuesday. How much did {she} earn in total?",
        [
            f"{name} worked {a} + {b} = {hours} hours.",
            f"{_cap(she)} earned {hours} * {rate} = ${pay}.",
        ],
        pay,
    )


def _change(rng: random.Random) -> dict[str, Any]:
    (name, she), (first, second) = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, p, b, q = rng.randint(2, 6), rng.randint(2, 9), rng.randint(2, 6), rng.randint(1, 5)
    x, y = a * p, b * q
    total = x + y
    bill = next(v for v in (20, 50, 100) if v > total)
    return _example(
        "arithmetic",
        f"{name} buys {a} {first} at ${p} each and {b} {second} at ${q} each. {_cap(she)} pays "
        f"with a ${bill} bill. How much change does {she} get?",
        [
            f"The {first} cost {a} * {p} = ${x}.",
            f"The {second} cost {b} * {q} = ${y}.",
            f"Together they cost {x} + {y} = ${total}.",
            f"The change is {bill} - {total} = ${bill - total}.",
        ],
        bill - total,
    )


def _collection(rng: random.Random) -> dict[str, Any]:
    (name, she), thing = rng.choice(_NAMES), rng.choice(_THINGS)
    a = rng.randint(12, 60)
    b, c, d = rng.randint(2, a - 2), rng.randint(2, 5), rng.randint(3, 12)
    left, bought = a - b, c * d
    return _example(
        "arithmetic",
        f"{name} has {a} {thing}. {_cap(she)} gives {b} to a friend and then buys {c} bags with "
        f"{d} {thing} each. How many {thing} does {she} have now?",
        [
            f"After giving some away, {name} has {a} - {b} = {left} {thing}.",
            f"The bags hold {c} * {d} = {bought} {thing}.",
            f"Now {she} has {left} + {bought} = {left + bought} {thing}.",
        ],
        left + bought,
    )


def _boxes(rng: random.Random) -> dict[str, Any]:
    baked = rng.choice(_BAKED)
    trays, per = rng.randint(2, 6), rng.randint(6, 12)
    total = trays * per
    boxes = rng.randint(2, 6)
    each = rng.randint(1, (total - 1) // boxes)
    sold = total - boxes * each
    return _example(
        "arithmetic",
        f"A baker makes {trays} trays of {per} {baked}. She sells {sold} {baked} and packs the "
        f"rest equally into {boxes} boxes. How many {baked} go in each box?",
        [
            f"The baker makes {trays} * {per} = {total} {baked}.",
            f"After selling, {total} - {sold} = {total - sold} are left.",
            f"Each box gets {total - sold} / {boxes} = {each} {baked}.",
        ],
        each,
    )


def _trip(rng: random.Random) -> dict[str, Any]:
    v1, h1, v2, h2 = (
        rng.randint(3, 12) * 10,
        rng.randint(2, 6),
        rng.randint(3, 12) * 10,
        rng.randint(2, 6),
    )
    x, y = v1 * h1, v2 * h2
    return _example(
        "arithmetic",
        f"A train travels at {v1} km per hour for {h1} hours, then at {v2} km per hour for {h2} "
        "hours. How many kilometers does it travel in total?",
        [
            f"First it travels {v1} * {h1} = {x} km.",
            f"Then it travels {v2} * {h2} = {y} km.",
            f"In total it travels {x} + {y} = {x + y} km.",
        ],
        x + y,
    )


def _ages(rng: random.Random) -> dict[str, Any]:
    (name, _), (other, _) = rng.sample(_NAMES, 2)
    age, times, years = rng.randint(3, 12), rng.randint(2, 4), rng.randint(2, 15)
    now = age * times
    return _example(
        "arithmetic",
        f"{name} is {age} years old. {other} is {times} times as old as {name}. How old will "
        f"{other} be in {years} years?",
        [
            f"{other} is {age} * {times} = {now} years old.",
            f"In {years} years, {other} will be {now} + {years} = {now + years}.",
        ],
        now + years,
    )


def _savings(rng: random.Random) -> dict[str, Any]:
    (name, she) = rng.choice(_NAMES)
    per, weeks = rng.randint(3, 20), rng.randint(3, 10)
    saved = per * weeks
    spent = rng.randint(1, saved - 1)
    return _example(
        "arithmetic",
        f"{name} saves ${per} each week. After {weeks} weeks, {she} spends ${spent} on a game. "
        f"How much money does {she} have left?",
        [
            f"{name} saves {per} * {weeks} = ${saved}.",
            f"After the game, {she} has {saved} - {spent} = ${saved - spent}.",
        ],
        saved - spent,
    )


_ARITHMETIC = (_wage, _change, _collection, _boxes, _trip, _ages, _savings)


# --- string: reverse, sort, count -----------------------------------------------------------


def _word(rng: random.Random) -> tuple[str, str]:
    """A dictionary word or, half the time, a random lowercase string."""
    if rng.random() < 0.5:
        return "word", rng.choice(_WORDS)
    return "string", "".join(rng.choices(string.ascii_lowercase, k=rng.randint(4, 8)))


def _reverse(rng: random.Random) -> dict[str, Any]:
    kind, w = _word(rng)
    prompt = rng.choice(
        (f'Reverse the {kind} "{w}".', f'Write the letters of the {kind} "{w}" in reverse order.')
    )
    return _example(
        "string",
        prompt,
        [f'The letters of "{w}" are {"-".join(w)}.', f"In reverse order: {'-'.join(reversed(w))}."],
        w[::-1],
    )


def _sort(rng: random.Random) -> dict[str, Any]:
    kind, w = _word(rng)
    ordered = "".join(sorted(w))
    return _example(
        "string",
        f'Sort the letters of the {kind} "{w}" in alphabetical order.',
        [
            f'The letters of "{w}" are {", ".join(w)}.',
            f"In alphabetical order: {', '.join(ordered)}.",
        ],
        ordered,
    )


def _count(rng: random.Random) -> dict[str, Any]:
    kind, w = _word(rng)
    absent = sorted(set(string.ascii_lowercase) - set(w))
    letter = rng.choice(absent) if rng.random() < 0.15 else rng.choice(w)
    where = [i + 1 for i, c in enumerate(w) if c == letter]
    n = len(where)
    if n:
        found = f"position{'s' * (n > 1)} {', '.join(map(str, where))}, so {n} time{'s' * (n > 1)}"
        found = f'The letter "{letter}" is at {found}.'
    else:
        found = f'The letter "{letter}" does not appear, so 0 times.'
    return _example(
        "string",
        f'How many times does the letter "{letter}" appear in the {kind} "{w}"?',
        [f'The letters of "{w}" are {"-".join(w)}.', found],
        n,
    )


_STRING = (_reverse, _sort, _count)


# --- units: conversions with integer answers ------------------------------------------------

# (large unit, its singular, small unit, small units per large unit)
_UNITS = (
    ("kilometers", "kilometer", "meters", 1000),
    ("meters", "meter", "centimeters", 100),
    ("centimeters", "centimeter", "millimeters", 10),
    ("kilograms", "kilogram", "grams", 1000),
    ("liters", "liter", "milliliters", 1000),
    ("hours", "hour", "minutes", 60),
    ("minutes", "minute", "seconds", 60),
    ("days", "day", "hours", 24),
    ("weeks", "week", "days", 7),
    ("yards", "yard", "feet", 3),
    ("feet", "foot", "inches", 12),
    ("dozen", "dozen", "eggs", 12),
)


def _convert(rng: random.Random) -> dict[str, Any]:
    big, one, small, factor = rng.choice(_UNITS)
    n = rng.randint(2, 60)
    if rng.random() < 0.5:
        src, dst, value, answer = big, small, n, n * factor
        work = f"{value} {src} = {value} * {factor} = {answer} {dst}."
    else:
        src, dst, value, answer = small, big, n * factor, n
        work = f"{value} {src} = {value} / {factor} = {answer} {dst}."
    prompt = rng.choice(
        (f"Convert {value} {src} to {dst}.", f"How many {dst} are in {value} {src}?")
    )
    return _example("units", prompt, [f"1 {one} is {factor} {small}.", work], answer)


def _mixed(rng: random.Random) -> dict[str, Any]:
    big, one, small, factor = rng.choice(_UNITS)
    n, extra = rng.randint(1, 12), rng.randint(2, factor - 1)
    whole, amount = n * factor, _units(n, one, big)
    return _example(
        "units",
        f"How many {small} are in {amount} and {extra} {small}?",
        [
            f"1 {one} is {factor} {small}, so {amount} = {n} * {factor} = {whole} {small}.",
            f"Adding {extra} gives {whole} + {extra} = {whole + extra} {small}.",
        ],
        whole + extra,
    )


_CONVERSIONS = (_convert, _convert, _mixed)


# --- choice: multiple choice A-D ------------------------------------------------------------

_LETTERS = "ABCD"


def _options(rng: random.Random, right: Any, wrong: Iterable[Any]) -> tuple[list[Any], str]:
    """Four distinct options (``right`` among three of ``wrong``) shuffled; and the right letter."""
    pool = list(dict.fromkeys(w for w in wrong if w != right))
    options = [right, *rng.sample(pool, 3)]
    rng.shuffle(options)
    return options, _LETTERS[options.index(right)]


def _mc(question: str, options: Sequence[Any], letter: str, reason: str) -> dict[str, Any]:
    lines = "\n".join(f"{c}. {o}" for c, o in zip(_LETTERS, options))
    return _example("choice", f"{question}\n{lines}", [reason], letter)


def _mc_sum(rng: random.Random) -> dict[str, Any]:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        right = a * b
    else:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        a, b = max(a, b), min(a, b)
        right = a + b if op == "+" else a - b
    wrong = [right + d for d in (-10, -2, -1, 1, 2, 10) if right + d >= 0]
    options, letter = _options(rng, right, wrong)
    return _mc(
        f"What is {a} {op} {b}?", options, letter, f"{a} {op} {b} = {right}, option {letter}."
    )


def _mc_largest(rng: random.Random) -> dict[str, Any]:
    numbers = rng.sample(range(1, 1000), 4)
    right = max(numbers)
    options, letter = _options(rng, right, [n for n in numbers if n != right])
    return _mc(
        "Which number is the largest?", options, letter, f"The largest is {right}, option {letter}."
    )


def _mc_first(rng: random.Random) -> dict[str, Any]:
    words = rng.sample(_WORDS, 4)
    right = min(words)
    options, letter = _options(rng, right, [w for w in words if w != right])
    return _mc(
        "Which word comes first in alphabetical order?",
        options,
        letter,
        f'"{right}" comes first, option {letter}.',
    )


def _mc_longest(rng: random.Random) -> dict[str, Any]:
    meters = [m * 100 for m in rng.sample(range(1, 60), 4)]
    # Each length in meters or, half the time, in kilometers ("1.5 km").
    shown = {f"{m} m" if rng.random() < 0.5 else f"{m / 1000:g} km": m for m in meters}
    right = max(shown, key=shown.__getitem__)
    options, letter = _options(rng, right, list(shown))
    in_meters = ", ".join(f"{shown[o]} m" for o in options)
    return _mc(
        "Which distance is the longest?",
        options,
        letter,
        f"In meters the options are {in_meters}; the longest is {right}, option {letter}.",
    )


_CHOICE = (_mc_sum, _mc_largest, _mc_first, _mc_longest)

_GENERATORS: dict[str, tuple[Callable[[random.Random], dict[str, Any]], ...]] = {
    "arithmetic": _ARITHMETIC,
    "string": _STRING,
    "units": _CONVERSIONS,
    "choice": _CHOICE,
}


# --- API ------------------------------------------------------------------------------------


def _domains(domains: Iterable[str] | str | None) -> tuple[str, ...]:
    if domains is None:
        return DOMAINS
    if isinstance(domains, str):
        domains = [d.strip() for d in domains.split(",") if d.strip()]
    chosen = tuple(dict.fromkeys(domains))
    unknown = [d for d in chosen if d not in DOMAINS]
    if unknown:
        raise ValueError(f"unknown domain {unknown[0]!r}; valid: {', '.join(DOMAINS)}")
    if not chosen:
        raise ValueError(f"no domains given; valid: {', '.join(DOMAINS)}")
    return chosen


def _count_arg(name: str, n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {n!r}")
    return n


def generate(
    n: int,
    seed: int | str = 0,
    domains: Iterable[str] | str | None = None,
    *,
    exclude: Iterable[str] = (),
    max_tries: int = 1000,
) -> list[dict[str, Any]]:
    """``n`` examples ``{"prompt", "completion", "answer", "domain"}`` from ``Random(seed)``.

    Example ``i`` is of domain ``domains[i % len(domains)]``; prompts are unique and none is in
    ``exclude``. A ``ValueError`` when ``max_tries`` draws in a row give only known prompts.
    """
    n, chosen = _count_arg("n", n), _domains(domains)
    rng = random.Random(seed)
    seen = set(exclude)
    examples: list[dict[str, Any]] = []
    for i in range(n):
        domain = chosen[i % len(chosen)]
        for _ in range(max_tries):
            example = rng.choice(_GENERATORS[domain])(rng)
            if example["prompt"] not in seen:
                break
        else:
            raise ValueError(
                f"could not find a new {domain!r} question after {max_tries} tries "
                f"({len(examples)} of {n} made); ask for fewer examples"
            )
        seen.add(example["prompt"])
        examples.append(example)
    return examples


def to_prompt_completion(example: dict[str, Any]) -> dict[str, Any]:
    """TRL's prompt-completion form; the prompt ends in a newline so the two join as text."""
    return {
        "prompt": example["prompt"] + "\n",
        "completion": example["completion"],
        "answer": example["answer"],
        "domain": example["domain"],
    }


def to_chat(example: dict[str, Any]) -> dict[str, Any]:
    """TRL's conversational form: a user and an assistant message."""
    return {
        "messages": [
            {"role": "user", "content": example["prompt"]},
            {"role": "assistant", "content": example["completion"]},
        ],
        "answer": example["answer"],
        "domain": example["domain"],
    }


_CONVERTERS = {"prompt_completion": to_prompt_completion, "chat": to_chat}


def _formats(formats: Iterable[str] | str) -> tuple[str, ...]:
    if isinstance(formats, str):
        formats = FORMATS if formats == "both" else (formats,)
    chosen = tuple(dict.fromkeys(formats))
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown or not chosen:
        name = unknown[0] if unknown else ""
        raise ValueError(f"unknown format {name!r}; valid: {', '.join(FORMATS)}, both")
    return chosen


def _jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_task(
    out_dir: str | Path,
    train: int = 1000,
    val: int = 200,
    seed: int = 0,
    domains: Iterable[str] | str | None = None,
    formats: Iterable[str] | str = "both",
) -> dict[str, Path]:
    """Write the splits in each format under ``out_dir``; returns ``{"chat/train": path, ...}``.

    The paths also include ``"task"``: ``task.json`` with the seed, counts and scoring methods.
    """
    train, val = _count_arg("train", train), _count_arg("val", val)
    chosen, forms = _domains(domains), _formats(formats)
    splits = {"train": generate(train, seed, chosen)}
    exclude = [e["prompt"] for e in splits["train"]]
    splits["val"] = generate(val, f"{seed}:val", chosen, exclude=exclude)
    out = Path(out_dir)
    paths: dict[str, Path] = {}
    for form in forms:
        for split, examples in splits.items():
            path = out / form / f"{split}.jsonl"
            _jsonl(path, map(_CONVERTERS[form], examples))
            paths[f"{form}/{split}"] = path
    meta = {
        "seed": seed,
        "domains": list(chosen),
        "formats": list(forms),
        "counts": {s: dict(Counter(e["domain"] for e in ex)) for s, ex in splits.items()},
        "scoring": {
            d: {"method": m, **kw} for d, (m, kw) in ANSWER_EXTRACTION.items() if d in chosen
        },
    }
    paths["task"] = out / "task.json"
    paths["task"].write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return paths


# --- command line ---------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(
        prog="python -m moespec.data.synth",
        description="Write the synthetic instruction task (train/val JSONL in TRL's forms).",
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--train", type=_non_negative, default=1000, help="training examples")
    parser.add_argument("--val", type=_non_negative, default=200, help="validation examples")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--format", default="both", choices=[*FORMATS, "both"])
    parser.add_argument(
        "--domains", default=",".join(DOMAINS), help=f"comma-separated ({', '.join(DOMAINS)})"
    )
    args = parser.parse_args(argv)
    try:
        paths = write_task(args.out, args.train, args.val, args.seed, args.domains, args.format)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    for key, path in paths.items():
        if key == "task":
            print(f"wrote {path}")
            continue
        with path.open(encoding="utf-8") as f:
            counts = Counter(json.loads(line)["domain"] for line in f)
        detail = ", ".join(f"{d} {counts[d]}" for d in _domains(args.domains) if counts[d])
        print(f"wrote {path}: {sum(counts.values())} examples ({detail or 'none'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
