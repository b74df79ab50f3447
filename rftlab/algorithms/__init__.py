"""One LightningModule per algorithm, all on the shared RolloutDataModule."""

from rftlab.algorithms.base import RFTModule
from rftlab.algorithms.dapo import DAPO
from rftlab.algorithms.grpo import GRPO

__all__ = ["DAPO", "GRPO", "RFTModule"]
