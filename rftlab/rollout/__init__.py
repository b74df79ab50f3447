"""The shared experience pipeline: Rollout batches, the sampler, the RolloutDataModule."""

from rftlab.rollout.datamodule import RolloutDataModule, RolloutStream
from rftlab.rollout.evaluation import EvalBatch, EvalStream
from rftlab.rollout.rollout import Rollout
from rftlab.rollout.sampler import SamplingParams

__all__ = ["EvalBatch", "EvalStream", "Rollout", "RolloutDataModule", "RolloutStream", "SamplingParams"]
