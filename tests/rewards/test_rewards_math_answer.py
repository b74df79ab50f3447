"""MathAnswer: extraction (boxed, Answer:, last number), math-verify equality, tolerance, threads."""

from __future__ import annotations

import threading
import time

import pytest

from rftlab.rewards import MathAnswer, RewardSet, WithTimeout, extract_final_answer, last_boxed


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"First \boxed{3}, finally \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),  # the LAST box, braces balanced
        (r"\boxed{x^{2}}", "x^{2}"),
        ("So 4 apples.\nAnswer: 12.", "12"),
        ("The final answer is $\\sqrt{2}$.", "\\sqrt{2}"),
        ("3 cats and 5 dogs", "5"),
        ("no answer", None),
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_last_boxed_unbalanced_is_none():
    assert last_boxed(r"\boxed{1 + {2}") is None


def test_math_verify_hand_cases():
    reward = MathAnswer()
    completions = [
        r"so the answer is \boxed{\frac{1}{2}}",  # 1/2 == 0.5 symbolically
        "Answer: 0.5",
        "it is 2",
        r"\boxed{\frac{2}{4}}",                    # 2/4 == 1/2
        "nothing",
    ]
    assert reward(completions, answer=["0.5"] * 5) == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert reward([r"\boxed{x^2 + 2x + 1}"], answer=["(x+1)^2"]) == [1.0]


def test_numeric_tolerance():
    # |3.1416 - 3.14159| = 1e-5: within rel. tolerance 1e-4 (times max(1, 3.14159)), not within exact rules.
    assert MathAnswer()(["Answer: 3.1416"], answer=["3.14159"]) == [0.0]
    assert MathAnswer(tolerance=1e-4)(["Answer: 3.1416"], answer=["3.14159"]) == [1.0]
    assert MathAnswer(tolerance=1e-6)(["Answer: 3.1416"], answer=["3.14159"]) == [0.0]


def test_works_outside_the_main_thread():
    # math-verify's signal.alarm raises outside the main thread; MathAnswer must pass None there.
    box = []
    worker = threading.Thread(target=lambda: box.append(MathAnswer()([r"\boxed{7}"], answer=["7"])))
    worker.start()
    worker.join(30)
    assert box == [[1.0]]


def test_own_timeout_outside_the_main_thread(monkeypatch):
    reward = MathAnswer(timeout=0.2)
    monkeypatch.setattr(reward, "_compare", lambda *a: time.sleep(2) or True)
    box = []
    worker = threading.Thread(target=lambda: box.append(reward(["Answer: 7"], answer=["7"])))
    start = time.perf_counter()
    worker.start()
    worker.join(10)
    assert box == [[0.0]] and reward.timeouts == 1
    assert time.perf_counter() - start < 1.5


def test_in_a_timed_reward_set():
    result = RewardSet({"math": WithTimeout(MathAnswer(), timeout=10)}).score(
        [r"\boxed{4}", "5"], ["p", "p"], [{"answer": "4"}, {"answer": "4"}])
    assert result.total.tolist() == [1.0, 0.0] and result.timeouts == {"math": 0}


def test_bad_arguments():
    with pytest.raises(ValueError, match="tolerance"):
        MathAnswer(tolerance=-1)
    with pytest.raises(ValueError, match="timeout"):
        MathAnswer(timeout=0)
    with pytest.raises(KeyError, match="'answer'"):
        MathAnswer()(["1"], solution=["1"])


def test_own_timeouts_reach_the_reward_sets_count(monkeypatch):
    # Off the main thread (a reward pool, a dataloader worker) MathAnswer times itself out; the
    # RewardSet reports those in reward/<fn>/timeouts like its own.
    reward = MathAnswer(timeout=0.2)
    monkeypatch.setattr(reward, "_compare", lambda *a: time.sleep(2) or True)
    rewards = RewardSet({"math": reward, "fmt": lambda completions, **_: [1.0] * len(completions)})
    box = []
    worker = threading.Thread(target=lambda: box.append(rewards.score(["Answer: 7", "no answer"], ["p", "p"],
                                                                     [{"answer": "7"}, {"answer": "7"}])))
    worker.start()
    worker.join(10)
    assert box and box[0].timeouts == {"math": 1} and box[0].total.tolist() == [1.0, 1.0]
    assert reward.timeouts == 1
