"""Verifiers and graders: plain Python callables, completions in, floats out."""

from rftlab.rewards.answers import NumericAnswer, RegexFormat, extract_number
from rftlab.rewards.base import RewardError, RewardFn, RewardResult, RewardSet, reward_name
from rftlab.rewards.code import CodeExecution, extract_code
from rftlab.rewards.expr import ExpressionError, SafeExpression, evaluate_arithmetic
from rftlab.rewards.graders import (
    Grader,
    MultiGrader,
    PythonGrader,
    ScoreModel,
    StringCheck,
    TextSimilarity,
    from_openai_grader,
    render_template,
)
from rftlab.rewards.math_answer import MathAnswer, extract_final_answer, last_boxed
from rftlab.rewards.pool import WithTimeout
from rftlab.rewards.reward_model import RewardModel
from rftlab.rewards.sandbox import Sandbox, SandboxError, SandboxResult, find_interpreter
from rftlab.rewards.shaping import LengthPenalty, RepetitionPenalty, SoftOverlong, soft_overlong
from rftlab.rewards.structure import JsonSchema, TagFormat, extract_json

__all__ = [
    "CodeExecution", "ExpressionError", "Grader", "JsonSchema", "LengthPenalty", "MathAnswer", "MultiGrader",
    "NumericAnswer", "PythonGrader", "RegexFormat", "RepetitionPenalty", "RewardError", "RewardFn", "RewardModel",
    "RewardResult", "RewardSet", "SafeExpression", "Sandbox", "SandboxError", "SandboxResult", "ScoreModel",
    "SoftOverlong", "StringCheck", "TagFormat", "TextSimilarity", "WithTimeout", "evaluate_arithmetic",
    "extract_code", "extract_final_answer", "extract_json", "extract_number", "find_interpreter",
    "from_openai_grader", "last_boxed", "render_template", "reward_name", "soft_overlong",
]
