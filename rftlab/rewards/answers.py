"""Answer-checking rewards: numeric answers and regex format checks.

Each is a small picklable class (so it can run in worker processes) called as
``reward(completions, answer=[...], **_) -> list[float]``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from rftlab.rewards.checks import check_finite

# An optional sign, digits with optional thousands separators, an optional decimal part.
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
EXTRACT_MODES = ("last", "first")


def parse_number(text: str) -> float | None:
    """``"1,234.5"`` -> 1234.5; None when ``text`` is not a number."""
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def extract_number(text: str, mode: str = "last") -> float | None:
    """The last (or first) number written in ``text``, or None.

    "last" is the default because small chat models restate the question first ("15 + 43 = 58"):
    the first number is then an operand, never the answer.

    >>> extract_number("15 + 43 = 58.")
    58.0
    >>> extract_number("no digits") is None
    True
    """
    if mode not in EXTRACT_MODES:
        raise ValueError(f"extract={mode!r}; valid: {', '.join(EXTRACT_MODES)}")
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    return parse_number(matches[-1] if mode == "last" else matches[0])


class NumericAnswer:
    """1.0 when the extracted number equals the reference answer within ``tolerance``, else 0.0.

    Formula: ``r = 1[|extract(completion) - answer| <= tolerance * max(1, |answer|)]``.

    Args:
        extract: which number of the completion is the answer: "last" or "first".
        tolerance: relative tolerance (absolute below 1), finite and >= 0.
        answer_key: the task column holding the reference answer.

    >>> NumericAnswer()(["so it is 58"], answer=["58"])
    [1.0]
    """

    name = "numeric_answer"

    def __init__(self, extract: str = "last", tolerance: float = 1e-6, answer_key: str = "answer") -> None:
        if extract not in EXTRACT_MODES:
            raise ValueError(f"extract={extract!r}; valid: {', '.join(EXTRACT_MODES)}")
        check_finite(type(self).__name__, "tolerance", tolerance, ge=0)
        self.extract = extract
        self.tolerance = tolerance
        self.answer_key = answer_key

    def __call__(self, completions: Sequence[str], **columns: Any) -> list[float]:
        if self.answer_key not in columns:
            raise KeyError(f"numeric_answer needs the column {self.answer_key!r}; got {sorted(columns)}")
        return [self.score(c, a) for c, a in zip(completions, columns[self.answer_key])]

    def score(self, completion: str, answer: Any) -> float:
        """Score one completion against one reference answer."""
        reference = parse_number(str(answer))
        if reference is None:
            raise ValueError(f"reference answer {answer!r} is not a number")
        got = extract_number(completion, self.extract)
        if got is None:
            return 0.0
        return float(math.isclose(got, reference, rel_tol=self.tolerance, abs_tol=self.tolerance))


class RegexFormat:
    """1.0 when the completion matches ``pattern`` (``re.search``, or the whole text), else 0.0.

    Args:
        pattern: a regular expression.
        full_match: require the whole (stripped) completion to match.
        name: the metric name, ``reward/<name>/mean``.

    >>> RegexFormat(r"^-?\\d+$", full_match=True)(["42", "it is 42"])
    [1.0, 0.0]
    """

    def __init__(self, pattern: str, full_match: bool = False, name: str = "format") -> None:
        try:
            self.regex = re.compile(pattern, re.DOTALL)
        except re.error as err:
            raise ValueError(f"pattern={pattern!r} is not a valid regular expression: {err}") from err
        self.pattern = pattern
        self.full_match = full_match
        self.name = name

    def __call__(self, completions: Sequence[str], **_: Any) -> list[float]:
        match = self.regex.fullmatch if self.full_match else self.regex.search
        return [float(match(c.strip()) is not None) for c in completions]
