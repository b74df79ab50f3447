"""WordProblems: seeded multi-step problems with intermediate values, held-out split, verifier."""

from __future__ import annotations

import pytest

from rftlab.core import split_segments
from rftlab.rewards.critics import ArithmeticStepCritic
from rftlab.tasks import WordProblems


def _replay(row):
    value = row["start"]
    for op, k in row["operations"]:
        value = value + k if op == "+" else value - k if op == "-" else value * k
        yield value


def test_rows_carry_consistent_intermediate_values():
    task = WordProblems(operations=("+", "-", "*"), max_value=30)
    for row in list(task.test_rows()) + task.train_rows()[:200]:
        values = list(_replay(row))
        assert row["steps"] == values and row["answer"] == str(values[-1])
        assert 2 <= len(values) <= 3 and all(1 <= v <= 30 for v in values)
        lines = row["solution"].splitlines()
        assert lines[-1] == f"Answer: {values[-1]}" and len(lines) == len(values) + 1


def test_prompt_asks_for_one_step_per_line_and_states_every_number():
    row = WordProblems().test_rows()[0]
    assert row["prompt"][0]["role"] == "system"
    text = row["prompt"][-1]["content"]
    assert "one calculation per line" in text and "Answer: <number>" in text
    for number in [row["start"]] + [k for _, k in row["operations"]]:
        assert str(number) in text


def test_seeded_and_held_out_never_in_training():
    a, b = WordProblems(seed=1), WordProblems(seed=1)
    assert a.test_rows() == b.test_rows()
    assert [r["answer"] for r in a.train_rows()[:30]] == [r["answer"] for r in b.train_rows()[:30]]
    assert WordProblems(seed=2).test_rows() != a.test_rows()
    # small space (1 step, values <= 6): collisions would be frequent without the exclusion
    task = WordProblems(min_steps=1, max_steps=1, max_value=6, num_test=10)
    held_out = {WordProblems._key(r) for r in task.test_rows()}
    assert len(held_out) == 10
    assert not held_out & {WordProblems._key(r) for r in task.train_rows()[:300]}


def test_reference_solution_earns_full_reward_and_full_critic_scores():
    task = WordProblems(num_test=20)
    critic = ArithmeticStepCritic()
    for row in task.test_rows():
        assert task.is_correct(row["solution"], row)
        G, S, P = critic.score("", split_segments(row["solution"]), row)
        assert G == 1.0 and S == [1.0] * len(row["steps"]) and P[-1] == 1.0
    wrong = task.test_rows()[0]
    assert not task.is_correct(f"Answer: {int(wrong['answer']) + 1}", wrong)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(min_steps=0), "min_steps=0"), (dict(min_steps=3, max_steps=2), "max_steps=2"),
        (dict(max_value=3), "max_value=3"), (dict(operations=("/",)), "valid operations are"),
        (dict(num_test=-1), "num_test=-1"),
        (dict(min_steps=1, max_steps=1, max_value=4, num_test=500), "num_test=500"),
    ],
)
def test_bad_arguments_name_the_parameter(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WordProblems(**kwargs)
