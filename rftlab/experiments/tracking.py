"""Recording one run of a comparison: per-step metrics, evaluations, generated tokens, memory, budget.

``RunRecorder`` is a plain Lightning callback; it reads logged metrics and batches only, so it works
with any algorithm. Pair it with ``TrainClock`` (listed before it), whose evaluation-free training
time is the clock of a minutes budget.
"""

from __future__ import annotations

import math
import os
import resource
import sys
from typing import Any

import lightning as L
import torch

from rftlab.callbacks.clock import TrainClock
from rftlab.experiments.variants import Budget

# Logged with every rollout by the RolloutDataModule: completion tokens sampled so far, including the
# groups dynamic sampling dropped. The budget and the per-token comparison count these.
GENERATED_TOTAL = "rollout/generated_tokens_total"

class PeakMemory:
    """Peak memory of this process (CPU resident set, or CUDA allocations) since the last ``reset``.

    On Linux, writing "5" to ``/proc/self/clear_refs`` resets the kernel's peak-RSS counter
    (``VmHWM``, see proc(5)), so runs in one process each get their own peak; elsewhere the
    process-lifetime ``ru_maxrss`` is reported (an upper bound when runs share a process).

    Args:
        device: the run's device; CUDA devices report ``torch.cuda.max_memory_allocated``.
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.cuda = device is not None and device.type == "cuda"
        self.resettable = False

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.resettable = True
        except OSError:
            self.resettable = False

    def peak_mb(self) -> float:
        """Peak since ``reset`` in MiB."""
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        if self.resettable:
            try:
                with open("/proc/self/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            return int(line.split()[1]) / 1024  # kB
            except OSError:
                pass
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, kB on Linux


class RunRecorder(L.Callback):
    """Collects per-step metrics and held-out evaluations, counts generated tokens, enforces a budget.

    Args:
        clock: the run's ``TrainClock`` (must come before this callback in the Trainer's list).
        budget: when to stop; ``steps`` is also enforced by the Trainer's ``max_steps``.
    """

    def __init__(self, clock: TrainClock, budget: Budget) -> None:
        self.clock = clock
        self.budget = budget
        self.steps: list[dict[str, float]] = []
        self.evals: list[dict[str, float]] = []
        self.generated_tokens = 0.0
        self.memory = PeakMemory()
        self.peak_memory_mb = math.nan

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.memory = PeakMemory(pl_module.device)
        self.memory.reset()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        initial = getattr(pl_module, "initial_val_accuracy", None)
        if initial is not None and not self.evals:
            self.evals.append({"step": 0, "train_seconds": 0.0, GENERATED_TOTAL: 0.0, "val/accuracy": float(initial)})

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.generated_tokens = generated_tokens(batch, self.generated_tokens)
        row = {"step": float(trainer.global_step), "train_seconds": self.clock.train_seconds}
        for key, value in trainer.callback_metrics.items():
            if not key.startswith("val/") and key not in row:
                row[key] = float(value)
        row[GENERATED_TOTAL] = self.generated_tokens
        self.steps.append(row)
        if self.budget.tokens is not None and self.generated_tokens >= self.budget.tokens:
            trainer.should_stop = True
        if self.budget.minutes is not None and self.clock.train_seconds >= 60 * self.budget.minutes:
            trainer.should_stop = True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or "val/accuracy" not in trainer.callback_metrics:
            return
        row = {"step": float(trainer.global_step), "train_seconds": self.clock.train_seconds,
               GENERATED_TOTAL: self.generated_tokens}
        for key, value in trainer.callback_metrics.items():
            if key.startswith("val/"):
                row[key] = float(value)
        if self.evals and self.evals[-1]["step"] == row["step"]:
            self.evals[-1] = row  # validated twice at one step (e.g. the closing evaluation): keep one
        else:
            self.evals.append(row)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.peak_memory_mb = self.memory.peak_mb()

    @property
    def last_eval_step(self) -> int | None:
        return int(self.evals[-1]["step"]) if self.evals else None


def generated_tokens(batch: Any, so_far: float) -> float:
    """Generated tokens after this step: the DataModule's cumulative count, if the batch carries it.

    Without it (a custom DataModule) the first minibatch of each rollout adds its own completion
    tokens, which undercounts dropped dynamic-sampling groups and later minibatches.

    Args:
        batch: the step's Rollout minibatch.
        so_far: the count before this step.
    """
    metrics = getattr(batch, "metrics", {})
    if GENERATED_TOTAL in metrics:
        return float(metrics[GENERATED_TOTAL])
    mask = getattr(batch, "completion_mask", None)
    if not getattr(batch, "first_of_rollout", True) or mask is None:
        return so_far
    return so_far + float(mask.sum())


def default_threads(processes: int) -> int:
    """Torch threads per run when ``processes`` runs share this machine's cores.

    Args:
        processes: runs trained at the same time.
    """
    return max(1, (os.cpu_count() or 1) // max(1, processes))
