"""ReasoningGym: a reasoning-gym dataset as a task (the real package, a dev dependency)."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("reasoning_gym")

from rftlab import RolloutDataModule  # noqa: E402
from rftlab.tasks import GymScore, ReasoningGym  # noqa: E402
from rftlab.tasks.reasoning_gym import extract_answer  # noqa: E402

SMALL = dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1)  # 2-term, 1-digit: a small space


def test_rows_are_seeded_and_the_held_out_split_is_unseen():
    task = ReasoningGym("basic_arithmetic", num_train=300, num_test=40, **SMALL)
    again = ReasoningGym("basic_arithmetic", num_train=300, num_test=40, config=SMALL)  # as YAML gives options
    assert [r["entry"]["question"] for r in task.test_rows()] == [r["entry"]["question"] for r in again.test_rows()]
    assert task.train_rows()[17]["entry"] == again.train_rows()[17]["entry"]
    test_questions = {r["entry"]["question"] for r in task.test_rows()}
    assert not test_questions & {r["entry"]["question"] for r in task.train_rows()}
    other = ReasoningGym("basic_arithmetic", num_test=40, seed=1, **SMALL)
    assert [r["entry"] for r in other.test_rows()] != [r["entry"] for r in task.test_rows()]
    row = task.test_rows()[0]
    assert row["prompt"][0]["role"] == "system" and "<answer>" in row["prompt"][0]["content"]
    assert row["prompt"][1]["content"] == row["entry"]["question"] and row["answer"] == str(row["entry"]["answer"])


def test_nearby_seeds_draw_their_own_rows_and_seed_0_draws_what_it_always_did():
    import reasoning_gym

    wide = dict(min_terms=3, max_terms=4, min_digits=2, max_digits=3)  # a space where chance repeats are rare
    tasks = [ReasoningGym("basic_arithmetic", num_train=50, num_test=50, seed=s, **wide) for s in (0, 1)]
    questions = [[r["entry"]["question"] for r in t.test_rows()] for t in tasks]
    # reasoning-gym draws row i from seed + i: unspread, seed 1's split would be seed 0's shifted by one
    assert questions[1][:-1] != questions[0][1:] and len(set(questions[0]) & set(questions[1])) <= 2
    train = [{tasks[k].train_rows()[i]["entry"]["question"] for i in range(50)} for k in (0, 1)]
    assert len(train[0] & train[1]) <= 2
    held_out = reasoning_gym.create_dataset("basic_arithmetic", size=50, seed=1_000_003, **wide)
    assert questions[0] == [held_out[i]["question"] for i in range(50)]
    train_0 = reasoning_gym.create_dataset("basic_arithmetic", size=50, seed=0, **wide)
    assert [tasks[0].train_rows()[i]["entry"]["question"] for i in range(50)] == [train_0[i]["question"] for i in range(50)]


def test_the_datasets_own_verifier_scores_the_extracted_answer():
    task = ReasoningGym("basic_arithmetic", num_test=3, extract="answer_tag", **SMALL)
    row = task.test_rows()[0]
    fn = task.reward_functions()["correct"]
    right = f"Adding up. <answer>{row['answer']}</answer>"
    scores = fn([right, "<answer>12345</answer>", row["answer"], f"<answer>x</answer> <answer>{row['answer']}</answer>"],
                entry=[row["entry"]] * 4)
    assert scores == [1.0, 0.0, 0.0, 1.0]  # no tag: 0; the last tag counts
    assert task.is_correct(right, row) and not task.is_correct("<answer>12345</answer>", row)
    # The default ("flexible") also reads an untagged final answer, but never more than one candidate.
    flexible = ReasoningGym("basic_arithmetic", num_test=3, **SMALL).reward_functions()["correct"]
    stated = [f"The answer is {row['answer']}.", f"x = {row['answer']}", f"{row['answer']} or 12345", right]
    scores = flexible(stated, entry=[row["entry"]] * 4)
    assert scores[:2] == [1.0, 1.0] and scores[3] == 1.0
    # reasoning-gym's own partial credit, len(reference) / len(answer) for an answer holding the
    # reference, is kept as a reward; held-out accuracy counts full marks only.
    assert scores[2] == pytest.approx(len(row["answer"]) / len(f"{row['answer']} or 12345"))
    assert not task.is_correct(stated[2], row)
    assert ReasoningGym("basic_arithmetic", num_test=1, extract="last_line", **SMALL).reward_functions()["correct"](
        [f"So:\n{row['answer']}\n"], entry=[row["entry"]]) == [1.0]


class Broken:
    def __init__(self, value):
        self.value = value

    def score_answer(self, answer, entry):
        if isinstance(self.value, Exception):
            raise self.value
        return self.value


@pytest.mark.parametrize("value, expected", [(RuntimeError("bug"), 0.0), (2.5, 1.0), (-1.0, 0.0), (math.nan, 0.0), (0.4, 0.4)])
def test_a_faulty_verifier_never_leaves_the_reward_range(value, expected):
    assert GymScore(Broken(value))(["<answer>1</answer>"], entry=[{"question": "q", "answer": "1"}]) == [expected]


def test_extraction_modes():
    assert extract_answer("a <answer> 4 </answer> b <answer>5</answer>") == "5"
    assert extract_answer("no tags") is None
    assert extract_answer("x\n  y  \n\n", "last_line") == "y" and extract_answer("  ", "whole") is None
    assert extract_answer("Answer: 7", lambda text: text.split(":")[-1].strip()) == "7"
    # flexible: the tag, else the last "answer is X" / "Answer: X", else the last line; then tidied.
    assert extract_answer("<answer> yes </answer> The answer is no", "flexible") == "yes"
    assert extract_answer("Thinking.\nThe answer is: **\"olleh\".**\nDone", "flexible") == "olleh"
    assert extract_answer("First 3.\nFinal answer: 12\nanswer is 14", "flexible") == "14"
    assert extract_answer("Step one\n5 - 5 = 0.", "flexible") == "0"
    assert extract_answer("  \n ", "flexible") is None
    # last_number: the last number written (inside the tag when there is one), thousands separators dropped.
    assert extract_answer("There are 3 + 4 = 7 legs.", "last_number") == "7"
    assert extract_answer("<answer>-1,234.5</answer> and 99", "last_number") == "-1234.5"
    assert extract_answer("<answer>seven</answer> 8", "last_number") == "seven"
    assert extract_answer("no digits", "last_number") is None


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="basic_arithmetc"), "name='basic_arithmetc' is not a reasoning-gym dataset; e.g. basic_arithmetic"),
    (dict(name="basic_arithmetic", bogus=3), "refused the options {'bogus': 3}"),
    (dict(name="basic_arithmetic", extract="first_word"), "extract='first_word' is invalid"),
    (dict(name="basic_arithmetic", num_train=0), "num_train=0 is invalid"),
])
def test_bad_settings_are_refused_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}").replace("(", r"\(")):
        ReasoningGym(**kwargs)


def test_a_rollout_on_a_gym_task_has_rewards_in_range(tiny_grpo):
    module = tiny_grpo()
    dm = RolloutDataModule(task=ReasoningGym("letter_counting", num_test=4), prompts_per_step=2, num_generations=2,
                           max_new_tokens=4).attach(module)
    rollout = dm.build_rollout()
    assert rollout.reward_names == ["correct"] and ((rollout.rewards >= 0) & (rollout.rewards <= 1)).all()
    assert "entry" in rollout.rows[0] and rollout.rows[0]["entry"]["question"] in rollout.prompts[0]
