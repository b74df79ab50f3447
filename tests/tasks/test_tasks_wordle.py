"""Wordle: feedback rules, the four rewards on hand-computed cases, the bundled word list, splits."""

from __future__ import annotations

import doctest
import random

import pytest

import rftlab.tasks.wordle as wordle_module
from rftlab.tasks import Wordle, WordleCorrect, WordleFormat, WordlePartial, WordleStrategy
from rftlab.tasks.wordle import feedback, load_words


def feedback_reference(guess, secret):
    """Wordle's rule spelled out: greens first, then each remaining letter yellow while the
    secret still has an unmatched copy of it, scanning left to right."""
    result = ["X"] * 5
    remaining = list(secret)
    for i in range(5):
        if guess[i] == secret[i]:
            result[i] = "G"
            remaining[i] = None
    for i in range(5):
        if result[i] == "G":
            continue
        if guess[i] in remaining:
            result[i] = "Y"
            remaining[remaining.index(guess[i])] = None
    return "".join(result)


@pytest.mark.parametrize(
    "guess, secret, marks",
    [
        ("crane", "crane", "GGGGG"),
        ("speed", "abide", "XXYXY"),   # two e's guessed, one e in the secret: only the first is yellow
        ("eerie", "there", "YXYXG"),   # t-h-e-r-e: e@4 green; one unmatched e left: 1st e yellow, 2nd gray; r yellow
        ("llama", "hello", "YYXXX"),
        ("zzzzz", "crane", "XXXXX"),
    ],
)
def test_feedback_hand_cases(guess, secret, marks):
    assert feedback(guess, secret) == marks


def test_feedback_against_the_reference_loop():
    words = load_words()
    rng = random.Random(0)
    for _ in range(2000):
        guess, secret = rng.choice(words), rng.choice(words)
        assert feedback(guess, secret) == feedback_reference(guess, secret), (guess, secret)


def test_bundled_word_list_is_package_data():
    words = load_words()
    assert len(words) >= 500 and all(len(w) == 5 and w.isalpha() and w.islower() for w in words)
    assert "crane" in words


def test_rewards_hand_computed():
    completions = ["<think>hmm</think>\n<guess>crane</guess>", "<guess>caner</guess>", "<guess>xyz</guess>", "no tags"]
    secrets = ["crane"] * 4
    assert WordleCorrect()(completions, secret=secrets) == [1.0, 0.0, 0.0, 0.0]
    # crane: 5 greens = 1.0; caner: C green, A N E R yellow = 0.2 + 0.4; xyz: not a word: 0
    assert WordlePartial()(completions, secret=secrets) == pytest.approx([1.0, 0.6, 0.0, 0.0])
    # format: think 0.2 + one guess 0.3 + valid word 0.5 ("caner" is not in the list)
    assert WordleFormat()(completions) == pytest.approx([1.0, 0.3, 0.3, 0.0])


def test_strategy_reward_uses_the_feedback():
    history = [["crane", "GGGXG"], ["slate", "XXGGG"]]  # secret "crate": C R A _ E, then _ _ A T E
    reward = WordleStrategy()
    scores = reward(["<guess>crate</guess>", "<guess>crave</guess>", "<guess>pound</guess>", "<guess>crate</guess>"],
                    history=[history, history, history, []])
    # crate reproduces both feedbacks: 1; crave reproduces crane's (GGGXG) but not slate's: 1/2;
    # pound neither: 0; no history: None (does not apply)
    assert scores == [1.0, 0.5, 0.0, None]


def test_rows_splits_and_prompt():
    task = Wordle(num_test=40, seed=2, max_history=4)
    assert task.test_rows() == Wordle(num_test=40, seed=2, max_history=4).test_rows()
    test_secrets = {r["secret"] for r in task.test_rows()}
    train_secrets = {task.train_rows()[i]["secret"] for i in range(3000)}
    assert len(test_secrets) == 40 and not test_secrets & train_secrets
    row = next(r for r in task.train_rows()[:50] if len(r["history"]) >= 2)
    for guess, marks in row["history"]:
        assert marks == feedback(guess, row["secret"]) and guess.upper() in row["prompt"][-1]["content"]
    assert task.is_correct(f"<guess>{row['secret']}</guess>", row)
    assert list(task.reward_functions()) == ["correct", "partial", "format", "strategy"]


@pytest.mark.parametrize(
    "kwargs, name",
    [(dict(max_history=6), "max_history"), (dict(num_test=10_000), "num_test"), (dict(weights=(1.0,)), "weights"),
     (dict(words=["toolong"]), "five-letter")],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Wordle(**kwargs)


def test_docstring_examples():
    result = doctest.testmod(wordle_module)
    assert result.attempted > 0 and result.failed == 0
