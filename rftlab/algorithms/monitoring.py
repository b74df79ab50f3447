"""What every algorithm measures but does not train on: held-out accuracy, the KL monitor, entropy."""

from __future__ import annotations

import itertools

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torchmetrics import MeanMetric

from rftlab.core import KL_ESTIMATORS, kl_penalty, masked_mean
from rftlab.rollout.evaluation import EvalBatch
from rftlab.rollout.rollout import Rollout


def limited_batches(total: int, limit: int | float | None) -> int:
    """How many of ``total`` validation batches ``Trainer(limit_val_batches=limit)`` runs: an int is a
    count, a float a fraction (at least one batch when above 0), as in Lightning's own loop.

    Args:
        total: batches in the held-out stream.
        limit: the Trainer's ``limit_val_batches`` (None: all).
    """
    if limit is None:
        return total
    if isinstance(limit, float):
        return total if limit >= 1.0 else max(1, int(total * limit)) if limit > 0 else 0
    return min(total, int(limit))


class Monitoring:
    """Monitoring part of an ``RFTModule`` (a mixin).

    Validation steps log ``val/accuracy``, ``val/reward`` and ``val/mean_length`` on the held-out
    split of the DataModule's ``val_dataloader`` (greedy answers, scored by the task's verifier);
    with ``log.validate_at_start`` the untrained policy is evaluated once before the first step and
    logged at step 0. With beta 0, ``kl.log_every`` still logs the KL to the reference (by default every 10 steps
    when LoRA makes the reference free).
    """

    def init_validation_metrics(self) -> None:
        """Create the running means (called from ``__init__``)."""
        self.val_accuracy = MeanMetric()
        self.val_reward = MeanMetric()
        self.initial_val_accuracy: float | None = None

    def validation_step(self, batch: EvalBatch, batch_idx: int) -> None:
        self.val_accuracy.update(batch.correct)
        self.val_reward.update(batch.rewards)
        n = len(batch.correct)
        self.log("val/accuracy", self.val_accuracy, on_step=False, on_epoch=True, batch_size=n, prog_bar=True)
        self.log("val/reward", self.val_reward, on_step=False, on_epoch=True, batch_size=n)
        self.log("val/mean_length", batch.lengths.mean(), on_step=False, on_epoch=True, batch_size=n, sync_dist=True)

    def validate_before_training(self) -> None:
        """Held-out accuracy of the untrained policy, logged as ``val/accuracy`` at step 0."""
        if not self.log_options.validate_at_start or self.global_step > 0:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        stream = datamodule.val_dataloader() if datamodule is not None else []
        if not stream or self.trainer.limit_val_batches == 0:
            return
        metric = MeanMetric().to(self.device)
        batches = limited_batches(len(stream), self.trainer.limit_val_batches)
        with torch.inference_mode():
            for batch in itertools.islice(stream, batches):
                metric.update(batch.correct.to(self.device))
        self.initial_val_accuracy = float(metric.compute())
        for logger in self.loggers:
            logger.log_metrics({"val/accuracy": self.initial_val_accuracy}, step=self.global_step)

    def monitors_kl(self) -> bool:
        """Whether this step's rollout gets the KL monitor (``kl.log_every``, beta 0 only)."""
        every = self.kl_options.monitor_every(self.policy_spec.lora)
        return every is not None and self.beta == 0 and self.global_step % every == 0

    def say_why_kl_is_absent(self) -> None:
        """At fit start: a run at beta 0 that cannot log ``kl`` says so once, and how to get it."""
        if getattr(self, "trains_on_references", False):
            return  # SFT: no policy drifts from a reference by sampling; kl means nothing there
        if self.beta == 0 and self.kl_options.monitor_every(self.policy_spec.lora) is None:
            rank_zero_info("kl is not logged: at beta=0 full fine-tuning keeps no reference policy; "
                           "lora=True gets it every kl.log_every steps for two no-grad forwards, beta > 0 every step")

    def monitored_kl(self, rollout: Rollout) -> float:
        """Masked token mean of KL(policy || reference) on a rollout, for logging only (no grad)."""
        ref = self.batched_logprobs(rollout, reference=True)
        current = rollout.old_logp if rollout.old_logp is not None else self.batched_logprobs(rollout)
        # An estimator over the sampled tokens (SegmentRFT's "exact" needs logits; k3 stands in).
        kind = self.kl_options.estimator if self.kl_options.estimator in KL_ESTIMATORS else "k3"
        return float(masked_mean(kl_penalty(current, ref, kind=kind), rollout.completion_mask))
