"""Shared pieces of the reliability tests: a reward with variance, a step recorder, run/compare helpers."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch

from rftlab.callbacks.checkpointing import ResumableCheckpoint
from rftlab.environments import Environment, Step

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # tests/ (for helpers), also in the script subprocesses
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import eos_likely, fit_tiny, trainable_snapshot  # noqa: E402

_WARMED: list[bool] = []
ROOT = Path(__file__).resolve().parents[2]  # the checkout whose rftlab is under test


def subprocess_env() -> dict[str, str]:
    """The environment of a script run as a subprocess: this checkout's rftlab first on its path
    (a script's own folder replaces the working directory on ``sys.path``), W&B offline."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline"}


def parity(completions: list[str], **_: Any) -> list[float]:
    """1.0 for an even number of characters: variance on random text."""
    return [float(len(c) % 2 == 0) for c in completions]


def length_score(completions: list[str], **_: Any) -> list[float]:
    """A continuous score: groups rarely tie, but do when every completion hits the budget."""
    return [float(len(c) % 3) for c in completions]


class StepRecorder(L.Callback):
    """Per optimizer step: the rollout's reward/mean and the value Lightning logged for it."""

    def __init__(self) -> None:
        self.rewards: dict[int, float] = {}
        self.logged: dict[int, dict[str, float]] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.rewards[trainer.global_step] = float(batch.metrics["reward/mean"])
        self.logged[trainer.global_step] = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


def fit(make_module: Callable[[], L.LightningModule], make_dm: Callable[[], L.LightningDataModule], max_steps: int,
        ckpt_dir: Path, ckpt_path: str | None = None, every: int = 1, keep: int = 0,
        **trainer_kwargs: Any) -> tuple[L.LightningModule, StepRecorder]:
    """Seed, build a fresh module and DataModule, fit to ``max_steps`` (resuming from ``ckpt_path``).

    Checkpoints go to ``ckpt_dir``: ``last.ckpt`` every ``every`` steps, and with ``keep=-1`` also
    ``step=<n>.ckpt`` for every step.
    """
    if not _WARMED:  # the first policy built in a process draws extra random numbers (lazy imports)
        make_module().configure_model()
        _WARMED.append(True)
    module, dm, recorder = make_module(), make_dm(), StepRecorder()
    # LoRA and value-head initialisation draw from the global generator; a resumed run must not
    # depend on it (the checkpoint's weights and generators win), so it gets another seed.
    L.seed_everything(999 if ckpt_path is not None else 1234, verbose=False)
    module.configure_model()
    checkpoint = ResumableCheckpoint(dirpath=str(ckpt_dir), filename="{step}", every_n_train_steps=every, save_top_k=keep)
    trainer = fit_tiny(module, dm, max_steps, callbacks=[recorder, checkpoint], ckpt_path=ckpt_path, **trainer_kwargs)
    assert trainer.global_step == max_steps
    return module, recorder


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Every trainable parameter of ``a`` equals ``b``'s within float tolerance."""
    wa, wb = trainable_snapshot(a), trainable_snapshot(b)
    assert wa.keys() == wb.keys() and wa
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


#: Completions per prompt of the two-process scripts' rewards below.
G = 2


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def alternating(completions: list[str], **_: Any) -> list[float]:
    """0, 1, 0, 1, ...: every group of 2 has variance."""
    return [float(i % 2) for i in range(len(completions))]


class UnevenReward:
    """Rank 0: variance in every group. Rank 1: variance only in the first group, on every other
    call, so rank 1 needs more dynamic-sampling rounds than rank 0."""

    __name__ = "uneven"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, completions: list[str], **_: Any) -> list[float]:
        self.calls += 1
        if rank() == 0:
            return alternating(completions)
        varied = self.calls % 2 == 1
        return [float(i % 2) if varied and i < G else 1.0 for i in range(len(completions))]


class TurnsByRank(Environment):
    """A multi-turn environment whose episodes last 1 turn on rank 0 and 3 turns on rank 1
    (different episode lengths, sampling rounds and rollout widths on the two processes)."""

    def __init__(self) -> None:
        self.turns = 0

    def reset(self, row: dict[str, Any]) -> None:
        self.turns = 0

    def step(self, text: str) -> Any:
        self.turns += 1
        return Step([{"role": "user", "content": "go on"}], done=self.turns >= (1 if rank() == 0 else 3))


def talkative(cls: type) -> type:
    """A subclass of algorithm ``cls`` whose tiny policy often samples EOS (``helpers.eos_likely``),
    so its multi-turn episodes have several turns; rebuilt the same way on resume."""

    class Talkative(cls):  # type: ignore[misc, valid-type]
        def configure_model(self) -> None:
            super().configure_model()
            eos_likely(self)

    Talkative.__name__ = Talkative.__qualname__ = f"Talkative{cls.__name__}"
    return Talkative

