"""Tests of answer extraction and exact match (moespec.eval.extract)."""

from __future__ import annotations

import re

import pytest

from moespec.eval.extract import (
    METHODS,
    exact_match,
    extract,
    extract_choice,
    extract_gsm8k,
    extract_last_number,
    extract_regex,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72"),
        ("So the total is 1,234 dollars.", "1234"),
        ("It costs $5.", "5"),
        ("The price went up by 25%.", "25"),
        ("She has 7.0 liters left.", "7"),
        ("That is 12.50 in total", "12.5"),
        ("7.00", "7"),
        ("The answer is $1,234,567.00.", "1234567"),
        ("The temperature is -3 degrees.", "-3"),
        ("x = -$4", "-4"),
        ("change: +8", "8"),
        ("half is .5", "0.5"),
        ("0", "0"),
        ("-0.0", "0"),
        ("10-5", "5"),  # a minus between numbers is not a sign
        ("between 3 and 4, probably 4.", "4"),
        ("1,2345", "2345"),  # not a thousands separator
        ("- 5 apples", "5"),  # a list dash is not a sign
        ("007", "7"),
        ("no numbers here", None),
        ("", None),
    ],
)
def test_last_number(text: str, expected: str | None) -> None:
    assert extract_last_number(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("48 / 2 = 24\n#### 72", "72"),
        ("#### 1,234", "1234"),
        ("####1234", "1234"),
        ("#### $5", "5"),
        ("#### 7.0", "7"),
        ("#### -12", "-12"),
        ("#### +3", "3"),
        ("The answer is 18.\n#### 18\n\nQuestion: next #### 99", "18"),  # the first marker
        ("The answer is 18.", None),  # no marker: no fallback to the last number
        ("#### eighteen", None),
        ("####\n", None),
    ],
)
def test_gsm8k(text: str, expected: str | None) -> None:
    assert extract_gsm8k(text) == expected


def test_gsm8k_fallback_is_opt_in() -> None:
    assert extract_gsm8k("so 3 + 4 = 7 apples") is None
    assert extract_gsm8k("so 3 + 4 = 7 apples", fallback_last_number=True) == "7"
    assert extract_gsm8k("#### 5 then 9", fallback_last_number=True) == "5"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("I think the answer is B.", "B"),
        ("The answer is C", "C"),
        ("the answer is (D).", "D"),
        ("Answer: A", "A"),
        ("ANSWER: b is wrong, so Answer: C", "C"),
        ("The correct answer is: D", "D"),
        ("The answer is option B.", "B"),
        ("My final answer is **C**.", "C"),
        ("The best choice is A.", "A"),
        ("Option B is right.", "B"),
        ("(A) is tempting but the answer is D.", "D"),
        ("The answer is A, though at first I picked C. Final answer: (B)", "B"),  # last wins
        ("A and C are wrong; the correct one is (B).", "B"),
        ("B", "B"),
        ("B.", "B"),
        ("(B)", "B"),
        (" c \n", "C"),  # a letter alone may be lowercase
        ("B. Paris", "B"),
        ("(C) Rome is the capital", "C"),
        ("D) 42", "D"),
        ("A\nBecause the cat is red.", "A"),
        # No answer: a stray capital ("I", "A" as a word) never counts.
        ("I think so.", None),
        ("I am not sure.", None),
        ("A cat is red.", None),
        ("the answer is a guess", None),
        ("Paris", None),
        ("", None),
    ],
)
def test_choice(text: str, expected: str | None) -> None:
    assert extract_choice(text) == expected


def test_choice_respects_letters() -> None:
    assert extract_choice("The answer is E.", letters="ABCD") is None
    assert extract_choice("The answer is E.", letters="ABCDE") == "E"
    assert extract_choice("Answer: I", letters="ABCD") is None
    for bad in ("", "abc", "AB1"):
        with pytest.raises(ValueError, match="letters must be"):
            extract_choice("B", letters=bad)


def test_regex_first_group_and_errors() -> None:
    assert extract_regex("answer: yes. answer: no", r"answer: (\w+)") == "yes"
    assert extract_regex("#### olleh", re.compile(r"####\s*(\S+)")) == "olleh"
    assert extract_regex("nothing", r"answer: (\w+)") is None
    assert extract_regex("b", r"(a)?b") is None  # the group did not take part
    with pytest.raises(ValueError, match="has no capture group"):
        extract_regex("answer: yes", r"answer: \w+")
    with pytest.raises(ValueError, match="has no capture group"):
        extract_regex("answer: yes", re.compile(r"answer: (?:\w+)"))
    with pytest.raises(ValueError, match="invalid regex"):
        extract_regex("x", r"(unclosed")


def test_extract_dispatches_and_names_the_methods() -> None:
    assert set(METHODS) == {"regex", "last_number", "gsm8k", "choice"}
    assert extract("#### 1,000", "gsm8k") == "1000"
    assert extract("2 then 3", "last_number") == "3"
    assert extract("so the answer is C", "choice", letters="ABC") == "C"
    assert extract("x=9", "regex", pattern=r"x=(\d)") == "9"
    with pytest.raises(ValueError, match="unknown extraction method 'bleu'; valid: regex, "):
        extract("x", "bleu")


REFERENCE = "Natalia sold 48 + 24 = 72 clips.\n#### 72"


@pytest.mark.parametrize(
    ("prediction", "method", "kw", "expected"),
    [
        ("She sold 72.\n#### 72", "gsm8k", {}, True),
        ("#### 72.00", "gsm8k", {}, True),
        ("#### $72", "gsm8k", {}, True),
        ("#### 71", "gsm8k", {}, False),
        ("She sold 72 clips.", "gsm8k", {}, False),  # no #### answer: counted wrong
        ("She sold 72 clips.", "gsm8k", {"fallback_last_number": True}, True),
        ("", "gsm8k", {}, False),
        (None, "gsm8k", {}, False),
        ("in all 72 clips", "last_number", {}, True),
        ("no idea", "last_number", {}, False),
    ],
)
def test_exact_match(prediction, method, kw, expected) -> None:
    assert exact_match(prediction, REFERENCE, method, **kw) is expected


def test_exact_match_choice_regex_and_bad_reference() -> None:
    ref = "17 + 25 = 42, option B.\nThe answer is B."
    assert exact_match("I think the answer is B.", ref, "choice")
    assert exact_match("B", ref, "choice")
    assert not exact_match("I think so", ref, "choice")
    assert not exact_match("The answer is A.", ref, "choice")
    pattern = r"####\s*(\S+)"
    assert exact_match("reversed: #### olleh ", "#### olleh", "regex", pattern=pattern)
    assert not exact_match("#### hello", "#### olleh", "regex", pattern=pattern)
    with pytest.raises(ValueError, match="no answer found by 'gsm8k' in the reference"):
        exact_match("#### 5", "5", "gsm8k")  # a bare answer is not a GSM8K reference
    with pytest.raises(ValueError, match="no capture group"):
        exact_match("x", "y", "regex", pattern="y")
