"""JSON extraction: the reference answer scores 1, partial answers partial credit, splits."""

from __future__ import annotations

import json

import pytest

from rftlab.tasks import JsonExtraction


def test_reference_scores_one_and_partial_answers_less():
    task = JsonExtraction(num_test=20)
    reward = task.reward_functions()["fields"]
    row = task.test_rows()[0]
    facts = json.loads(row["answer"])
    perfect = f"```json\n{json.dumps(facts)}\n```"
    wrong_age = json.dumps({**facts, "age": facts["age"] + 1})
    missing = json.dumps({"name": facts["name"]})
    scores = reward([perfect, wrong_age, missing, "I don't know"], answer=[row["answer"]] * 4)
    # 4 fields + whole document = 5 parts: perfect 5/5; wrong age 3/5; only the name 1/5; no JSON 0
    assert scores == pytest.approx([1.0, 3 / 5, 1 / 5, 0.0])
    assert task.is_correct(perfect, row) and not task.is_correct(wrong_age, row)


def test_text_contains_the_facts_and_splits_are_disjoint():
    task = JsonExtraction(num_test=30, seed=5)
    assert task.test_rows() == JsonExtraction(num_test=30, seed=5).test_rows()
    for row in task.test_rows():
        facts = json.loads(row["answer"])
        assert facts["name"] in row["text"] and str(facts["age"]) in row["text"] and facts["city"] in row["text"]
        assert row["text"] in row["prompt"][-1]["content"]
    held = {r["text"] for r in task.test_rows()}
    assert not held & {task.train_rows()[i]["text"] for i in range(1000)}


def test_bad_arguments():
    with pytest.raises(ValueError, match="template"):
        JsonExtraction(template="no field")
    with pytest.raises(ValueError, match="num_test"):
        JsonExtraction(num_test=-1)
