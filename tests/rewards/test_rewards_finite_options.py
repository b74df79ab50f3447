"""Numeric options of the reward-side constructors: NaN, infinities (and bools for sizes) are rejected
when the object is built, with the class and the parameter named; the defaults still construct."""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable
from typing import Any

import pytest

import rftlab.rewards as rewards
from rftlab.rewards import (
    CodeExecution,
    JsonSchema,
    LengthPenalty,
    MathAnswer,
    MultiGrader,
    NumericAnswer,
    PythonGrader,
    RegexFormat,
    RepetitionPenalty,
    RewardError,
    RewardSet,
    Sandbox,
    ScoreModel,
    SoftOverlong,
    StringCheck,
    TagFormat,
    TextSimilarity,
    WithTimeout,
)
from rftlab.rewards.critics import ArithmeticStepCritic, HFJudgeCritic, JudgeCritic

NON_FINITE = (math.nan, math.inf, -math.inf)


def ones(completions, **_):
    return [1.0] * len(completions)


def scores(values: list[float]) -> Callable[..., list[float]]:
    """A reward function returning ``values`` for a batch, or ``values[i]`` for a single sample i."""
    def fn(completions, **_):
        return values if len(completions) == len(values) else [values[int(completions[0])]]

    return fn


# (class named in the error, keyword, build(value) -> the object under test, values that must be rejected)
CASES: list[tuple[str, str, Callable[[Any], Any], tuple[float, ...]]] = [
    ("RewardSet", "weights", lambda v: RewardSet([ones, NumericAnswer()], weights=[1.0, v]), NON_FINITE),
    ("RewardSet", "timeout", lambda v: RewardSet([ones], timeout=v), NON_FINITE),
    ("RewardSet", "timeout_value", lambda v: RewardSet([ones], timeout_value=v), NON_FINITE),
    ("WithTimeout", "timeout", lambda v: WithTimeout(ones, timeout=v), (math.nan, -math.inf)),  # inf: no limit
    ("WithTimeout", "timeout_value", lambda v: WithTimeout(ones, 1.0, timeout_value=v), NON_FINITE),
    ("WithTimeout", "max_workers", lambda v: WithTimeout(ones, 1.0, max_workers=v), NON_FINITE),
    *[("Sandbox", name, (lambda v, name=name: Sandbox(**{name: v})), NON_FINITE)
      for name in ("timeout", "memory_mb", "cpu_seconds", "max_processes", "max_open_files", "max_file_mb", "disk_mb",
                   "max_output_bytes")],
    *[("CodeExecution", name, (lambda v, name=name: CodeExecution(**{name: v})), NON_FINITE)
      for name in ("timeout", "memory_mb", "max_processes", "max_output_bytes", "violation_value", "workers")],
    ("LengthPenalty", "max_length", lambda v: LengthPenalty(max_length=v), NON_FINITE),
    ("LengthPenalty", "coef", lambda v: LengthPenalty(max_length=4, coef=v), NON_FINITE),
    ("SoftOverlong", "max_len", lambda v: SoftOverlong(max_len=v, cache_len=4), NON_FINITE),
    ("SoftOverlong", "cache_len", lambda v: SoftOverlong(max_len=8, cache_len=v), NON_FINITE),
    ("RepetitionPenalty", "ngram_size", lambda v: RepetitionPenalty(ngram_size=v), NON_FINITE),
    ("RepetitionPenalty", "max_penalty", lambda v: RepetitionPenalty(max_penalty=v), NON_FINITE),
    ("NumericAnswer", "tolerance", lambda v: NumericAnswer(tolerance=v), NON_FINITE),
    ("MathAnswer", "tolerance", lambda v: MathAnswer(tolerance=v), NON_FINITE),
    ("MathAnswer", "timeout", lambda v: MathAnswer(timeout=v), NON_FINITE),
    ("ArithmeticStepCritic", "tolerance", lambda v: ArithmeticStepCritic(tolerance=v), NON_FINITE),
    ("HFJudgeCritic", "max_new_tokens", lambda v: HFJudgeCritic("judge-folder", max_new_tokens=v), NON_FINITE),
]


@pytest.mark.parametrize(
    "owner, keyword, build, bad",
    [pytest.param(owner, keyword, build, bad, id=f"{owner}.{keyword}={bad}")
     for owner, keyword, build, values in CASES for bad in values],
)
def test_non_finite_option_is_rejected_naming_the_parameter(owner, keyword, build, bad):
    pattern = rf"^{owner}: {keyword}(\[\d+\])?={re.escape(repr(bad))} is invalid: must be "
    with pytest.raises(ValueError, match=pattern):
        build(bad)


