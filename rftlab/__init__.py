"""rftlab: reinforcement fine-tuning of language models with verifiable rewards, on Lightning."""

from rftlab.algorithms import (
    DAPO,
    GRPO,
    PPO,
    AdvantageSpec,
    ClipOptions,
    CorrectionOptions,
    CriticOptions,
    KLOptions,
    LogOptions,
    LossSpec,
    OptimOptions,
    OverlongOptions,
    RFTModule,
    SegmentOptions,
    SegmentRFT,
)
from rftlab.algorithms.sft import SFT, SFTDataModule
from rftlab import callbacks as _callbacks  # noqa: F401  (registers the default callbacks of every fit)
from rftlab.models import ForwardOptions, PolicySpec
from rftlab.rollout import Rollout, RolloutDataModule

__version__ = "0.1.0"
__all__ = [
    "DAPO", "GRPO", "PPO", "RFTModule", "Rollout", "RolloutDataModule", "SFT", "SFTDataModule", "SegmentRFT",
    "AdvantageSpec", "ClipOptions", "CorrectionOptions", "CriticOptions", "ForwardOptions", "KLOptions", "LogOptions",
    "LossSpec", "OptimOptions", "OverlongOptions", "PolicySpec", "SegmentOptions", "__version__",
]
