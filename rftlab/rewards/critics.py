"""Step critics for segment-level RFT: an overall score G and, per thought segment, S_k and P_k.

A critic reads one chain of thought, already cut into segments (the M thought segments, then the
answer segment; see ``rftlab.core.split_segments``) and returns ``Critique(G, S, P)``, every
score in [0, 1] (the "RFT fine tuning" slides, "Critics"). Two kinds:

- ``ArithmeticStepCritic``: rule-based, for arithmetic chains. It checks each ``a op b = c`` with a
  safe AST evaluator (never ``eval``) and measures progress against the reference solution's
  intermediate values.
- ``JudgeCritic``: asks a chat model with a rubric prompt; ``HFJudgeCritic`` runs a local
  transformers chat model. Output it cannot parse gets neutral scores and is counted in
  ``num_unparsed``, never an exception.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from rftlab.rewards.answers import extract_number, parse_number
from rftlab.rewards.checks import check_finite
from rftlab.rewards.expr import SafeExpression
from rftlab.rewards.graders import _LocalJudge


class Critique(NamedTuple):
    """A critic's scores of one chain: ``G`` overall, ``S``/``P`` thought/progress per thought segment."""

    G: float
    S: list[float]
    P: list[float]


class Critic:
    """Interface of step critics.

    ``score(prompt, segments, reference)`` gets the prompt text, the M + 1 segment texts (the answer
    segment last) and the task row of the problem (``answer`` and any reference columns), and
    returns ``Critique(G, S, P)`` with ``len(S) == len(P) == M``, all in [0, 1].
    ``num_unparsed`` counts chains that got neutral scores because the critic's output was unusable.
    ``required_columns`` names the task columns ``score`` cannot do without; an algorithm checks them
    against the task's rows before sampling (``missing_columns``).
    """

    name = "critic"
    required_columns: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.num_unparsed = 0

    def score(self, prompt: str, segments: Sequence[str], reference: Mapping[str, Any]) -> Critique:
        raise NotImplementedError

    def score_batch(
        self, prompts: Sequence[str], segments: Sequence[Sequence[str]], references: Sequence[Mapping[str, Any]]
    ) -> list[Critique]:
        """Score N chains (override to batch a model's forward passes)."""
        return [self.score(p, s, r) for p, s, r in zip(prompts, segments, references)]


