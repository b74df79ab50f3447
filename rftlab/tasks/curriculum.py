"""A curriculum: training prompts from easier tasks first, then from the task to be learned.

With a small model most groups of a hard task score alike (all wrong), so they carry no learning
signal. Training first on an easier version of the same task (fewer terms, shorter words, ...)
gives the policy prompts it sometimes solves; the held-out split stays the hardest stage's, so
held-out accuracy measures the task that matters (Kimi k1.5's curriculum sampling, arXiv
2501.12599, also moves from easy to hard problems). Here the stages follow one another by prompt
count, a fixed schedule rather than one driven by measured accuracy (as reasoning-gym's curricula
are), so a run is reproducible and a resumed run draws what an uninterrupted one would have.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Mapping, Sequence
from typing import Any

from rftlab.rewards.base import RewardFn
from rftlab.rewards.pool import WithTimeout, is_async, own_counters
from rftlab.tasks.base import Row, Task

#: The column every training row of a curriculum carries: the index of the stage it came from.
STAGE_COLUMN = "curriculum_stage"


def _position(index: int, length: int) -> int:
    """``index`` of a sequence of ``length`` items as a position from 0 (negative counts from the end)."""
    position = index + length if index < 0 else index
    if not 0 <= position < length:
        raise IndexError(index)
    return position


def _prompt_key(prompt: Any) -> str:
    return json.dumps(prompt, sort_keys=True, default=str)


class _Chained(Sequence):
    """The stages' training rows one after the other, each tagged with its stage (read lazily).

    A row whose prompt is in ``held_out`` is replaced by the next row of its stage that is not, so an
    easier stage never trains on a held-out question of the last one (an easy configuration of a
    generator can produce questions of the hard one: 2 terms among "2 to 3 terms").
    """

    def __init__(self, parts: Sequence[Sequence[Row]], held_out: set[str]) -> None:
        self.parts = parts
        self.held_out = held_out
        self.starts = [0]
        for part in parts:
            self.starts.append(self.starts[-1] + len(part))

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: int) -> Row:  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = _position(index, len(self))
        stage = bisect.bisect_right(self.starts, index) - 1
        part = self.parts[stage]
        local = index - self.starts[stage]
        for tried in range(len(part)):
            row = part[(local + tried) % len(part)]
            if not self.held_out or _prompt_key(row["prompt"]) not in self.held_out:
                return {**row, STAGE_COLUMN: stage}
        raise ValueError(f"every training row of curriculum stage {stage} is a held-out question of the last stage")


class StagedReward:
    """One reward function of a curriculum: each row is scored by its own stage's function.

    Rows without a stage column (the held-out split, which is the last stage's) go to the last stage.
    The counters the stages' functions keep themselves (their ``counters``, and ``timeouts`` for one
    that times itself out, as ``MathAnswer`` does) read here as the sum over the stages, so that
    ``RewardSet`` logs them as it would for the functions alone.

    Args:
        name: the reward's name (the same in every stage).
        fns: the stages' functions of that name, easiest stage first.
    """

    def __init__(self, name: str, fns: Sequence[RewardFn]) -> None:
        self.name = name
        self.fns = list(fns)
        self.counters = tuple(dict.fromkeys(
            counter for fn in self.fns for counter in own_counters(fn) if counter != "timeouts"))

    def __getattr__(self, name: str) -> int:
        # Reached only for attributes not set on the instance: a counter of the stages, summed.
        fns = self.__dict__.get("fns", [])  # via __dict__: unpickling calls this before __init__'s fields exist
        counts = [kept[name] for kept in map(own_counters, fns) if name in kept]
        if counts and (name == "timeouts" or name in self.__dict__.get("counters", ())):
            return sum(counts)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __call__(self, completions: Sequence[str], **columns: Any) -> list[float | None]:
        last = len(self.fns) - 1
        stages = columns.pop(STAGE_COLUMN, None) or [last] * len(completions)
        stages = [last if s is None else int(s) for s in stages]
        out: list[float | None] = [None] * len(completions)
        for stage in sorted(set(stages)):
            idx = [i for i, s in enumerate(stages) if s == stage]
            part = {k: [v[i] for i in idx] for k, v in columns.items()}
            scores = self.fns[stage]([completions[i] for i in idx], **part)
            for i, score in zip(idx, scores):
                out[i] = score
        return out


class Curriculum(Task):
    """Tasks from easy to hard: the first ``stage_prompts[0]`` training prompts come from stage 0, the
    next ``stage_prompts[1]`` from stage 1, ..., the rest from the last stage, whose held-out split
    is the curriculum's.

    Each stage draws its own prompts in its own seeded shuffle. Every training row carries the
    column ``curriculum_stage``, and each reward is scored by the function of the row's own stage,
    so a stage may have a verifier of its own, under the same reward names.

    Args:
        stages: the tasks, easiest first (at least 2); all must name the same reward functions.
        stage_prompts: how many training prompts each stage but the last supplies, counted over all
            processes (one value per stage but the last, each >= 1).
        name: the task's name in run names and metrics (default: the last stage's).
    """

    def __init__(self, stages: Sequence[Task], stage_prompts: Sequence[int], name: str | None = None) -> None:
        stages = list(stages)
        if len(stages) < 2:
            raise ValueError(f"stages has {len(stages)} task(s): a curriculum needs at least 2 (easiest first)")
        stage_prompts = [int(n) for n in stage_prompts]
        if len(stage_prompts) != len(stages) - 1:
            raise ValueError(f"stage_prompts has {len(stage_prompts)} value(s): it needs one per stage but the last "
                             f"({len(stages) - 1} for {len(stages)} stages); the last stage goes on to the end")
        if any(n < 1 for n in stage_prompts):
            raise ValueError(f"stage_prompts={stage_prompts} is invalid: every value must be >= 1")
        names = [list(stage.reward_functions()) for stage in stages]
        for i, found in enumerate(names):
            if found != names[-1]:
                raise ValueError(f"stages[{i}] names the reward functions {found}, the last stage {names[-1]}: "
                                 "every stage must name the same ones, in the same order")
        for i, stage in enumerate(stages):
            for reward, fn in stage.reward_functions().items():
                # the curriculum calls each stage's function itself, so it must be a plain callable
                if is_async(fn) or isinstance(fn, WithTimeout):
                    raise ValueError(f"stages[{i}]'s reward {reward!r} is async or wrapped in WithTimeout: a "
                                     "curriculum's stages need plain reward functions (give timeouts to the "
                                     "DataModule's reward_timeout)")
            if len(stage.train_rows() or ()) == 0:
                raise ValueError(f"stages[{i}] ({getattr(stage, 'name', stage)!r}) has no training rows")
        self.stages = stages
        self.stage_prompts = stage_prompts
        self.name = name or getattr(stages[-1], "name", "curriculum")
        held_out = {_prompt_key(row["prompt"]) for row in stages[-1].test_rows() or ()}
        self._train = _Chained([stage.train_rows() for stage in stages], held_out)

    def stage_at(self, position: int) -> tuple[int, int]:
        """(stage, position within that stage) of the ``position``-th training prompt of the run.

        Args:
            position: the prompt's index in the run's global order (all processes), from 0.
        """
        for stage, count in enumerate(self.stage_prompts):
            if position < count:
                return stage, position
            position -= count
        return len(self.stages) - 1, position

    def stage_rows(self, stage: int) -> Sequence[Row]:
        """The training rows of ``stage``, each tagged with the stage column.

        Args:
            stage: the stage's index, from 0 (easiest).
        """
        start, end = self._train.starts[stage], self._train.starts[stage + 1]
        return _Slice(self._train, start, end)

    def train_rows(self) -> Sequence[Row]:
        return self._train

    def test_rows(self) -> Sequence[Row] | None:
        return self.stages[-1].test_rows()

    def reward_functions(self) -> Mapping[str, RewardFn]:
        per_stage = [stage.reward_functions() for stage in self.stages]
        return {name: StagedReward(name, [fns[name] for fns in per_stage]) for name in per_stage[-1]}

    def reward_weights(self) -> Sequence[float] | None:
        return self.stages[-1].reward_weights()

    def is_correct(self, completion: str, row: Row, prompt: str | None = None) -> bool:
        """Held-out accuracy by the stage the row belongs to (the last one for held-out rows)."""
        stage = row.get(STAGE_COLUMN)
        task = self.stages[-1 if stage is None else int(stage)]
        return task.is_correct(completion, {k: v for k, v in row.items() if k != STAGE_COLUMN}, prompt)

    def __repr__(self) -> str:
        return f"Curriculum({self.stages!r}, stage_prompts={self.stage_prompts})"


class _Slice(Sequence):
    """Rows ``start..end`` of a sequence, without copying them."""

    def __init__(self, rows: Sequence[Row], start: int, end: int) -> None:
        self.rows, self.start, self.end = rows, start, end

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, index: int) -> Row:  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.rows[self.start + _position(index, len(self))]
