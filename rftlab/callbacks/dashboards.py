"""Dashboard callbacks that work with any Lightning logger: histograms and per-phase timing.

Scalars go through ``pl_module.log``, so W&B, TensorBoard and CSV all receive the same keys.
Histograms go to the loggers that can draw them (W&B, TensorBoard) under the same key; loggers that
cannot (CSV, ...) get the quantiles as scalars (``<key>/p10``, ``<key>/p50``, ``<key>/p90``).
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

QUANTILES = (10, 50, 90)


def logging_step(trainer: L.Trainer) -> int:
    """The step Lightning logs this training batch's ``self.log`` metrics at (0 for the first batch).

    In ``on_train_batch_end`` ``global_step`` already counts the update just made, while Lightning
    logs the batch's scalars at the count before it; histograms and tables use the same step so
    they line up with the scalars in every logger.
    """
    return int(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step))


def batch_distributions(batch: Any) -> dict[str, np.ndarray]:
    """Values to histogram from a Rollout minibatch: total reward, each reward function, lengths, advantages.

    Args:
        batch: a Rollout (minibatch).
    """
    out: dict[str, np.ndarray] = {"histograms/reward": batch.rewards.detach().float().cpu().numpy()}
    per_fn = batch.rewards_per_fn.detach().float().cpu().numpy()
    for j, name in enumerate(batch.reward_names):
        column = per_fn[:, j]
        column = column[~np.isnan(column)]  # NaN: the function did not apply to that sample
        if len(column):
            out[f"histograms/reward/{name}"] = column
    out["histograms/completion_length"] = batch.completion_mask.sum(-1).float().cpu().numpy()
    if batch.seq_advantages is not None:
        out["histograms/advantage"] = batch.seq_advantages.detach().float().cpu().numpy()
    return out


def log_histograms(trainer: L.Trainer, values: dict[str, np.ndarray], step: int) -> None:
    """Send each array to every logger: a histogram where supported, quantile scalars elsewhere.

    Args:
        trainer: the Trainer whose loggers receive them.
        values: key -> values.
        step: the step to log at.
    """
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            logger.log_metrics({key: wandb.Histogram(v) for key, v in values.items()}, step=step)
        elif isinstance(logger, TensorBoardLogger):
            for key, v in values.items():
                logger.experiment.add_histogram(key, v, global_step=step)
        else:
            scalars = {f"{key}/p{q}": float(np.percentile(v, q)) for key, v in values.items() for q in QUANTILES}
            logger.log_metrics(scalars, step=step)


class RolloutHistograms(L.Callback):
    """Every ``every_n_steps`` steps, histograms of rewards (total and per function), completion
    lengths and advantages of the step's minibatch (the whole rollout unless num_minibatches > 1).

    Args:
        every_n_steps: logging interval in optimizer steps (>= 1).
    """

    def __init__(self, every_n_steps: int = 10) -> None:
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps!r} is invalid: must be an integer >= 1")
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = logging_step(trainer)
        if not trainer.is_global_zero or step % self.every_n_steps != 0 or not hasattr(batch, "rewards_per_fn"):
            return
        log_histograms(trainer, batch_distributions(batch), step)


class PhaseTimer(L.Callback):
    """Logs the wall time of the phases the rest of rftlab does not time itself.

    ``timing/step`` is one whole optimizer step (building the rollout included: Lightning fetches
    the batch before ``on_train_batch_start``), ``timing/validation`` one held-out evaluation. The
    DataModule logs ``timing/generate``, ``timing/reward``, ``timing/score`` and ``timing/rollout``;
    the module logs ``timing/train``. ``timing/fraction/<phase>`` is each phase's share of the step
    (generate, reward, score: from the rollout built at that step; train: forward, backward, update).
    """

    PHASES = ("generate", "reward", "score", "train")

    def __init__(self) -> None:
        self._step_start: float | None = None
        self._batch_start: float | None = None
        self._val_start: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step_start = time.perf_counter()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._step_start is None or self._batch_start is None:
            self._step_start = now
            return
        seconds, train = now - self._step_start, now - self._batch_start
        self._step_start = now
        pl_module.log("timing/step", seconds, on_step=True, batch_size=1)
        if seconds <= 0:
            return
        # The rollout's phases were spent only on the step that built it (its first minibatch).
        rollout = getattr(batch, "metrics", {}) if getattr(batch, "first_of_rollout", True) else {}
        fractions = {phase: float(rollout.get(f"timing/{phase}", 0.0)) for phase in self.PHASES if phase != "train"}
        fractions["train"] = train
        for phase, value in fractions.items():
            pl_module.log(f"timing/fraction/{phase}", min(1.0, value / seconds), on_step=True, batch_size=1)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._val_start is None or trainer.sanity_checking:
            return
        seconds = time.perf_counter() - self._val_start
        self._val_start = None
        for logger in trainer.loggers:  # self.log is not allowed in on_validation_end
            logger.log_metrics({"timing/validation": seconds}, step=trainer.global_step)
        if self._step_start is not None:
            self._step_start += seconds  # a step interrupted by validation is not charged for it
