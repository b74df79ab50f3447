"""Held-out evaluation through the same generate protocol: greedy (or sampled) answers, verified."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from rftlab.rollout.sampler import SamplingParams


@dataclass
class EvalBatch:
    """Scored held-out answers of one batch.

    Attributes:
        correct: (B,) float, 1.0 where the task's verifier accepts the answer.
        rewards: (B,) float, total reward of each answer.
        lengths: (B,) float, completion lengths in tokens.
        prompts: B prompt texts.
        completions: B answer texts.
        seconds: generation wall time.
    """

    correct: Tensor
    rewards: Tensor
    lengths: Tensor
    prompts: list[str] = field(default_factory=list)
    completions: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to(self, device: torch.device | str) -> "EvalBatch":
        return EvalBatch(self.correct.to(device), self.rewards.to(device), self.lengths.to(device),
                         self.prompts, self.completions, self.seconds)


def score_answers(datamodule: Any, module: Any, rows: Sequence[dict[str, Any]], params: SamplingParams) -> EvalBatch:
    """Generate one answer per row with ``module`` and score it with the task and the rewards."""
    texts, ids, mask = datamodule.encode_prompts(rows, module.tokenizer)
    start = time.perf_counter()
    sampled = datamodule.sample(module, rows, ids, mask, 1, params)
    seconds = time.perf_counter() - start
    answers = sampled.texts
    columns = sampled.reward_columns(rows)  # multi-turn: the episode's turns, messages, env_reward too
    task = datamodule.task
    correct = torch.tensor([float(task.is_correct(a, {**c, "prompt": r.get("prompt")}, t))
                            for a, r, c, t in zip(answers, rows, columns, texts)])
    scored = datamodule.rewards.score(answers, texts, columns)
    return EvalBatch(correct, scored.total, sampled.completion_mask.sum(-1).float(), texts, answers, seconds)


class EvalStream:
    """The validation "dataloader": yields EvalBatch objects for this process's share of the rows."""

    def __init__(self, datamodule: Any, rows: Sequence[dict[str, Any]], params: SamplingParams | None = None) -> None:
        self.datamodule = datamodule
        self.params = params or datamodule.val_sampling
        world, rank = datamodule.world_size, datamodule.rank
        # Each process scores a disjoint slice; torchmetrics reduces the accuracy across them.
        self.rows = list(rows)[rank::world]
        self.batch_size = datamodule.val_batch_size

    def __len__(self) -> int:
        return (len(self.rows) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[EvalBatch]:
        module = self.datamodule.module
        for i in range(0, len(self.rows), self.batch_size):
            yield score_answers(self.datamodule, module, self.rows[i : i + self.batch_size], self.params)
