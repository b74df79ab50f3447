"""Verifiers and graders: plain Python callables, completions in, floats out."""

from rftlab.rewards.answers import NumericAnswer, RegexFormat, extract_number
from rftlab.rewards.base import RewardError, RewardFn, RewardResult, RewardSet, reward_name

__all__ = ["NumericAnswer", "RegexFormat", "RewardError", "RewardFn", "RewardResult", "RewardSet", "extract_number", "reward_name"]
