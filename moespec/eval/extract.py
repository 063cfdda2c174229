"""Answer extraction for exact-match accuracy: pure functions on generated text.

``extract(text, method, **kw)`` picks one of

* ``regex``: the first capture group of a pattern (``extract_regex``);
* ``last_number``: the last number in the text, normalised (``extract_last_number``);
* ``gsm8k``: the number after ``####``, normalised (``extract_gsm8k``);
* ``choice``: a multiple-choice letter (``extract_choice``);

and ``exact_match(prediction, reference, method, **kw)`` extracts both texts the same way and
compares. Numbers are normalised so that ``$1,234.00``, ``1234`` and ``+1234`` compare equal.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from typing import Any

__all__ = [
    "METHODS",
    "exact_match",
    "extract",
    "extract_choice",
    "extract_gsm8k",
    "extract_last_number",
    "extract_regex",
    "normalize_number",
]

# A number: an optional sign not glued to a preceding word ("5-3" is 5 and 3), an optional "$",
# digits with or without thousands separators ("1,234"; "1,2345" is 1 then 2345), an optional
# fraction (".5" alone too). A trailing "%" is simply not part of the match.
_NUMBER = re.compile(
    r"(?:(?<![\w)\].])(?P<sign>[-+]))?(?:\$\s?)?"
    r"(?:(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?P<frac>\.\d+)?|(?<![\d.])(?P<bare>\.\d+))"
)
_GSM8K = re.compile(r"####\s*(?=[-+$.\d])")


def normalize_number(sign: str, integer: str, fraction: str = "") -> str:
    """Canonical text of a number: no separators or "+", no leading/trailing zeros, "-" kept."""
    integer = integer.replace(",", "").lstrip("0") or "0"
    fraction = fraction.lstrip(".").rstrip("0")
    text = f"{integer}.{fraction}" if fraction else integer
    return f"-{text}" if sign == "-" and text != "0" else text


def _number(match: re.Match[str]) -> str:
    if match.group("bare") is not None:
        return normalize_number(match.group("sign") or "", "0", match.group("bare"))
    return normalize_number(
        match.group("sign") or "", match.group("int"), match.group("frac") or ""
    )


def extract_regex(text: str, pattern: str | re.Pattern[str]) -> str | None:
    """The first capture group of the first match of ``pattern``; ``None`` without a match."""
    if isinstance(pattern, str):
        try:
            pattern = re.compile(pattern)
        except re.error as err:
            raise ValueError(f"invalid regex {pattern!r}: {err}") from None
    if pattern.groups < 1:
        raise ValueError(
            f"regex {pattern.pattern!r} has no capture group: wrap the answer part in "
            "parentheses, e.g. r'answer: (\\S+)'"
        )
    match = pattern.search(text)
    return None if match is None else match.group(1)


def extract_last_number(text: str) -> str | None:
    """The last number in the text, normalised (``"$1,234.00"`` -> ``"1234"``); or ``None``."""
    matches = list(_NUMBER.finditer(text))
    return _number(matches[-1]) if matches else None


def extract_gsm8k(text: str, *, fallback_last_number: bool = False) -> str | None:
    """The number right after the first ``####`` that has one, normalised.

    Without such a number the result is ``None`` (scored wrong), or with
    ``fallback_last_number=True`` the last number anywhere in the text.
    """
    for marker in _GSM8K.finditer(text):
        match = _NUMBER.match(text, marker.end())
        if match is not None:
            return _number(match)
    return extract_last_number(text) if fallback_last_number else None


# "answer is B", "Answer: (C)", "the correct option is D", "my final answer is **A**", "choice B".
_KEYWORD = r"(?i:\b(?:answer|option|choice)\b(?:\s+(?:is|would\s+be|will\s+be|should\s+be))?)"
_PHRASE = re.compile(
    _KEYWORD
    + r"\s*[:=]?\s*(?i:(?:option|choice|letter)\s+)?[(\[]?(?P<letter>[A-Z])[)\]]?(?![\w'’])"
)
_PAREN = re.compile(r"\((?P<letter>[A-Z])\)")
_ALONE = re.compile(r"\s*[(\[]?(?P<letter>[A-Za-z])[)\]]?[.:]?\s*")
# "B. Paris", "B) Paris", "(B) Paris", "B: Paris", "B\nbecause ..." at the very start.
_LEADING = re.compile(r"\s*(?:\((?P<p>[A-Z])\)|(?P<letter>[A-Z])(?:\)|[.:](?=\s)|[ \t]*\n))")


def extract_choice(text: str, letters: str = string.ascii_uppercase) -> str | None:
    """A multiple-choice letter from ``letters``, or ``None``.

    The last "answer is X" / "answer: X" / "option X" / "(X)" phrase wins; without one, the text
    being a letter alone ("B", "b.", "(B)") or starting with a labelled letter ("B. Paris",
    "(B) Paris"). Letters inside phrases must be capitals, so the "I" of "I think" or the "a" of
    "the answer is a guess" never counts. A letter outside ``letters`` gives ``None``.
    """
    allowed = _check_letters(letters)
    text = text.replace("*", "").replace("`", "")
    found = [m for pattern in (_PHRASE, _PAREN) for m in pattern.finditer(text)]
    if found:
        letter = max(found, key=lambda m: m.start("letter")).group("letter")
    elif (alone := _ALONE.fullmatch(text)) is not None:
        letter = alone.group("letter").upper()
    elif (lead := _LEADING.match(text)) is not None:
        letter = lead.group("p") or lead.group("letter")
    else:
        return None
    return letter if letter in allowed else None


def _check_letters(letters: str) -> frozenset[str]:
    if not isinstance(letters, str) or not letters:
        raise ValueError(f"letters must be a non-empty string of capitals A-Z, got {letters!r}")
    bad = sorted(set(letters) - set(string.ascii_uppercase))
    if bad:
        raise ValueError(f"letters must be capitals A-Z, got {''.join(bad)!r} in {letters!r}")
    return frozenset(letters)


METHODS: dict[str, Callable[..., str | None]] = {
    "regex": extract_regex,
    "last_number": extract_last_number,
    "gsm8k": extract_gsm8k,
    "choice": extract_choice,
}


def extract(text: str, method: str, **kw: Any) -> str | None:
    """Extract an answer with the method named ``method`` (see ``METHODS``); keywords go to it."""
    try:
        fn = METHODS[method]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown extraction method {method!r}; valid: {', '.join(METHODS)}"
        ) from None
    return fn(text, **kw)


def exact_match(prediction_text: str | None, reference_text: str, method: str, **kw: Any) -> bool:
    """Whether the answers extracted from both texts (the same way) are equal.

    No answer in the prediction (or no prediction) is ``False``; a reference without an answer is
    a ``ValueError``, since it is a problem of the data, not of the model.
    """
    reference = extract(reference_text, method, **kw)
    if reference is None:
        raise ValueError(f"no answer found by {method!r} in the reference {reference_text!r}")
    if not isinstance(prediction_text, str):
        return False
    prediction = extract(prediction_text, method, **kw)
    return prediction is not None and prediction.strip() == reference.strip()
