"""DAPO: GRPO with a token-level loss, clip-higher, dynamic sampling and overlong reward shaping.

Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", arXiv 2503.14476:
- Clip-Higher (sec. 3.1): ``eps_high = 0.28 > eps_low = 0.2``, so low-probability tokens can rise.
- Dynamic Sampling (sec. 3.2): groups whose rewards are all equal carry no gradient; the shared
  RolloutDataModule drops them and samples more (``prefers_dynamic_sampling``).
- Token-Level Policy Gradient Loss (sec. 3.3): ``loss_agg="token-mean"``, so long answers weigh
  by their token count instead of being averaged away per sequence.
- Overlong Reward Shaping (sec. 3.4, eq. 13): a soft length penalty inside the last
  ``overlong_buffer_len`` tokens of the budget; ``mask_truncated_completions`` is Overlong Filtering.
Every change is also an option of ``GRPO``, so each can be ablated alone.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from rftlab.algorithms.base import _require
from rftlab.algorithms.grpo import GRPO
from rftlab.core import overlong_penalty
from rftlab.rollout.rollout import Rollout


class DAPO(GRPO):
    """Decoupled Clip and Dynamic sAmpling Policy Optimization.

    Args:
        loss_agg: "token-mean" (DAPO); any GRPO aggregation for ablations.
        eps_low: lower clip range.
        eps_high: upper clip range, > eps_low (clip-higher).
        overlong_buffer_len: length of the soft-penalty window (DAPO's L_cache) in tokens; 0 disables.
        overlong_max_len: the hard length L_max; None uses the DataModule's ``max_new_tokens``.
        overlong_penalty_factor: scale of the penalty added to the reward (1.0 in the paper).
        mask_truncated_completions: truncated completions contribute no loss (Overlong Filtering).
        dynamic_sampling: what the DataModule does when its own ``dynamic_sampling`` is None.
        **kwargs: GRPO / RFTModule options (policy, lora, num_generations, lr, beta, ...).
    """

    def __init__(
        self,
        loss_agg: str = "token-mean",
        eps_low: float = 0.2,
        eps_high: float = 0.28,
        overlong_buffer_len: int = 0,
        overlong_max_len: int | None = None,
        overlong_penalty_factor: float = 1.0,
        mask_truncated_completions: bool = False,
        dynamic_sampling: bool = True,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("beta", 0.0)  # DAPO drops the KL term: no reference model is run
        super().__init__(
            loss_agg=loss_agg, eps_low=eps_low, eps_high=eps_high,
            mask_truncated_completions=mask_truncated_completions, **kwargs,
        )
        _require(overlong_buffer_len >= 0, "overlong_buffer_len", overlong_buffer_len, ">= 0 (0 disables)")
        if overlong_max_len is not None:
            _require(overlong_buffer_len < overlong_max_len, "overlong_buffer_len", overlong_buffer_len,
                     f"< overlong_max_len ({overlong_max_len})")
        _require(overlong_penalty_factor >= 0, "overlong_penalty_factor", overlong_penalty_factor, ">= 0")
        self.prefers_dynamic_sampling = dynamic_sampling
        self.save_hyperparameters()

    def check_datamodule(self, datamodule: Any) -> None:
        hp = self.hparams
        max_len = hp.overlong_max_len or datamodule.sampling.max_new_tokens
        if hp.overlong_buffer_len and hp.overlong_buffer_len >= max_len:
            raise ValueError(
                f"overlong_buffer_len={hp.overlong_buffer_len} must be < the maximum length {max_len} "
                "(overlong_max_len, or the DataModule's max_new_tokens)"
            )

    def _overlong(self, rollout: Rollout) -> Tensor | None:
        """Per-sequence soft overlong penalty (N,), or None when disabled."""
        hp = self.hparams
        if hp.overlong_buffer_len == 0:
            return None
        max_len = hp.overlong_max_len or int(rollout.extras.get("max_new_tokens", rollout.completion_ids.shape[1]))
        lengths = rollout.completion_lengths.float()
        return hp.overlong_penalty_factor * overlong_penalty(lengths, max_len, hp.overlong_buffer_len)

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
