"""Callbacks: training clock, sample tables, histograms, phase timing, W&B specifics.

They read batches and logged metrics only (never an algorithm's internals), so they work with any
``RFTModule``, built-in or your own, and with W&B, TensorBoard or CSV loggers.
"""

from rftlab.callbacks.checkpointing import AtomicCheckpointIO, AtomicCheckpoints, CheckpointWriteError, ResumableCheckpoint
from rftlab.callbacks.clock import TrainClock
from rftlab.callbacks.dashboards import PhaseTimer, RolloutHistograms
from rftlab.callbacks.samples import CompletionTable
from rftlab.callbacks.threads import AdaptiveThreads
from rftlab.callbacks.wandb import RFTWandbLogger, WandbMetrics, make_wandb_logger, wandb_mode
from rftlab.core.plugins import DEFAULT_CALLBACKS

# What `rftlab fit` adds by default, for runs built in Python too (see RFTModule.configure_callbacks).
DEFAULT_CALLBACKS.register("train_clock", TrainClock, overwrite=True)
DEFAULT_CALLBACKS.register("completion_table", lambda: CompletionTable(every_n_steps=10), overwrite=True)
DEFAULT_CALLBACKS.register("wandb_metrics", WandbMetrics, overwrite=True)
DEFAULT_CALLBACKS.register("atomic_checkpoints", AtomicCheckpoints, overwrite=True)
DEFAULT_CALLBACKS.register("adaptive_threads", AdaptiveThreads, overwrite=True)

__all__ = [
    "AdaptiveThreads", "AtomicCheckpointIO", "AtomicCheckpoints", "CheckpointWriteError", "ResumableCheckpoint", "RFTWandbLogger",
    "CompletionTable", "PhaseTimer", "RolloutHistograms", "TrainClock", "WandbMetrics", "make_wandb_logger", "wandb_mode",
]
