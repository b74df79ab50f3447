"""Arithmetic: "Calculate 37 + 48." with a numeric verifier; seeded, generated, no files needed."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence

from rftlab.rewards.answers import NumericAnswer
from rftlab.rewards.base import RewardFn
from rftlab.tasks.base import Row, Task

OPERATIONS: dict[str, Callable[[int, int], int]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
}

# Measured on SmolLM2-135M-Instruct (docs: benchmarks, "Learning", "Prompt design"): with this wording the untrained model
# ends its reply with a number often enough to earn reward, and the answer is read as the LAST
# number of the reply, because the model tends to restate the question first ("15 + 43 = 58").
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
DEFAULT_TEMPLATE = "Calculate {a} {op} {b}. End your reply with the result."


class _GeneratedRows(Sequence):
    """An indexable, lazily generated sequence of problems: row i depends only on (seed, i)."""

    def __init__(self, size: int, make: Callable[[int], Row]) -> None:
        self._size = size
        self._make = make

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: int) -> Row:  # type: ignore[override]
        if isinstance(index, slice):
            return [self._make(i) for i in range(*index.indices(self._size))]
        if index < 0:
            index += self._size
        if not 0 <= index < self._size:
            raise IndexError(index)
        return self._make(index)


class Arithmetic(Task):
    """Integer arithmetic on ``digits``-digit operands, verified by the last number in the reply.

    The held-out split is a fixed set of ``num_test`` problems; training problems never repeat one.

    Args:
        digits: operand size in digits (1-6); 2 means operands 10..99.
        operations: operators to draw from, any of "+", "-", "*".
        num_train: length of the (lazily generated) training stream.
        num_test: size of the held-out split.
        seed: seeds both splits.
        template: user message; ``{a}``, ``{op}``, ``{b}`` are filled in.
        system_prompt: system message; "" for none (the chat template may then add its own).
    """

    name = "arithmetic"

    def __init__(
        self,
        digits: int = 2,
        operations: Sequence[str] = ("+",),
        num_train: int = 100_000,
        num_test: int = 200,
        seed: int = 0,
        template: str = DEFAULT_TEMPLATE,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    ) -> None:
        if not 1 <= digits <= 6:
            raise ValueError(f"digits must be in [1, 6], got {digits}")
        bad = [op for op in operations if op not in OPERATIONS]
        if not operations or bad:
            raise ValueError(f"operations={list(operations)!r}; valid: {', '.join(OPERATIONS)}")
        if num_train < 1:
            raise ValueError(f"num_train must be >= 1, got {num_train}")
        low, high = (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1
        space = (high - low + 1) ** 2 * len(operations)
        if num_test < 0 or num_test > space // 2:
            raise ValueError(f"num_test must be in [0, {space // 2}] for digits={digits}, got {num_test}")
        for key in ("{a}", "{b}"):
            if key not in template:
                raise ValueError(f"template must contain {key}, got {template!r}")
        self.digits, self.operations, self.seed = digits, tuple(operations), seed
        self.template, self.system_prompt = template, system_prompt
        self._low, self._high = low, high
        self._test = [self._row(*p) for p in self._test_problems(num_test)]
        self._test_keys = {(r["a"], r["op"], r["b"]) for r in self._test}
        self._train = _GeneratedRows(num_train, self._train_row)

    def _draw(self, rng: random.Random) -> tuple[int, str, int]:
        return rng.randint(self._low, self._high), rng.choice(self.operations), rng.randint(self._low, self._high)

    def _test_problems(self, n: int) -> list[tuple[int, str, int]]:
        rng = random.Random(f"arithmetic-test-{self.seed}")
        seen: dict[tuple[int, str, int], None] = {}
        while len(seen) < n:
            seen.setdefault(self._draw(rng), None)
        return list(seen)

    def _train_row(self, index: int) -> Row:
        rng = random.Random(f"arithmetic-train-{self.seed}-{index}")
        problem = self._draw(rng)
        while problem in self._test_keys:  # keep the held-out split unseen
            problem = self._draw(rng)
        return self._row(*problem)

    def _row(self, a: int, op: str, b: int) -> Row:
        messages = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "user", "content": self.template.format(a=a, op=op, b=b)})
        return {"prompt": messages, "answer": str(OPERATIONS[op](a, b)), "a": a, "op": op, "b": b}

    def train_rows(self) -> Sequence[Row]:
        return self._train

    def test_rows(self) -> Sequence[Row]:
        return self._test

    def reward_functions(self) -> Mapping[str, RewardFn]:
        return {"correct": NumericAnswer(extract="last")}

    def __repr__(self) -> str:
        return f"Arithmetic(digits={self.digits}, operations={self.operations}, seed={self.seed})"