@pytest.mark.parametrize(
    "owner, keyword, build",
    [pytest.param(owner, keyword, build, id=f"{owner}.{keyword}")
     for owner, keyword, build, _ in CASES if keyword in ("max_length", "ngram_size", "max_processes", "max_workers",
                                                          "cpu_seconds", "timeout", "weights", "max_new_tokens")],
)
def test_bool_is_not_a_number(owner, keyword, build):
    with pytest.raises(ValueError, match=rf"^{owner}: {keyword}(\[\d+\])?=True is invalid"):
        build(True)


@pytest.mark.parametrize(
    "build, keyword",
    [(lambda: RewardSet([ones], timeout=1e12), "timeout"), (lambda: WithTimeout(ones, 1e12), "timeout"),
     (lambda: MathAnswer(timeout=1e10), "timeout"), (lambda: Sandbox(timeout=1e300), "timeout"),
     (lambda: SoftOverlong(max_len=4, cache_len=4, unit="chars"), "cache_len")],
)
def test_out_of_range_finite_values_are_rejected(build, keyword):
    # Timeouts beyond what thread joins and signal.alarm accept would raise OverflowError at the first call.
    with pytest.raises(ValueError, match=rf": {keyword}="):
        build()


def test_infinite_with_timeout_means_no_limit():
    wrapped = WithTimeout(ones, timeout=math.inf)
    assert wrapped(["a", "b"]) == [1.0, 1.0]
    assert RewardSet({"unlimited": wrapped}).score(["a"], ["p"], [{}]).total.tolist() == [1.0]


# Every public class of rftlab.rewards (and the critics) with the fewest arguments it needs.
DEFAULTS: dict[type, Callable[[], Any]] = {
    RewardSet: lambda: RewardSet([ones]),
    WithTimeout: lambda: WithTimeout(ones, 1.0),
    Sandbox: Sandbox,
    CodeExecution: CodeExecution,
    LengthPenalty: lambda: LengthPenalty(max_length=16),
    SoftOverlong: lambda: SoftOverlong(max_len=16, cache_len=4, unit="chars"),
    RepetitionPenalty: RepetitionPenalty,
    NumericAnswer: NumericAnswer,
    RegexFormat: lambda: RegexFormat(r"\d+"),
    MathAnswer: MathAnswer,
    TagFormat: TagFormat,
    JsonSchema: JsonSchema,
    StringCheck: lambda: StringCheck("{{sample.output_text}}", "{{item.answer}}", "eq"),
    TextSimilarity: lambda: TextSimilarity("{{sample.output_text}}", "{{item.answer}}", "bleu"),
    PythonGrader: lambda: PythonGrader("def grade(sample, item):\n    return 1.0"),
    ScoreModel: lambda: ScoreModel([{"role": "user", "content": "{{sample.output_text}}"}],
                                   judge=lambda conversations: ["1"] * len(conversations)),
    MultiGrader: lambda: MultiGrader({"a": StringCheck("{{sample.output_text}}", "x", "eq")}, "a"),
    ArithmeticStepCritic: ArithmeticStepCritic,
    JudgeCritic: lambda: JudgeCritic(lambda messages: ["overall=1"] * len(messages)),
    HFJudgeCritic: lambda: HFJudgeCritic("judge-folder"),
}
# Not built here: exceptions and result records, the abstract Grader, and RewardModel (it loads a
# model folder at construction; tests/rewards/test_rewards_reward_model.py builds one).
NOT_BUILT = {"ExpressionError", "RewardError", "SandboxError", "RewardResult", "SandboxResult", "Grader", "RewardModel",
             "SafeExpression"}


def test_every_public_class_is_listed():
    public = {name for name in rewards.__all__ if inspect.isclass(getattr(rewards, name))}
    listed = {cls.__name__ for cls in DEFAULTS} | NOT_BUILT
    assert public <= listed, f"add to DEFAULTS or NOT_BUILT: {sorted(public - listed)}"


@pytest.mark.parametrize("build", list(DEFAULTS.values()), ids=[cls.__name__ for cls in DEFAULTS])
def test_defaults_still_construct(build):
    build()


@pytest.mark.parametrize("bad", NON_FINITE, ids=repr)
@pytest.mark.parametrize("timeout", [None, 5.0], ids=["batch", "per_sample"])
def test_non_finite_scores_follow_the_error_policy(bad, timeout):
    # A user's reward returning NaN or inf: an error naming the reward and the sample ("raise"), or
    # a 0 counted in errors ("zero"); never a NaN total or a silently dropped sample.
    completions = ["0", "1", "2"]
    fn = scores([1.0, bad, 0.5])
    with pytest.raises(RewardError, match=r"reward 'fn' returned .* for sample 1: not finite"):
        RewardSet({"fn": fn}, timeout=timeout).score(completions, ["p"] * 3, [{}] * 3)
    result = RewardSet({"fn": fn}, on_error="zero", timeout=timeout).score(completions, ["p"] * 3, [{}] * 3)
    assert result.total.tolist() == [1.0, 0.0, 0.5]
    assert result.errors == {"fn": 1}
