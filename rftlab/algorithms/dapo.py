"""DAPO: GRPO with a token-level loss, clip-higher, dynamic sampling and overlong reward shaping.

Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", arXiv 2503.14476:
- Clip-Higher (sec. 3.1): ``clip.eps_high = 0.28 > clip.eps_low = 0.2``, so low-probability tokens can rise.
- Dynamic Sampling (sec. 3.2): groups whose rewards are all equal carry no gradient; the shared
  RolloutDataModule drops them and samples more (``prefers_dynamic_sampling``).
- Token-Level Policy Gradient Loss (sec. 3.3): ``LossSpec(agg="token-mean")``, so long answers weigh
  by their token count instead of being averaged away per sequence.
- Overlong Reward Shaping (sec. 3.4, eq. 13): a soft length penalty inside the last
  ``overlong.buffer_len`` tokens of the budget; ``LossSpec(mask_truncated=True)`` is Overlong Filtering.
Every change but the overlong penalty is also an option of ``GRPO``, so each can be ablated alone.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from rftlab.algorithms.base import _require
from rftlab.algorithms.grpo import GRPO
from rftlab.algorithms.options import AdvantageSpec, ClipOptions, LossSpec, OverlongOptions
from rftlab.core import overlong_penalty
from rftlab.rollout.rollout import Rollout


class DAPO(GRPO):
    """Decoupled Clip and Dynamic sAmpling Policy Optimization: GRPO's pieces with DAPO's defaults.

    Args:
        advantage: the advantage estimator (as ``GRPO``).
        loss: the policy loss (as ``GRPO``); DAPO's aggregation is "token-mean", and
            ``LossSpec(mask_truncated=True)`` is its Overlong Filtering.
        clip: clip ranges; DAPO's clip-higher is eps_low 0.2, eps_high 0.28.
        beta: KL coefficient; DAPO drops the KL term (0: no reference model is run).
        overlong: the soft overlong penalty added to the reward (``OverlongOptions``).
        **kwargs: ``RFTModule`` options (policy, lora, lr, forward, optim, kl, log).
    """

    prefers_dynamic_sampling = True  # the DataModule's dynamic_sampling=None follows this

    def __init__(
        self,
        advantage: str | AdvantageSpec = AdvantageSpec(name="grpo"),
        loss: str | LossSpec = LossSpec(agg="token-mean"),
        clip: ClipOptions = ClipOptions(eps_low=0.2, eps_high=0.28),
        beta: float = 0.0,
        overlong: OverlongOptions = OverlongOptions(),
        **kwargs: Any,
    ) -> None:
        super().__init__(advantage=advantage, loss=loss, clip=clip, beta=beta, **kwargs)
        self.overlong = self.option_group("overlong", overlong, OverlongOptions)
        self.save_hyperparameters()

    def check_datamodule(self, datamodule: Any) -> None:
        super().check_datamodule(datamodule)
        over = self.overlong
        max_len = over.max_len or datamodule.sampling.max_new_tokens
        _require(not over.buffer_len or over.buffer_len < max_len, "overlong.buffer_len", over.buffer_len,
                 f"< the maximum length {max_len} (overlong.max_len, or the DataModule's max_new_tokens)")

    def _overlong(self, rollout: Rollout) -> Tensor | None:
        """Per-sequence soft overlong penalty (N,), or None when disabled."""
        over = self.overlong
        if over.buffer_len == 0:
            return None
        max_len = over.max_len or rollout.max_new_tokens or rollout.completion_ids.shape[1]
        lengths = rollout.completion_lengths.float()
        return over.penalty_factor * overlong_penalty(lengths, int(max_len), over.buffer_len)

    def shape_rewards(self, rollout: Rollout) -> Tensor:
        penalty = self._overlong(rollout)
        if penalty is None:
            return rollout.rewards
        return rollout.rewards + penalty.to(rollout.rewards.dtype)

    def compute_loss(self, batch: Rollout) -> tuple[Tensor, dict[str, Tensor]]:
        loss, metrics = super().compute_loss(batch)
        penalty = self._overlong(batch)
        if penalty is not None:
            metrics["overlong/penalty_mean"] = penalty.mean()
            metrics["overlong/penalized_ratio"] = (penalty < 0).float().mean()
        return loss, metrics
