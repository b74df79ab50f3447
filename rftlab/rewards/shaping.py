"""Shaping rewards on completion text: length penalty, DAPO's soft overlong penalty, repetition penalty.

Each is added to the task reward through ``RewardSet`` weights. Lengths are measured in
characters, whitespace-separated words, or tokens of a tokenizer you pass (any object with
``encode(text) -> list``, such as a Hugging Face tokenizer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rftlab.rewards.checks import check_finite

UNITS = ("chars", "words", "tokens")


class _Length:
    def __init__(self, unit: str, tokenizer: Any) -> None:
        if unit not in UNITS:
            raise ValueError(f"unit={unit!r}; valid: {', '.join(UNITS)}")
        if unit == "tokens" and not hasattr(tokenizer, "encode"):
            raise ValueError("unit='tokens' needs tokenizer= (an object with encode(text) -> list of ids)")
        self.unit = unit
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> int:
        if self.unit == "chars":
            return len(text)
        if self.unit == "words":
            return len(text.split())
        return len(self.tokenizer.encode(text, add_special_tokens=False)) if _takes_special(self.tokenizer) \
            else len(self.tokenizer.encode(text))


def _takes_special(tokenizer: Any) -> bool:
    return hasattr(tokenizer, "all_special_ids")  # a Hugging Face tokenizer


class LengthPenalty:
    """A linear penalty for length beyond ``max_length``.

    Formula: ``r = -coef * max(0, L - max_length) / max_length`` with ``L`` the completion length.

    Args:
        max_length: the length allowed without penalty (an integer >= 1).
        coef: the penalty per ``max_length`` of excess (finite, >= 0).
        unit: "chars", "words" or "tokens".
        tokenizer: for unit="tokens".
        name: the metric name.

    >>> LengthPenalty(max_length=4, unit="chars")(["abc", "abcdef"])
    [0.0, -0.5]
    """

    def __init__(self, max_length: int, coef: float = 1.0, unit: str = "words", tokenizer: Any = None,
                 name: str = "length_penalty") -> None:
        check_finite(type(self).__name__, "max_length", max_length, integer=True, ge=1)
        check_finite(type(self).__name__, "coef", coef, ge=0)
        self.length = _Length(unit, tokenizer)
        self.max_length, self.coef, self.name = max_length, float(coef), name

    def __call__(self, completions: Sequence[str], **_: Any) -> list[float]:
        return [0.0 - self.coef * max(0, self.length(c) - self.max_length) / self.max_length for c in completions]


def soft_overlong(length: int, max_len: int, cache_len: int) -> float:
    """DAPO's soft overlong punishment for one length (arXiv 2503.14476, Sec. 3.4, Eq. 13).

    ``0`` if ``L <= max_len - cache_len``; ``((max_len - cache_len) - L) / cache_len`` if
    ``L <= max_len``; ``-1`` beyond. The tensor form is ``rftlab.core.overlong_penalty`` (applied
    by algorithms on token counts); this text form lets any task add it as a reward, since
    ``rewards`` may not import ``core``. A test checks the two agree.
    """
    soft = max_len - cache_len
    if length <= soft:
        return 0.0
    if length <= max_len:
        return (soft - length) / cache_len
    return -1.0


class SoftOverlong:
    """DAPO's soft overlong penalty as a reward (see ``soft_overlong``).

    Args:
        max_len: L_max, the hard length budget (an integer >= 2).
        cache_len: L_cache, the width of the linear zone (an integer, 0 < cache_len < max_len).
        unit: "chars", "words" or "tokens" (DAPO counts tokens: pass the policy's tokenizer).
        tokenizer: for unit="tokens".
        name: the metric name.

    >>> SoftOverlong(max_len=10, cache_len=4, unit="chars")(["a" * 6, "a" * 8, "a" * 11])
    [0.0, -0.5, -1.0]
    """

    def __init__(self, max_len: int, cache_len: int, unit: str = "tokens", tokenizer: Any = None,
                 name: str = "overlong") -> None:
        owner = type(self).__name__
        check_finite(owner, "max_len", max_len, integer=True, ge=2)
        check_finite(owner, "cache_len", cache_len, integer=True, ge=1, le=max_len - 1)
        self.length = _Length(unit, tokenizer)
        self.max_len, self.cache_len, self.name = max_len, cache_len, name

    def __call__(self, completions: Sequence[str], **_: Any) -> list[float]:
        return [soft_overlong(self.length(c), self.max_len, self.cache_len) for c in completions]


class RepetitionPenalty:
    """Penalises repeated word n-grams (Open-R1 ``get_repetition_penalty_reward``, after
    Yeo et al. 2025, "Demystifying Long Chain-of-Thought Reasoning in LLMs", Sec. 4).

    Formula, with the completion's word n-grams ``G`` (as a list) and ``max_penalty <= 0``::

        r = (1 - |set(G)| / |G|) * max_penalty       (0 when the text has fewer than n words)

    Args:
        ngram_size: n (an integer >= 1).
        max_penalty: the penalty of a fully repeated text (finite, <= 0).
        name: the metric name.

    >>> RepetitionPenalty(ngram_size=2, max_penalty=-1.0)(["a b a b a", "a b c d"])
    [-0.5, 0.0]
    """

    def __init__(self, ngram_size: int = 3, max_penalty: float = -1.0, name: str = "repetition_penalty") -> None:
        check_finite(type(self).__name__, "ngram_size", ngram_size, integer=True, ge=1)
        check_finite(type(self).__name__, "max_penalty", max_penalty, le=0)
        self.ngram_size, self.max_penalty, self.name = ngram_size, float(max_penalty), name

    def __call__(self, completions: Sequence[str], **_: Any) -> list[float]:
        return [self.score(c) for c in completions]

    def score(self, text: str) -> float:
        words = text.lower().split()
        if len(words) < self.ngram_size:
            return 0.0
        grams = [tuple(words[i : i + self.ngram_size]) for i in range(len(words) - self.ngram_size + 1)]
        return 0.0 + (1 - len(set(grams)) / len(grams)) * self.max_penalty  # 0.0 +: no -0.0
