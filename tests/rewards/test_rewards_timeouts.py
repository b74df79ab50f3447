"""Slow and async rewards: per-sample timeouts on threads, processes and event loops, counted."""

from __future__ import annotations

import asyncio
import time

import pytest
from reward_helpers_slow import CountsOdd, async_sleepy, sleepy

from rftlab.rewards import RewardError, RewardSet, WithTimeout


def failing(completions, **_):
    if completions[0] == "bad":
        raise ValueError("boom")
    return [1.0]


def test_thread_timeout_scores_and_counts():
    rewards = RewardSet({"slow": WithTimeout(sleepy, timeout=0.5, timeout_value=-1.0)})
    start = time.perf_counter()
    result = rewards.score(["0", "30", "1", "50"], ["p"] * 4, [{}] * 4)
    elapsed = time.perf_counter() - start
    # "0" and "1" finish (score = their length 1); "30" and "50" (3 s, 5 s) time out at 0.5 s.
    assert result.total.tolist() == [1.0, -1.0, 1.0, -1.0]
    assert result.timeouts == {"slow": 2}
    assert elapsed < 1.5, "calls run concurrently, each with its own timeout"


def test_reward_set_level_timeout_applies_to_every_function():
    rewards = RewardSet({"slow": sleepy, "fast": lambda c, **_: [0.5] * len(c)}, timeout=0.3, timeout_value=0.0)
    result = rewards.score(["0", "20"], ["p", "p"], [{}, {}])
    assert result.per_fn[:, 0].tolist() == [1.0, 0.0] and result.per_fn[:, 1].tolist() == [0.5, 0.5]
    assert result.timeouts == {"slow": 1, "fast": 0}


def test_async_reward_runs_concurrently_with_timeouts():
    rewards = RewardSet({"remote": WithTimeout(async_sleepy, timeout=0.5)})
    start = time.perf_counter()
    result = rewards.score(["2", "3", "40", "1"], ["p"] * 4, [{}] * 4)
    assert result.total.tolist() == [1.0, 1.0, 0.0, 1.0]
    assert result.timeouts == {"remote": 1}
    assert time.perf_counter() - start < 1.5


def test_async_reward_without_timeout_is_awaited():
    result = RewardSet({"remote": async_sleepy}).score(["1", "02"], ["p", "p"], [{}, {}])
    assert result.total.tolist() == [1.0, 2.0]
    assert result.timeouts == {"remote": 0}


def test_async_inside_a_running_event_loop():
    async def main():
        return RewardSet({"remote": async_sleepy}).score(["1"], ["p"], [{}])

    assert asyncio.run(main()).total.tolist() == [1.0]


def test_process_executor_kills_a_hung_call():
    rewards = RewardSet({"slow": WithTimeout(sleepy, timeout=1.0, executor="process", max_workers=2)})
    result = rewards.score(["0", "600"], ["p", "p"], [{}, {}])  # "600": 60 s, killed after ~1 s
    assert result.total.tolist() == [1.0, 0.0]
    assert result.timeouts == {"slow": 1}
    again = rewards.score(["1"], ["p"], [{}])  # a fresh pool replaced the killed one
    assert again.total.tolist() == [1.0] and again.timeouts == {"slow": 0}


def test_counters_kept_in_worker_processes_reach_the_result():
    # The workers' copies of the function count; their counts come back with the scores.
    counting = CountsOdd()
    rewards = RewardSet({"c": WithTimeout(counting, timeout=30.0, executor="process", max_workers=2)})
    result = rewards.score(["a", "bb", "ccc", "dddd", "e"], ["p"] * 5, [{}] * 5)
    assert result.total.tolist() == [1.0] * 5
    assert result.counts == {"c": {"odd": 3}}
    assert counting.odd == 0  # this process's copy did not run


def test_errors_in_per_sample_calls_follow_on_error():
    with pytest.raises(RewardError, match=r"'check' failed on sample 1 .*'bad'.*ValueError: boom"):
        RewardSet({"check": WithTimeout(failing, timeout=1.0)}).score(["ok", "bad"], ["p", "p"], [{}, {}])
    result = RewardSet({"check": WithTimeout(failing, timeout=1.0)}, on_error="zero").score(
        ["ok", "bad"], ["p", "p"], [{}, {}])
    assert result.total.tolist() == [1.0, 0.0] and result.errors == {"check": 1}


def test_columns_reach_per_sample_calls():
    seen = []

    def spy(completions, prompts, answer, **_):
        seen.append((completions[0], prompts[0], answer[0]))
        return [0.0]

    RewardSet({"spy": spy}, timeout=1.0).score(["c1", "c2"], ["p1", "p2"], [{"answer": 1}, {"answer": 2}])
    assert sorted(seen) == [("c1", "p1", 1), ("c2", "p2", 2)]


def test_direct_call_of_with_timeout():
    assert WithTimeout(sleepy, timeout=0.3, timeout_value=-5.0)(["0", "20"]) == [1.0, -5.0]


@pytest.mark.parametrize(
    "kwargs, name",
    [(dict(timeout=0), "timeout"), (dict(timeout=1, executor="gpu"), "executor"), (dict(timeout=1, max_workers=0), "max_workers")],
)
def test_bad_timeout_configuration(kwargs, name):
    with pytest.raises(ValueError, match=name):
        WithTimeout(sleepy, **kwargs)


def test_bad_reward_set_timeout():
    with pytest.raises(ValueError, match="timeout"):
        RewardSet([sleepy], timeout=-1)
    with pytest.raises(ValueError, match="executor"):
        RewardSet([sleepy], timeout=1, executor="fiber")
