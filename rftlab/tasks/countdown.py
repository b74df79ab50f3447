"""Countdown: reach a target from given numbers with + - * /, verified exactly by a safe evaluator.

The task TinyZero and Predibase used to show RL fine-tuning working from few examples. Every
problem is generated from a random expression over its numbers, so it is solvable by construction.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from rftlab.rewards.base import RewardFn
from rftlab.rewards.expr import ExpressionError, evaluate_arithmetic
from rftlab.rewards.structure import TagFormat
from rftlab.tasks.arithmetic import _GeneratedRows
from rftlab.tasks.base import Row, Task

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. You first think about the reasoning process and then provide the answer."
DEFAULT_TEMPLATE = (
    "Using the numbers {numbers}, create an equation that equals {target}. You can use basic arithmetic "
    "operations (+, -, *, /) and each number can be used only once. Show your work in <think> </think> "
    "tags and return the final equation in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>."
)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_equation(text: str) -> str | None:
    """The last ``<answer>...</answer>`` content, without a trailing ``= target``; None if absent.

    >>> extract_equation("<think>..</think><answer> (6 - 2) * 5 = 20 </answer>")
    '(6 - 2) * 5'
    """
    found = _ANSWER.findall(text)
    if not found:
        return None
    equation = found[-1].strip()
    if "=" in equation:
        left, _, right = equation.rpartition("=")
        if re.fullmatch(r"\s*-?\d+\s*", right):
            equation = left
    return equation.strip() or None


class CountdownEquation:
    """1.0 when the answer equation uses the given numbers (each at most once; all of them with
    ``use_all``) with + - * / only and evaluates exactly (in fractions) to the target, else 0.0.

    Args:
        use_all: require every number to be used (TinyZero's rule) rather than a subset.
        numbers_key, target_key: the task columns.

    >>> CountdownEquation()(["<answer>(6 - 2) * 25 / 5</answer>"], numbers=[[6, 2, 25, 5]], target=[20])
    [1.0]
    """

    name = "correct"

    def __init__(self, use_all: bool = True, numbers_key: str = "numbers", target_key: str = "target") -> None:
        self.use_all, self.numbers_key, self.target_key = use_all, numbers_key, target_key

    def __call__(self, completions: Sequence[str], **columns: Any) -> list[float]:
        for key in (self.numbers_key, self.target_key):
            if key not in columns:
                raise KeyError(f"countdown needs the column {key!r}; got {sorted(columns)}")
        return [self.score(c, n, t) for c, n, t in zip(completions, columns[self.numbers_key], columns[self.target_key])]

    def score(self, completion: str, numbers: Sequence[int], target: int) -> float:
        equation = extract_equation(completion)
        if equation is None:
            return 0.0
        try:
            value, used = evaluate_arithmetic(equation)
        except ExpressionError:
            return 0.0
        available, used_counts = Counter(int(n) for n in numbers), Counter(used)
        if used_counts - available or (self.use_all and used_counts != available):
            return 0.0
        return float(value == int(target))


class Countdown(Task):
    """Countdown problems: ``num_numbers`` numbers in [1, max_number] and a reachable target.

    Args:
        num_numbers: how many numbers per problem (2-6).
        max_number: the largest number drawn.
        max_target: targets lie in [1, max_target].
        use_all: the verifier requires every number to be used.
        num_train: length of the (lazily generated) training stream.
        num_test: size of the held-out split (disjoint from training).
        seed: seeds both splits.
        format_weight: weight of the ``<think>/<answer>`` format reward (0 drops it).
        template: user message with ``{numbers}`` and ``{target}``.
        system_prompt: system message; "" for none.
    """

    name = "countdown"

    def __init__(self, num_numbers: int = 4, max_number: int = 99, max_target: int = 100, use_all: bool = True,
                 num_train: int = 100_000, num_test: int = 200, seed: int = 0, format_weight: float = 0.1,
                 template: str = DEFAULT_TEMPLATE, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> None:
        if not 2 <= num_numbers <= 6:
            raise ValueError(f"num_numbers must be in [2, 6], got {num_numbers}")
        if max_number < 2 or max_target < 1:
            raise ValueError(f"need max_number >= 2 and max_target >= 1, got {max_number}, {max_target}")
        if num_train < 1 or num_test < 0:
            raise ValueError(f"need num_train >= 1 and num_test >= 0, got {num_train}, {num_test}")
        for key in ("{numbers}", "{target}"):
            if key not in template:
                raise ValueError(f"template must contain {key}, got {template!r}")
        self.num_numbers, self.max_number, self.max_target, self.use_all = num_numbers, max_number, max_target, use_all
        self.seed, self.format_weight, self.template, self.system_prompt = seed, format_weight, template, system_prompt
        rng = random.Random(f"countdown-test-{seed}")
        test: dict[tuple, Row] = {}
        for _ in range(num_test * 50):
            if len(test) == num_test:
                break
            row = self._problem(rng)
            test.setdefault(self._key(row), row)
        if len(test) < num_test:
            raise ValueError(f"num_test={num_test}: only {len(test)} distinct problems found; lower num_test")
        self._test = list(test.values())
        self._test_keys = set(test)
        self._train = _GeneratedRows(num_train, self._train_row)

    @staticmethod
    def _key(row: Row) -> tuple:
        return tuple(sorted(row["numbers"])), row["target"]

    def _problem(self, rng: random.Random) -> Row:
        while True:
            numbers = [rng.randint(1, self.max_number) for _ in range(self.num_numbers)]
            found = _random_solution(numbers, rng)
            if found is not None and 1 <= found[0] <= self.max_target:
                return self._row(numbers, found[0], found[1])

    def _train_row(self, index: int) -> Row:
        rng = random.Random(f"countdown-train-{self.seed}-{index}")
        row = self._problem(rng)
        while self._key(row) in self._test_keys:
            row = self._problem(rng)
        return row

    def _row(self, numbers: list[int], target: int, solution: str) -> Row:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": self.template.format(numbers=numbers, target=target)})
        return {"prompt": messages, "numbers": numbers, "target": target, "solution": solution}

    def train_rows(self) -> Sequence[Row]:
        return self._train

    def test_rows(self) -> Sequence[Row]:
        return self._test

    def reward_functions(self) -> Mapping[str, RewardFn]:
        rewards: dict[str, RewardFn] = {"correct": CountdownEquation(use_all=self.use_all)}
        if self.format_weight:
            rewards["format"] = TagFormat(("think", "answer"))
        return rewards

    def reward_weights(self) -> Sequence[float]:
        return [1.0, self.format_weight] if self.format_weight else [1.0]

    def __repr__(self) -> str:
        return f"Countdown(num_numbers={self.num_numbers}, max_number={self.max_number}, seed={self.seed})"


def _random_solution(numbers: list[int], rng: random.Random) -> tuple[int, str] | None:
    """Combine all numbers in a random order with random operators, keeping every intermediate a
    positive integer (so the puzzle needs no fractions); (value, expression) or None."""
    items = [(n, str(n)) for n in numbers]
    rng.shuffle(items)
    while len(items) > 1:
        (a, ea), (b, eb) = items.pop(), items.pop()
        ops = ["+", "*"] + (["-"] if a != b else []) + (["/"] if b and a % b == 0 and b != 1 else [])
        op = rng.choice(ops)
        if op == "-" and a < b:
            (a, ea), (b, eb) = (b, eb), (a, ea)
        value = {"+": a + b, "-": a - b, "*": a * b, "/": a // max(b, 1)}[op]
        items.append((value, f"({ea} {op} {eb})"))
        rng.shuffle(items)
    value, expression = items[0]
    return (value, expression[1:-1]) if value > 0 else None
