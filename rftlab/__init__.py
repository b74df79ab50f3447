"""rftlab: reinforcement fine-tuning of language models with verifiable rewards, on Lightning."""

from rftlab.algorithms import DAPO, GRPO, PPO, RFTModule, SegmentRFT
from rftlab.algorithms.sft import SFT, SFTDataModule
from rftlab.rollout import Rollout, RolloutDataModule

__version__ = "0.1.0"
__all__ = ["DAPO", "GRPO", "PPO", "RFTModule", "Rollout", "RolloutDataModule", "SFT", "SFTDataModule", "SegmentRFT", "__version__"]
