"""The Arithmetic task: seeded, held-out split disjoint from training, verifier."""

from __future__ import annotations

import pytest

from rftlab.tasks import Arithmetic, RowsTask


def test_rows_are_seeded_and_reproducible():
    a, b = Arithmetic(seed=3), Arithmetic(seed=3)
    assert [a.train_rows()[i]["answer"] for i in range(20)] == [b.train_rows()[i]["answer"] for i in range(20)]
    assert a.test_rows() == b.test_rows()
    assert Arithmetic(seed=4).test_rows() != a.test_rows()


def test_held_out_never_appears_in_training():
    task = Arithmetic(digits=1, num_test=20)  # 1-digit: 100 problems, collisions would be frequent
    held_out = {(r["a"], r["op"], r["b"]) for r in task.test_rows()}
    assert len(held_out) == 20
    train = {(r["a"], r["op"], r["b"]) for r in task.train_rows()[:500]}
    assert not held_out & train


def test_row_format_and_answer():
    row = Arithmetic(operations=("*",)).train_rows()[0]
    assert row["answer"] == str(row["a"] * row["b"])
    assert row["prompt"][0]["role"] == "system" and row["prompt"][-1]["role"] == "user"
    assert f"{row['a']} * {row['b']}" in row["prompt"][-1]["content"]


def test_verifier_and_is_correct():
    task = Arithmetic()
    row = {"prompt": "x", "answer": "58", "a": 15, "op": "+", "b": 43}
    assert task.is_correct("15 + 43 = 58", row)
    assert not task.is_correct("15 + 43 = 57", row)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(digits=0), "digits"),
        (dict(operations=("/",)), "operations"),
        (dict(operations=()), "operations"),
        (dict(num_test=10_000), "num_test"),
        (dict(template="no placeholders"), "template"),
        (dict(num_train=0), "num_train"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Arithmetic(**kwargs)


def test_rows_task_validation():
    with pytest.raises(ValueError, match="no training rows"):
        RowsTask([], rewards={})
    with pytest.raises(ValueError, match="'prompt'"):
        RowsTask([{"question": "q"}], rewards={})
