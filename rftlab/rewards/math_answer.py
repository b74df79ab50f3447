"""Math answers checked by math-verify: boxed, "Answer:" or last-number extraction, symbolic equality."""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any

from rftlab.rewards.answers import _NUMBER
from rftlab.rewards.checks import MAX_SECONDS, check_finite

_ANSWER_LINE = re.compile(r"(?:final answer|answer)\s*(?:is|:|=)\s*(.+)", re.IGNORECASE)


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced, or None.

    >>> last_boxed(r"so \\boxed{\\frac{1}{2}} and")
    '\\\\frac{1}{2}'
    """
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
    return None


def extract_final_answer(text: str) -> str | None:
    """The completion's final answer: the last ``\\boxed{}``, else the last "Answer: X" line
    ("answer is X", "final answer: X"), else the last number; None when there is none.

    >>> extract_final_answer("2 + 3 = 5. Answer: 5.")
    '5'
    >>> extract_final_answer("First 3, then 12 apples")
    '12'
    """
    boxed = last_boxed(text)
    if boxed:
        return boxed
    lines = _ANSWER_LINE.findall(text)
    if lines:
        answer = lines[-1].strip().rstrip(".").strip().strip("$").strip()
        if answer:
            return answer
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _load_math_verify() -> tuple[Callable, Callable]:
    try:
        from math_verify import parse, verify
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "MathAnswer needs math-verify: pip install 'rftlab[verifiers]' (or pip install math-verify)"
        ) from err
    return parse, verify


def _as_latex(answer: str) -> str:
    # math-verify extracts LaTeX only inside an anchor ($...$ or \boxed{}), so bare "\frac{1}{2}"
    # from a dataset or an extracted answer is boxed before parsing.
    return answer if ("$" in answer or "\\boxed" in answer) else f"\\boxed{{{answer}}}"


class MathAnswer:
    """1.0 when the completion's final answer equals the reference, symbolically, else 0.0.

    Formula: ``r = 1[verify(parse(reference), parse(extract_final_answer(completion)))]`` with
    math-verify's ``parse``/``verify`` (HF Math-Verify), or, with ``tolerance``, for numeric answers
    ``r = 1[|pred - ref| <= tolerance * max(1, |ref|)]``.

    math-verify times out with ``signal.alarm``, which works only in the main thread. There its own
    timeout is used; in any other thread (a reward pool, a dataloader worker) its timeouts are
    passed as None and this class times the call out itself on a helper thread: a timed-out sample
    scores 0.0 and is counted in ``timeouts``.

    Args:
        answer_key: the task column holding the reference answer.
        tolerance: relative numeric tolerance (absolute below 1), finite and >= 0; None: math-verify's
            exact rules.
        timeout: seconds per sample, in (0, ``checks.MAX_SECONDS``].

    >>> MathAnswer()([r"so \\boxed{\\frac{1}{2}}", "Answer: 0.5", "it is 2"], answer=["0.5"] * 3)  # doctest: +SKIP
    [1.0, 1.0, 0.0]
    """

    name = "math_answer"

    def __init__(self, answer_key: str = "answer", tolerance: float | None = None, timeout: float = 5.0) -> None:
        check_finite(type(self).__name__, "tolerance", tolerance, ge=0, allow_none=True)
        check_finite(type(self).__name__, "timeout", timeout, gt=0, le=MAX_SECONDS)
        _load_math_verify()  # a missing dependency is a construction error, not a training error
        self.answer_key = answer_key
        self.tolerance = tolerance
        self.timeout = float(timeout)
        self.timeouts = 0

    def __call__(self, completions: Sequence[str], **columns: Any) -> list[float]:
        if self.answer_key not in columns:
            raise KeyError(f"math_answer needs the column {self.answer_key!r}; got {sorted(columns)}")
        return [self.score(c, a) for c, a in zip(completions, columns[self.answer_key])]

    def score(self, completion: str, answer: Any) -> float:
        """Score one completion against one reference."""
        predicted = extract_final_answer(completion)
        if predicted is None:
            return 0.0
        if threading.current_thread() is threading.main_thread():
            return float(self._compare(str(answer), predicted, math.ceil(self.timeout)))
        box: list[bool] = []
        worker = threading.Thread(target=lambda: box.append(self._compare(str(answer), predicted, None)), daemon=True)
        worker.start()
        worker.join(self.timeout)
        if not box:
            self.timeouts += 1  # the helper thread is abandoned; sympy cannot be interrupted
            return 0.0
        return float(box[0])

    def _compare(self, reference: str, predicted: str, timeout: int | None) -> bool:
        parse, verify = _load_math_verify()
        gold = parse(_as_latex(reference), parsing_timeout=timeout)
        pred = parse(_as_latex(predicted), parsing_timeout=timeout)
        if not gold or not pred:
            return False
        if self.tolerance is not None:
            a, b = _number(gold), _number(pred)
            if a is not None and b is not None:
                return abs(a - b) <= self.tolerance * max(1.0, abs(a))
        return bool(verify(gold, pred, timeout_seconds=timeout))


def _number(parsed: list[Any]) -> float | None:
    for value in parsed:
        if getattr(value, "is_number", False):
            try:
                return float(value)
            except (TypeError, ValueError):
                return None
    return None
