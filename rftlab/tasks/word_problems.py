"""Multi-step arithmetic word problems whose reference solutions carry the intermediate values.

"Mia has 7 marbles. She finds 5 more. Then she gives away 4. How many marbles does Mia have now?"
has the steps 7 + 5 = 12, 12 - 4 = 8 and the answer 8. Rows carry ``answer`` (for the verifier),
``steps`` (the intermediate values [12, 8], for ``ArithmeticStepCritic``'s progress score) and
``solution`` (the reference text, for a judge critic). Generated and seeded; the held-out split is a
fixed set of problems that training never repeats.

Designed so that SmolLM2-135M-Instruct earns some reward untrained (a task nobody solves teaches
nothing): 2-3 steps on small numbers, an explicit instruction to write one calculation per line and
end with the answer, and a verifier that reads the last number of the reply.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from rftlab.rewards.answers import NumericAnswer
from rftlab.rewards.base import RewardFn
from rftlab.tasks.arithmetic import DEFAULT_SYSTEM_PROMPT, _GeneratedRows
from rftlab.tasks.base import Row, Task

NAMES = ("Mia", "Tom", "Ana", "Sam", "Lea", "Ben", "Zoe", "Max", "Ivy", "Leo")
ITEMS = ("apples", "marbles", "stickers", "books", "coins", "pencils", "cards", "shells")
# (operation, phrase): "{k}" is the step's number.
STEP_PHRASES = {
    "+": ("buys {k} more", "finds {k} more", "gets {k} more from a friend"),
    "-": ("gives away {k}", "loses {k}", "gives {k} to a friend"),
    "*": ("doubles them",),  # k = 2 only: "x 2" is the one product small models say in words
}
OPERATIONS = tuple(STEP_PHRASES)
DEFAULT_INSTRUCTION = (
    'Solve it step by step. Write one calculation per line, like "5 + 3 = 8". '
    'End with the line "Answer: <number>".'
)

Problem = tuple[str, str, int, tuple[tuple[str, int], ...]]  # name, item, start, ((op, k), ...)


class WordProblems(Task):
    """Seeded word problems of ``min_steps``..``max_steps`` operations on small whole numbers.

    Every intermediate value stays in [1, ``max_value``]; subtraction never goes below 1.

    Args:
        min_steps: fewest operations per problem (>= 1).
        max_steps: most operations per problem (>= min_steps, <= 5).
        max_value: largest start value, step number and intermediate value (>= 4).
        operations: operators to draw from, any of "+", "-", "*" ("*" is doubling).
        num_train: length of the (lazily generated) training stream.
        num_test: size of the held-out split.
        seed: seeds both splits.
        instruction: appended to each problem in the user message.
        system_prompt: system message; "" for none.
    """

    name = "word_problems"

    def __init__(
        self,
        min_steps: int = 2,
        max_steps: int = 3,
        max_value: int = 20,
        operations: Sequence[str] = ("+", "-"),
        num_train: int = 100_000,
        num_test: int = 200,
        seed: int = 0,
        instruction: str = DEFAULT_INSTRUCTION,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    ) -> None:
        if not isinstance(min_steps, int) or min_steps < 1:
            raise ValueError(f"min_steps={min_steps!r} is invalid: must be an integer >= 1")
        if not isinstance(max_steps, int) or not min_steps <= max_steps <= 5:
            raise ValueError(f"max_steps={max_steps!r} is invalid: must be an integer in [min_steps={min_steps}, 5]")
        if not isinstance(max_value, int) or max_value < 4:
            raise ValueError(f"max_value={max_value!r} is invalid: must be an integer >= 4")
        bad = [op for op in operations if op not in STEP_PHRASES]
        if not operations or bad:
            raise ValueError(f"operations={list(operations)!r} is invalid: valid operations are {', '.join(OPERATIONS)}")
        if num_train < 1:
            raise ValueError(f"num_train={num_train!r} is invalid: must be >= 1")
        if not 0 <= num_test <= 10_000:
            raise ValueError(f"num_test={num_test!r} is invalid: must be in [0, 10000]")
        self.min_steps, self.max_steps, self.max_value = min_steps, max_steps, max_value
        self.operations, self.seed = tuple(operations), seed
        self.instruction, self.system_prompt = instruction, system_prompt
        self._test = [self._row(p) for p in self._test_problems(num_test)]
        self._test_keys = {self._key(r) for r in self._test}
        self._train = _GeneratedRows(num_train, self._train_row)

    # ---- generation --------------------------------------------------------------------------
    def _draw(self, rng: random.Random) -> Problem:
        start = value = rng.randint(2, self.max_value - 2)
        steps: list[tuple[str, int]] = []
        for _ in range(rng.randint(self.min_steps, self.max_steps)):
            choices = [op for op in self.operations if self._possible(op, value)]
            op = rng.choice(choices) if choices else "-"
            if op == "+":
                k = rng.randint(1, min(10, self.max_value - value))
            elif op == "-":
                k = rng.randint(1, min(10, value - 1))
            else:
                k = 2
            steps.append((op, k))
            value = _apply(op, value, k)
        return rng.choice(NAMES), rng.choice(ITEMS), start, tuple(steps)

    def _possible(self, op: str, value: int) -> bool:
        if op == "+":
            return value < self.max_value
        if op == "-":
            return value > 1
        return 2 * value <= self.max_value

    def _test_problems(self, n: int) -> list[Problem]:
        rng = random.Random(f"word-problems-test-{self.seed}")
        seen: dict[tuple, Problem] = {}
        attempts = 0
        while len(seen) < n:
            problem = self._draw(rng)
            seen.setdefault(_numbers(problem), problem)
            attempts += 1
            if attempts > 100 * max(n, 1):
                raise ValueError(f"num_test={n} is invalid: too many for max_value={self.max_value}, steps "
                                 f"{self.min_steps}-{self.max_steps} (only {len(seen)} distinct problems found)")
        return list(seen.values())

    def _train_row(self, index: int) -> Row:
        rng = random.Random(f"word-problems-train-{self.seed}-{index}")
        problem = self._draw(rng)
        while _numbers(problem) in self._test_keys:  # keep the held-out split unseen
            problem = self._draw(rng)
        return self._row(problem)

    @staticmethod
    def _key(row: Row) -> tuple:
        return (row["start"], tuple((op, k) for op, k in row["operations"]))

    def _row(self, problem: Problem) -> Row:
        name, item, start, steps = problem
        sentences = [f"{name} has {start} {item}."]
        values, lines = [], []
        value = start
        for i, (op, k) in enumerate(steps):
            phrase = STEP_PHRASES[op][(start + i + k) % len(STEP_PHRASES[op])].format(k=k)
            sentences.append(f"{'Then she' if name in _SHE else 'Then he'} {phrase}." if i else
                             f"{'She' if name in _SHE else 'He'} {phrase}.")
            new = _apply(op, value, k)
            lines.append(f"{value} {op} {k} = {new}")
            values.append(new)
            value = new
        sentences.append(f"How many {item} does {name} have now?")
        messages = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "user", "content": " ".join(sentences) + "\n" + self.instruction})
        return {
            "prompt": messages,
            "answer": str(value),
            "steps": values,
            "solution": "\n".join(lines + [f"Answer: {value}"]),
            "start": start,
            "operations": [list(s) for s in steps],
        }

    # ---- Task API ----------------------------------------------------------------------------
    def train_rows(self) -> Sequence[Row]:
        return self._train

    def test_rows(self) -> Sequence[Row]:
        return self._test

    def reward_functions(self) -> Mapping[str, RewardFn]:
        return {"correct": NumericAnswer(extract="last")}

    def __repr__(self) -> str:
        return (f"WordProblems(steps={self.min_steps}-{self.max_steps}, max_value={self.max_value}, "
                f"operations={self.operations}, seed={self.seed})")


_SHE = {"Mia", "Ana", "Lea", "Zoe", "Ivy"}


def _apply(op: str, value: int, k: int) -> int:
    return value + k if op == "+" else value - k if op == "-" else value * k


def _numbers(problem: Problem) -> tuple:
    # The held-out key is the arithmetic, not the wording: a renamed copy is still a seen problem.
    return (problem[2], tuple(problem[3]))
