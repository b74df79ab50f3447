"""Wordle, as in Predibase's RFT course: propose the next guess from the feedback so far.

Each row is a secret word and 0..max_history earlier guesses with their feedback. The model thinks
in ``<think>`` tags and answers ``<guess>word</guess>``. Rewards: binary (the secret), partial
credit (per-letter feedback of the guess), format (tags and a valid word) and strategy (the guess
is consistent with the feedback so far). The bundled word list (package data) is small and common.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from functools import lru_cache
from importlib import resources
from typing import Any

from rftlab.rewards.base import RewardFn
from rftlab.tasks.arithmetic import _GeneratedRows
from rftlab.tasks.base import Row, Task

GREEN, YELLOW, GRAY = "G", "Y", "X"
_SYMBOL = {GREEN: "✓", YELLOW: "-", GRAY: "x"}
_GUESS = re.compile(r"<guess>\s*(.*?)\s*</guess>", re.DOTALL | re.IGNORECASE)
SYSTEM_PROMPT = (
    "You are playing Wordle. Guess the secret five-letter English word. After each guess you get "
    "feedback per letter: ✓ the letter is in the word at this position, - it is in the word at "
    "another position, x it is not in the word. Think step by step in <think> </think> tags, then "
    "give your next guess as <guess>word</guess>."
)


@lru_cache(maxsize=1)
def load_words() -> tuple[str, ...]:
    """The bundled word list (``rftlab/tasks/data/wordle_words.txt``), lowercase, sorted."""
    text = resources.files("rftlab.tasks").joinpath("data/wordle_words.txt").read_text(encoding="utf-8")
    return tuple(sorted({w.strip().lower() for w in text.splitlines() if w.strip() and not w.startswith("#")}))


def feedback(guess: str, secret: str) -> str:
    """Per-letter feedback, G (right place), Y (elsewhere in the word) or X, with Wordle's rule for
    repeated letters: a letter is marked Y only as many times as it is unmatched in the secret.

    >>> feedback("speed", "abide")
    'XXYXY'
    >>> feedback("crane", "crane")
    'GGGGG'
    """
    guess, secret = guess.lower(), secret.lower()
    marks = [GRAY] * 5
    unmatched = Counter(s for g, s in zip(guess, secret) if g != s)
    for i, (g, s) in enumerate(zip(guess, secret)):
        if g == s:
            marks[i] = GREEN
        elif unmatched[g] > 0:
            marks[i] = YELLOW
            unmatched[g] -= 1
    return "".join(marks)


def render_feedback(guess: str, marks: str) -> str:
    """``CRANE -> C(x) R(-) A(✓) N(x) E(x)``."""
    return f"{guess.upper()} -> " + " ".join(f"{c.upper()}({_SYMBOL[m]})" for c, m in zip(guess, marks))


def extract_guess(text: str) -> str | None:
    """The content of the last ``<guess>`` tag, lowercased, or None."""
    found = _GUESS.findall(text)
    return found[-1].strip().lower() if found else None


def _history(columns: Mapping[str, Any], n: int) -> list[list[tuple[str, str]]]:
    return [list(map(tuple, h or [])) for h in columns.get("history", [[]] * n)]


class WordleCorrect:
    """1.0 when the guess is the secret, else 0.0.

    >>> WordleCorrect()(["<guess>crane</guess>", "<guess>slate</guess>"], secret=["crane", "crane"])
    [1.0, 0.0]
    """

    name = "correct"

    def __call__(self, completions: Sequence[str], secret: Sequence[str], **_: Any) -> list[float]:
        return [float(extract_guess(c) == s) for c, s in zip(completions, secret)]


class WordlePartial:
    """Partial credit from the guess's own feedback: ``r = (0.2 * #G + 0.1 * #Y)``, in [0, 1];
    0.0 when the guess is not a five-letter word.

    >>> WordlePartial()(["<guess>caner</guess>"], secret=["crane"])  # C G, A N E R Y: 0.2 + 4 * 0.1
    [0.6000000000000001]
    """

    name = "partial"

    def __call__(self, completions: Sequence[str], secret: Sequence[str], **_: Any) -> list[float]:
        scores = []
        for c, s in zip(completions, secret):
            guess = extract_guess(c)
            if guess is None or len(guess) != 5 or not guess.isalpha():
                scores.append(0.0)
                continue
            marks = feedback(guess, s)
            scores.append(0.2 * marks.count(GREEN) + 0.1 * marks.count(YELLOW))
        return scores


class WordleFormat:
    """Format and validity: ``r = 0.2 * 1[<think>...</think>] + 0.3 * 1[exactly one <guess>...</guess>]
    + 0.5 * 1[the guess is a word of the list]`` (Predibase's output-format check, made additive).

    Args:
        words: the valid guesses (default: the bundled list).
    """

    name = "format"

    def __init__(self, words: Sequence[str] | None = None) -> None:
        self.words = frozenset(w.lower() for w in (words if words is not None else load_words()))

    def __call__(self, completions: Sequence[str], **_: Any) -> list[float]:
        scores = []
        for c in completions:
            think = re.search(r"<think>.*?</think>", c, re.DOTALL) is not None
            one_guess = len(_GUESS.findall(c)) == 1
            valid = extract_guess(c) in self.words
            scores.append(0.2 * think + 0.3 * one_guess + 0.5 * valid)
        return scores


class WordleStrategy:
    """Use of the feedback so far: the fraction of earlier guesses whose feedback the new guess
    would reproduce if it were the secret, ``r = (1/H) sum_h 1[feedback(g_h, guess) == f_h]``; a
    guess consistent with every clue scores 1. None (does not apply) when there is no history;
    0.0 for a guess that is not a five-letter word.

    >>> WordleStrategy()(["<guess>crate</guess>"], history=[[["crane", "GGGXG"]]])
    [1.0]
    """

    name = "strategy"

    def __call__(self, completions: Sequence[str], **columns: Any) -> list[float | None]:
        scores: list[float | None] = []
        for c, history in zip(completions, _history(columns, len(completions))):
            if not history:
                scores.append(None)
                continue
            guess = extract_guess(c)
            if guess is None or len(guess) != 5 or not guess.isalpha():
                scores.append(0.0)
                continue
            scores.append(sum(feedback(g, guess) == f for g, f in history) / len(history))
        return scores


class Wordle(Task):
    """Next-guess Wordle over the bundled word list.

    Args:
        max_history: earlier guesses shown, drawn uniformly in [0, max_history] (<= 5).
        num_train: length of the (lazily generated) training stream.
        num_test: held-out rows; their secrets never appear as training secrets.
        seed: seeds both splits.
        weights: weights of the rewards correct, partial, format, strategy.
        words: a word list instead of the bundled one (five-letter words).
    """

    name = "wordle"

    def __init__(self, max_history: int = 3, num_train: int = 100_000, num_test: int = 100, seed: int = 0,
                 weights: Sequence[float] = (1.0, 0.5, 0.2, 0.3), words: Sequence[str] | None = None) -> None:
        self.words = tuple(sorted({w.lower() for w in words})) if words is not None else load_words()
        bad = [w for w in self.words if len(w) != 5 or not w.isalpha()]
        if bad:
            raise ValueError(f"words must be five-letter words, got {bad[:5]}")
        if not 0 <= max_history <= 5:
            raise ValueError(f"max_history must be in [0, 5], got {max_history}")
        if not 0 <= num_test <= len(self.words) // 2:
            raise ValueError(f"num_test must be in [0, {len(self.words) // 2}] for {len(self.words)} words, got {num_test}")
        if len(weights) != 4:
            raise ValueError(f"weights: need 4 (correct, partial, format, strategy), got {list(weights)}")
        self.max_history, self.seed, self.weights = max_history, seed, [float(w) for w in weights]
        secrets = list(self.words)
        random.Random(f"wordle-split-{seed}").shuffle(secrets)
        self._test_secrets, self._train_secrets = secrets[:num_test], secrets[num_test:]
        self._test = [self._row(s, random.Random(f"wordle-test-{seed}-{i}")) for i, s in enumerate(self._test_secrets)]
        self._train = _GeneratedRows(num_train, self._train_row)

    def _train_row(self, index: int) -> Row:
        rng = random.Random(f"wordle-train-{self.seed}-{index}")
        return self._row(rng.choice(self._train_secrets), rng)

    def _row(self, secret: str, rng: random.Random) -> Row:
        n = rng.randint(0, self.max_history)
        guesses = rng.sample([w for w in self.words if w != secret], n)
        history = [[g, feedback(g, secret)] for g in guesses]
        if history:
            lines = "\n".join(f"Guess {i + 1}: {render_feedback(g, f)}" for i, (g, f) in enumerate(history))
            user = f"Your guesses so far:\n{lines}\n\nWhat is your next guess?"
        else:
            user = "This is your first guess. What is your guess?"
        prompt = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
        return {"prompt": prompt, "secret": secret, "history": history}

    def train_rows(self) -> Sequence[Row]:
        return self._train

    def test_rows(self) -> Sequence[Row]:
        return self._test

    def reward_functions(self) -> Mapping[str, RewardFn]:
        return {"correct": WordleCorrect(), "partial": WordlePartial(), "format": WordleFormat(self.words),
                "strategy": WordleStrategy()}

    def reward_weights(self) -> Sequence[float]:
        return self.weights
