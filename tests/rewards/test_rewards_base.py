"""Reward interface: numeric answers, regex format, weighting, None, and error policy."""

from __future__ import annotations

import math

import pytest

from rftlab.rewards import NumericAnswer, RegexFormat, RewardError, RewardSet, extract_number


@pytest.mark.parametrize(
    "text, expected",
    [
        ("15 + 43 = 58", 58.0),  # the model restates the question: the LAST number is the answer
        ("The answer is 1,234.", 1234.0),
        ("-7", -7.0),
        ("it is 3.5 apples", 3.5),
        ("no number here", None),
    ],
)
def test_extract_number_last(text, expected):
    assert extract_number(text) == expected


def test_numeric_answer_hand_cases():
    reward = NumericAnswer()
    completions = ["15 + 43 = 58", "58 is wrong? no, 57", "", "The sum is 58.0"]
    assert reward(completions, answer=["58", "58", "58", "58"]) == [1.0, 0.0, 0.0, 1.0]
    assert NumericAnswer(extract="first")(["58 then 3"], answer=["58"]) == [1.0]
    with pytest.raises(ValueError, match="extract"):
        NumericAnswer(extract="middle")


def test_regex_format():
    reward = RegexFormat(r"-?\d+", full_match=True)
    assert reward(["42", " 42\n", "it is 42"]) == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="pattern"):
        RegexFormat("(")


def test_weighted_sum_and_none_skips():
    def a(completions, **_):
        return [1.0, None, 0.5]

    def b(completions, **_):
        return [2.0, 2.0, None]

    result = RewardSet({"a": a, "b": b}, weights=[1.0, 0.5]).score(["x", "y", "z"], ["p"] * 3, [{}] * 3)
    # total_i = sum_j w_j r_ij over the functions that applied: 1+1, 0+1, 0.5+0
    assert result.total.tolist() == [2.0, 1.0, 0.5]
    assert math.isnan(result.per_fn[1, 0]) and math.isnan(result.per_fn[2, 1])
    assert result.names == ["a", "b"]


def test_columns_reach_the_reward():
    seen = {}

    def spy(completions, prompts, answer, **rest):
        seen.update(prompts=prompts, answer=answer, rest=rest)
        return [0.0] * len(completions)

    RewardSet([spy]).score(["c1", "c2"], ["p1", "p2"], [{"answer": "1", "k": 1}, {"answer": "2", "k": 2}])
    assert seen == {"prompts": ["p1", "p2"], "answer": ["1", "2"], "rest": {"k": [1, 2]}}


def test_raising_reward_names_reward_and_sample():
    def fragile(completions, **_):
        return [1.0 / (len(c) - 3) for c in completions]  # ZeroDivisionError on 3-char completions

    rewards = RewardSet({"fragile": fragile})
    with pytest.raises(RewardError, match=r"'fragile' failed on sample 1 .*'abc'.*ZeroDivisionError"):
        rewards.score(["a", "abc"], ["p", "p"], [{}, {}])


def test_on_error_zero_scores_and_counts():
    def fragile(completions, **_):
        return [1.0 / (len(c) - 3) for c in completions]

    result = RewardSet({"fragile": fragile}, on_error="zero").score(["abcd", "abc", "ab"], ["p"] * 3, [{}] * 3)
    assert result.total.tolist() == [1.0, 0.0, -1.0]
    assert result.errors == {"fragile": 1}


@pytest.mark.parametrize(
    "output, message",
    [
        ([1.0], "returned 1 scores for 2"),
        ([1.0, float("nan")], "not finite"),
        ([1.0, "yes"], "not a number"),
        ("1.0", "must return a list"),
    ],
)
def test_junk_output_is_a_clear_error(output, message):
    def junk(completions, **_):
        return output

    with pytest.raises(RewardError, match=message):
        RewardSet({"junk": junk}).score(["a", "b"], ["p", "p"], [{}, {}])


def test_bad_reward_set_configuration():
    with pytest.raises(ValueError, match="reward_weights"):
        RewardSet({"a": NumericAnswer()}, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="on_error"):
        RewardSet({"a": NumericAnswer()}, on_error="ignore")
    with pytest.raises(ValueError, match="at least one"):
        RewardSet({})
