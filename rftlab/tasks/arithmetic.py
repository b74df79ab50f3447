"""Arithmetic: "Calculate 37 + 48." with a numeric verifier; seeded, generated, no files needed."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

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



class FinalTurnAnswer(NumericAnswer):
    """``NumericAnswer`` read from the model's last turn of a multi-turn episode.

    A tool's result is in the episode text but not in the model's turns, so the reward is earned
    only by an answer the model itself gives at the end. Single-turn completions are read whole.

    Args:
        extract: which number of the last turn is the answer: "last" or "first".
        tolerance: relative tolerance (absolute below 1), finite and >= 0.
        answer_key: the task column holding the reference answer.
    """

    name = "final_turn_answer"

    def __call__(self, completions: Sequence[str], **columns: Any) -> list[float]:
        turns = columns.get("turns")
        if turns is not None:
            completions = [t[-1] if t else c for c, t in zip(completions, turns)]
        return super().__call__(completions, **columns)


class BigArithmetic(Arithmetic):
    """Products of two 3-4 digit numbers: a task where a calculator tool matters.

    SmolLM2-135M alone almost never multiplies such numbers right; with a calculator tool
    (``RolloutDataModule(tools=[calculator])``) the task is to call it and report the result.
    Each row carries two references for a supervised warm-up: ``episode`` (call the calculator,
    read the result, answer) and ``solution`` (the bare answer sentence, for a run without tools).

    Args:
        min_digits: fewest digits of an operand (3 means >= 100).
        max_digits: most digits of an operand (<= 6).
        num_train: length of the (lazily generated) training stream.
        num_test: size of the held-out split.
        seed: seeds both splits.
        template: user message; ``{a}``, ``{op}``, ``{b}`` are filled in.
        system_prompt: system message; "" for none.
    """

    name = "big_arithmetic"

    def __init__(self, min_digits: int = 3, max_digits: int = 4, num_train: int = 100_000, num_test: int = 200,
                 seed: int = 0, template: str = DEFAULT_TEMPLATE, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> None:
        if not 1 <= min_digits <= max_digits <= 6:
            raise ValueError(f"need 1 <= min_digits <= max_digits <= 6, got min_digits={min_digits}, max_digits={max_digits}")
        super().__init__(digits=max_digits, operations=("*",), num_train=num_train, num_test=0, seed=seed,
                         template=template, system_prompt=system_prompt)
        self.min_digits = min_digits
        self._low = 10 ** (min_digits - 1)
        self._test = [self._row(*p) for p in self._test_problems(num_test)]
        self._test_keys = {(r["a"], r["op"], r["b"]) for r in self._test}

    def _row(self, a: int, op: str, b: int) -> Row:
        row = super()._row(a, op, b)
        call = json.dumps({"name": "calculator", "arguments": {"expression": f"{a} {op} {b}"}})
        row["episode"] = [{"role": "assistant", "content": f"<tool_call>{call}</tool_call>"},
                          {"role": "tool", "name": "calculator", "content": row["answer"]},
                          {"role": "assistant", "content": f"The result is {row['answer']}."}]
        row["solution"] = f"The result is {row['answer']}."
        return row

    def reward_functions(self) -> Mapping[str, RewardFn]:
        return {"correct": FinalTurnAnswer(extract="last")}

    def __repr__(self) -> str:
        return f"BigArithmetic(min_digits={self.min_digits}, max_digits={self.digits}, seed={self.seed})"
