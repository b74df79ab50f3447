"""rftlab: reinforcement fine-tuning of language models with verifiable rewards, on Lightning."""

from rftlab.algorithms import GRPO, RFTModule
from rftlab.rollout import Rollout, RolloutDataModule

__version__ = "0.1.0"
__all__ = ["GRPO", "RFTModule", "Rollout", "RolloutDataModule", "__version__"]
