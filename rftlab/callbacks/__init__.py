"""Callbacks: training clock, sample tables, W&B specifics. They read batches and logged metrics only."""

from rftlab.callbacks.clock import TrainClock
from rftlab.callbacks.samples import CompletionTable
from rftlab.callbacks.wandb import WandbMetrics, make_wandb_logger, wandb_mode

__all__ = ["CompletionTable", "TrainClock", "WandbMetrics", "make_wandb_logger", "wandb_mode"]