def missing_columns(critic: Critic, rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """The critic's required columns that some rows lack, each with the number of rows lacking it.

    Args:
        critic: the critic whose ``required_columns`` are checked.
        rows: the task rows it will score (dicts).
    """
    counts = {column: sum(column not in row for row in rows) for column in critic.required_columns}
    return {column: n for column, n in counts.items() if n}


# ---------------------------------------------------------------- equations in a line

_OPERATORS = ("+", "-", "*", "/")
_MAX_EXPRESSION = 120  # characters: a chain step is a handful of tokens; bounds the parsing work


def parse_arithmetic(text: str) -> SafeExpression | None:
    """``text`` as an arithmetic expression with at least one operation, else None.

    Numbers, ``+ - * /``, unary signs and parentheses only, parsed by the project's safe evaluator
    (``rftlab.rewards.expr.SafeExpression``: Python's parser, its own interpreter, never ``eval``).
    """
    if not text.strip() or len(text) > _MAX_EXPRESSION:
        return None
    try:
        expression = SafeExpression(text, operators=_OPERATORS, functions={})
    except (ValueError, RecursionError, MemoryError):  # ExpressionError is a ValueError
        return None
    return expression if any(isinstance(n, ast.BinOp) for n in ast.walk(expression.tree)) else None


@dataclass(frozen=True)
class Equation:
    """One ``lhs = claimed`` found in a line; ``correct`` when lhs evaluates to the claimed value."""

    lhs: str
    claimed: float
    correct: bool


# "3 × 4", "12 ÷ 3", "3 x 4", unicode minus signs, "$15", "1,250" -> plain Python arithmetic.
_SYMBOLS = str.maketrans({"×": "*", "·": "*", "÷": "/", "−": "-", "–": "-", "$": " "})
_TIMES_X = re.compile(r"(?<=\d)\s*[xX]\s*(?=\d)")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_RHS = re.compile(r"\s*(-?\d+(?:\.\d+)?)")
_LHS_CHARS = set("0123456789.+-*/() ")


def normalise_arithmetic(line: str) -> str:
    """Rewrite ``×``, ``÷``, ``x`` between numbers, unicode minus, ``$`` and thousands commas."""
    line = line.translate(_SYMBOLS)
    line = _TIMES_X.sub(" * ", line)
    return _THOUSANDS.sub("", line)


def find_equations(line: str, tolerance: float = 1e-6) -> list[Equation]:
    """Every ``expression = number`` in ``line`` whose expression holds an operation.

    For each ``=``, the left side is the longest arithmetic suffix of the text before it that
    parses (so "Step 2: 5 + 3 = 8" reads "5 + 3", and "1. 5 + 3" reads "5 + 3"); the claimed value
    is the number right after it. Chains ("3 + 4 = 7 * 2 = 14") give one equation per ``=``.

    Examples:
        >>> [(e.lhs, e.claimed, e.correct) for e in find_equations("5 + 3 = 8, then 8 x 2 = 15")]
        [('5 + 3', 8.0, True), ('8 * 2', 15.0, False)]
    """
    text = normalise_arithmetic(line)
    found: list[Equation] = []
    for match in re.finditer(r"(?<![=<>!])=(?!=)", text):
        rhs = _RHS.match(text, match.end())
        if rhs is None:
            continue
        start = match.start()
        while start > 0 and text[start - 1] in _LHS_CHARS:
            start -= 1
        candidate = text[start : match.start()]
        for i in range(len(candidate)):  # the longest suffix that is an arithmetic expression
            expression = parse_arithmetic(candidate[i:]) if candidate[i] not in "*/) " else None
            if expression is not None:
                break
        else:
            continue
        claimed = float(rhs.group(1))
        try:
            value = float(expression.evaluate())
        except (ValueError, OverflowError):  # division by zero, or too large: a wrong equation
            value = math.nan
        correct = math.isclose(value, claimed, rel_tol=tolerance, abs_tol=tolerance)
        found.append(Equation(candidate[i:].strip(), claimed, correct))
    return found


# ---------------------------------------------------------------- the rule-based critic

def _key(value: float) -> float:
    return round(float(value), 6)


class ArithmeticStepCritic(Critic):
    """Rule-based critic of arithmetic chains (the "RFT fine tuning" slides, "Critics").

    For thought segment k, with E_k its equations (``a op b = c``, found by ``find_equations``):

    - ``S_k`` = fraction of E_k that evaluate correctly (safe AST evaluator), 0.5 for a line with none;
    - ``P_k = |D ∩ V_k| / (|D| + n_wrong_k)``, D the reference solution's intermediate values,
      V_k the values (right-hand sides) of correct equations in segments 1..k, n_wrong_k the wrong
      equations in segments 1..k (0 when the denominator is 0);
    - ``G = 1`` if the final answer (the last number of the chain, as the task verifier reads it)
      equals the reference answer, else 0.

    Args:
        answer_key: task column of the reference answer.
        steps_key: task column of the reference intermediate values (a list of numbers).
        tolerance: relative/absolute tolerance of numeric comparisons (finite, >= 0).
    """

    name = "arithmetic_steps"

    def __init__(self, answer_key: str = "answer", steps_key: str = "steps", tolerance: float = 1e-6) -> None:
        super().__init__()
        check_finite(type(self).__name__, "tolerance", tolerance, ge=0)
        self.answer_key, self.steps_key, self.tolerance = answer_key, steps_key, tolerance

    @property
    def required_columns(self) -> tuple[str, ...]:
        """The reference answer and the reference intermediate values: every score reads both."""
        return (self.answer_key, self.steps_key)

    def score(self, prompt: str, segments: Sequence[str], reference: Mapping[str, Any]) -> Critique:
        for key in self.required_columns:
            if key not in reference:
                raise KeyError(f"{self.name} needs the task column {key!r}; got {sorted(reference)}")
        if not segments:
            raise ValueError("segments must hold at least the answer segment")
        targets = {_key(v) for v in reference[self.steps_key]}
        produced: set[float] = set()
        n_wrong = 0
        S: list[float] = []
        P: list[float] = []
        for line in segments[:-1]:
            equations = find_equations(line, self.tolerance)
            S.append(sum(e.correct for e in equations) / len(equations) if equations else 0.5)
            produced |= {_key(e.claimed) for e in equations if e.correct}
            n_wrong += sum(not e.correct for e in equations)
            denominator = len(targets) + n_wrong
            P.append(len(targets & produced) / denominator if denominator else 0.0)
        answer = parse_number(str(reference[self.answer_key]))
        final = extract_number("\n".join(segments))
        right = answer is not None and final is not None and math.isclose(
            final, answer, rel_tol=self.tolerance, abs_tol=self.tolerance)
        return Critique(float(right), S, P)


# ---------------------------------------------------------------- judge critics

RUBRIC = """You grade a step-by-step solution to a problem.

Problem:
{problem}

Reference solution:
{reference}

Solution to grade:
{steps}
Final answer: {answer}

For each step, give two scores between 0 and 1: "thought" (is the step correct and sensible?) and
"progress" (how much of the way to the reference solution has been covered after this step?).
Then give an overall score between 0 and 1 (1 if the final answer is right and the reasoning sound).
Reply with exactly these lines and nothing else:
{format}
overall=<score>"""

_STEP_LINE = re.compile(r"step\s*(\d+)\s*:?\s*thought\s*=\s*([-+]?\d*\.?\d+)\s*[,;]?\s*progress\s*=\s*([-+]?\d*\.?\d+)", re.I)
_OVERALL = re.compile(r"overall\s*[=:]\s*([-+]?\d*\.?\d+)", re.I)
NEUTRAL = 0.5


def neutral_critique(num_thoughts: int) -> Critique:
    """0.5 everywhere: equal S give S_hat = 0 and equal P give dP = 0, so every C_k = G = 0.5."""
    return Critique(NEUTRAL, [NEUTRAL] * num_thoughts, [NEUTRAL] * num_thoughts)


def parse_judgement(text: str, num_thoughts: int) -> Critique | None:
    """Read ``step k: thought=x progress=y`` lines and ``overall=z``; None unless all are there.

    Scores are clipped to [0, 1]; a step listed twice keeps its first scores.
    """
    steps: dict[int, tuple[float, float]] = {}
    for match in _STEP_LINE.finditer(text):
        steps.setdefault(int(match.group(1)), (float(match.group(2)), float(match.group(3))))
    overall = _OVERALL.search(text)
    if overall is None or any(k not in steps for k in range(1, num_thoughts + 1)):
        return None
    clip = lambda x: min(max(x, 0.0), 1.0)  # noqa: E731
    return Critique(
        clip(float(overall.group(1))),
        [clip(steps[k][0]) for k in range(1, num_thoughts + 1)],
        [clip(steps[k][1]) for k in range(1, num_thoughts + 1)],
    )


class JudgeCritic(Critic):
    """A critic that asks a chat model, with the ``RUBRIC`` prompt, to score each step.

    Args:
        chat: ``fn(list of user messages) -> list of replies``, the judge model.
        reference_key: task column holding the reference solution (falls back to ``answer``).
        rubric: the prompt template (``{problem}``, ``{reference}``, ``{steps}``, ``{answer}``,
            ``{format}``).
    """

    name = "judge"

    def __init__(self, chat: Callable[[list[str]], list[str]], reference_key: str = "solution", rubric: str = RUBRIC) -> None:
        super().__init__()
        if not callable(chat):
            raise TypeError(f"chat must be callable (messages -> replies), got {type(chat).__name__}")
        for field_name in ("{problem}", "{steps}", "{format}"):
            if field_name not in rubric:
                raise ValueError(f"rubric must contain {field_name}")
        self.chat, self.reference_key, self.rubric = chat, reference_key, rubric

    def prompt(self, prompt: str, segments: Sequence[str], reference: Mapping[str, Any]) -> str:
        """The judge's user message for one chain."""
        thoughts = segments[:-1]
        solution = reference.get(self.reference_key, reference.get("answer", ""))
        return self.rubric.format(
            problem=prompt, reference=solution, answer=segments[-1] if segments else "",
            steps="".join(f"Step {k}: {line}\n" for k, line in enumerate(thoughts, 1)) or "(no steps)\n",
            format="\n".join(f"step {k}: thought=<score> progress=<score>" for k in range(1, len(thoughts) + 1)),
        )

    def score(self, prompt: str, segments: Sequence[str], reference: Mapping[str, Any]) -> Critique:
        return self.score_batch([prompt], [segments], [reference])[0]

    def score_batch(
        self, prompts: Sequence[str], segments: Sequence[Sequence[str]], references: Sequence[Mapping[str, Any]]
    ) -> list[Critique]:
        messages = [self.prompt(p, s, r) for p, s, r in zip(prompts, segments, references)]
        replies = self.chat(messages)
        if len(replies) != len(messages):
            raise RuntimeError(f"the judge returned {len(replies)} replies for {len(messages)} prompts")
        out = []
        for reply, segs in zip(replies, segments):
            critique = parse_judgement(reply if isinstance(reply, str) else "", max(len(segs) - 1, 0))
            if critique is None:
                self.num_unparsed += 1
                critique = neutral_critique(max(len(segs) - 1, 0))
            out.append(critique)
        return out


class HFJudgeCritic(JudgeCritic):
    """``JudgeCritic`` on a local transformers chat model (greedy, loaded on first use, offline).

    Generation is ``rftlab.rewards.graders``' local judge, the one the ``score_model`` grader uses.

    Args:
        model: a local model folder (Hugging Face causal LM with a chat template).
        max_new_tokens: reply budget per chain (an integer >= 1); the rubric's format needs ~12
            tokens a step.
        reference_key: see ``JudgeCritic``.
    """

    def __init__(self, model: str, max_new_tokens: int = 128, reference_key: str = "solution") -> None:
        if not isinstance(model, str) or not model:
            raise ValueError(f"model={model!r} is invalid: must be a local model folder")
        check_finite(type(self).__name__, "max_new_tokens", max_new_tokens, integer=True, ge=1)
        self.model, self.max_new_tokens = model, max_new_tokens
        self._judge = _LocalJudge(model, max_new_tokens)
        super().__init__(self._chat, reference_key=reference_key)

    def _chat(self, messages: list[str]) -> list[str]:
        return self._judge([[{"role": "user", "content": m}] for m in messages])
