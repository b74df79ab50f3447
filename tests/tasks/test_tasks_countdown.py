"""Countdown: solvable generated problems, a held-out split, and the exact verifier."""

from __future__ import annotations

import doctest

import pytest

import rftlab.tasks.countdown as countdown_module
from rftlab.tasks import Countdown, CountdownEquation


def test_rows_are_seeded_solvable_and_held_out():
    task = Countdown(num_test=50, seed=1)
    again = Countdown(num_test=50, seed=1)
    assert task.test_rows() == again.test_rows()
    assert task.train_rows()[7] == again.train_rows()[7]
    verify = CountdownEquation()
    rows = list(task.train_rows()[:300]) + list(task.test_rows())
    for row in rows:
        assert len(row["numbers"]) == 4 and 1 <= row["target"] <= 100
        # each problem's own construction is a valid solution
        assert verify([f"<answer>{row['solution']}</answer>"], numbers=[row["numbers"]], target=[row["target"]]) == [1.0]
    held = {(tuple(sorted(r["numbers"])), r["target"]) for r in task.test_rows()}
    train = {(tuple(sorted(r["numbers"])), r["target"]) for r in task.train_rows()[:2000]}
    assert len(held) == 50 and not held & train


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("<answer>(6 - 2) * 25 / 5</answer>", 1.0),           # 4 * 25 / 5 = 20, all numbers once
        ("<answer>(6 - 2) * 25 / 5 = 20</answer>", 1.0),      # a trailing "= target" is allowed
        ("<answer>25 - 6 + 2 - 5 + 4</answer>", 0.0),         # 4 is not one of the numbers
        ("<answer>6 * 5 - 2 - 25 + 11</answer>", 0.0),        # 11 not available
        ("<answer>25 - 5</answer>", 0.0),                     # 20, but 6 and 2 unused (use_all)
        ("<answer>25 - 5 + 6 - 6</answer>", 0.0),             # 6 used twice
        ("<answer>(25 + 6 * 2) / 5</answer>", 0.0),           # 37 / 5 = 7.4, exact fractions: not 20
        ("<answer>(6 - 2) * 25 ** 1 / 5</answer>", 0.0),      # ** is not an allowed operation
        ("<answer>__import__('os')</answer>", 0.0),
        ("(6 - 2) * 25 / 5", 0.0),                            # no <answer> tag
    ],
)
def test_verifier_hand_cases(answer, expected):
    assert CountdownEquation()([answer], numbers=[[6, 2, 25, 5]], target=[20]) == [expected]


def test_subset_rule_and_fractions_in_the_middle():
    subset = CountdownEquation(use_all=False)
    assert subset(["<answer>25 - 5</answer>"], numbers=[[6, 2, 25, 5]], target=[20]) == [1.0]
    # 8 / 3 is a fraction mid-way; (8/3) * 3 * 1 = 8 exactly
    assert CountdownEquation()(["<answer>8 / 3 * 3 * 1</answer>"], numbers=[[8, 3, 3, 1]], target=[8]) == [1.0]


def test_task_rewards_and_is_correct():
    task = Countdown(num_test=5)
    row = task.test_rows()[0]
    good = f"<think>try</think>\n<answer>{row['solution']}</answer>"
    assert task.is_correct(good, row) and not task.is_correct("<answer>1 + 1</answer>", row)
    assert list(task.reward_functions()) == ["correct", "format"] and task.reward_weights() == [1.0, 0.1]
    assert list(Countdown(num_test=5, format_weight=0).reward_functions()) == ["correct"]
    assert "{numbers}" not in row["prompt"][-1]["content"] and str(row["target"]) in row["prompt"][-1]["content"]


@pytest.mark.parametrize(
    "kwargs, name",
    [(dict(num_numbers=1), "num_numbers"), (dict(max_number=1), "max_number"), (dict(num_train=0), "num_train"),
     (dict(template="no fields"), "template")],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Countdown(**kwargs)


def test_docstring_examples():
    result = doctest.testmod(countdown_module)
    assert result.attempted > 0 and result.failed == 0
