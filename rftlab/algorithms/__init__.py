"""One LightningModule per algorithm, all on the shared RolloutDataModule."""

from rftlab.algorithms.base import RFTModule
from rftlab.algorithms.dapo import DAPO
from rftlab.algorithms.grpo import GRPO
from rftlab.algorithms.options import (
    AdvantageSpec,
    ClipOptions,
    CorrectionOptions,
    CriticOptions,
    KLOptions,
    LogOptions,
    LossSpec,
    OptimOptions,
    OverlongOptions,
    SegmentOptions,
)
from rftlab.algorithms.ppo import PPO
from rftlab.algorithms.segment_rft import SegmentRFT

__all__ = [
    "DAPO", "GRPO", "PPO", "RFTModule", "SegmentRFT", "AdvantageSpec", "ClipOptions", "CorrectionOptions",
    "CriticOptions", "KLOptions", "LogOptions", "LossSpec", "OptimOptions", "OverlongOptions", "SegmentOptions",
]
