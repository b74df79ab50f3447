"""A task: prompts with reference columns, a held-out split, and the verifier that scores them.

Rows are dicts. ``row["prompt"]`` is either a list of chat messages (``{"role", "content"}``) or a
plain string; every other key (``answer``, ``tests``, ...) is passed to reward functions as a column.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rftlab.rewards.base import RewardFn

Row = dict[str, Any]


class Task:
    """Base class of verifiable tasks.

    Subclasses set ``name`` and implement ``train_rows``, ``test_rows`` and ``reward_functions``.
    ``is_correct`` defines held-out accuracy; by default it is "the first reward function gives 1".
    """

    name: str = "task"

    def train_rows(self) -> Sequence[Row]:
        """The training prompts (an indexable sequence; may be generated lazily)."""
        raise NotImplementedError

    def test_rows(self) -> Sequence[Row] | None:
        """The fixed held-out split, or None when the task has none."""
        return None

    def reward_functions(self) -> Mapping[str, RewardFn]:
        """The task's verifier(s), name -> reward function."""
        raise NotImplementedError

    def reward_weights(self) -> Sequence[float] | None:
        """Weights of ``reward_functions`` (None: all 1)."""
        return None

    def is_correct(self, completion: str, row: Row, prompt: str | None = None) -> bool:
        """Whether one completion solves one row (held-out accuracy), by the task's first reward.

        Args:
            completion: the generated text.
            row: the task row (its columns reach the reward as keyword lists, as in training).
            prompt: the rendered prompt text, passed as ``prompts=`` like in training (default: the
                row's raw prompt).
        """
        name, fn = next(iter(self.reward_functions().items()))
        columns = {k: [v] for k, v in row.items() if k != "prompt"}
        score = fn([completion], prompts=[prompt if prompt is not None else row.get("prompt")], **columns)[0]
        return score is not None and score >= 1.0


class RowsTask(Task):
    """A task built from in-memory rows and reward functions (for users' own data).

    Args:
        train: training rows, each with a "prompt".
        rewards: name -> reward function.
        test: held-out rows (optional).
        weights: reward weights (optional).
        name: task name used in run names and metrics.
    """

    def __init__(
        self,
        train: Sequence[Row],
        rewards: Mapping[str, RewardFn],
        test: Sequence[Row] | None = None,
        weights: Sequence[float] | None = None,
        name: str = "rows",
    ) -> None:
        if len(train) == 0:
            raise ValueError("train: the task has no training rows")
        for i, row in enumerate(train):
            if "prompt" not in row:
                raise ValueError(f"train row {i} has no 'prompt' column (keys: {sorted(row)})")
        self._train = list(train)
        self._test = list(test) if test is not None else None
        self._rewards = dict(rewards)
        self._weights = weights
        self.name = name

    def train_rows(self) -> Sequence[Row]:
        return self._train

    def test_rows(self) -> Sequence[Row] | None:
        return self._test

    def reward_functions(self) -> Mapping[str, RewardFn]:
        return self._rewards

    def reward_weights(self) -> Sequence[float] | None:
        return self._weights
