"""GRPO: group-relative advantages with the PPO clipped objective and a k3 KL to the reference.

Shao et al. 2024, "DeepSeekMath", arXiv 2402.03300, eq. 3 (objective) and sec. 4.1.2 (outcome
supervision: every token of a completion gets its group-normalised reward). Dr. GRPO (Liu et al.
2025, arXiv 2503.20783) is ``scale="none", loss_agg="seq-mean-token-sum-norm"``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from rftlab.algorithms.base import RFTModule, _require
from rftlab.core import (
    ADVANTAGE_SCALES,
    AGGREGATIONS,
    KL_ESTIMATORS,
    aggregate,
    group_advantages,
    kl_penalty,
    masked_mean,
    policy_loss,
    selective_log_softmax,
)
from rftlab.core.arguments import check_choice
from rftlab.rollout.rollout import Rollout


class GRPO(RFTModule):
    """Group Relative Policy Optimization.

    Args:
        scale: advantage normalisation: "group" (std of the group, DeepSeekMath), "batch" (std of
            the whole rollout) or "none" (mean-centred only, Dr. GRPO).
        loss_agg: loss aggregation: "seq-mean-token-mean" (GRPO), "token-mean" (DAPO),
            "seq-mean-token-sum", "seq-mean-token-sum-norm" (Dr. GRPO).
        eps_low: lower clip range (ratio >= 1 - eps_low).
        eps_high: upper clip range (ratio <= 1 + eps_high); > eps_low is DAPO's clip-higher.
        dual_clip: dual-clip constant c > 1 for negative advantages (None disables).
        kl_estimator: per-token KL estimator to the reference: "k1", "k2" or "k3".
        mask_truncated_completions: truncated completions (no EOS) contribute no loss (DAPO).
        **kwargs: policy, LoRA, optimisation and logging options of ``RFTModule``.
    """

    def __init__(
        self,
        scale: str = "group",
        loss_agg: str = "seq-mean-token-mean",
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        dual_clip: float | None = None,
        kl_estimator: str = "k3",
        mask_truncated_completions: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_choice(ADVANTAGE_SCALES, "scale", scale)  # unknown names raise, listing the valid ones
        check_choice(AGGREGATIONS, "loss_agg", loss_agg)
        check_choice(KL_ESTIMATORS, "kl_estimator", kl_estimator)
        _require(eps_low >= 0, "eps_low", eps_low, ">= 0")
        _require(eps_high >= eps_low, "eps_high", eps_high, f">= eps_low ({eps_low})")
        _require(dual_clip is None or dual_clip > 1, "dual_clip", dual_clip, "None or > 1")
        _require(self.num_generations >= 2, "num_generations", self.num_generations,
                 ">= 2 (group-relative advantages need at least two completions per prompt)")
        self.save_hyperparameters()

    def compute_advantages(self, rollout: Rollout) -> Rollout:
        # Outcome supervision: each completion's normalised reward is every token's advantage.
        adv = group_advantages(rollout.rewards.float(), self.num_generations, scale=self.hparams.scale)
        rollout.seq_advantages = adv
        rollout.advantages = adv.unsqueeze(1).expand_as(rollout.completion_mask).contiguous()
        return rollout

    def loss_mask(self, batch: Rollout) -> Tensor:
        """Tokens that carry loss: the completion mask, minus truncated completions if asked (DAPO)."""
        mask = batch.completion_mask.float()
        if self.hparams.mask_truncated_completions:
            mask = mask * (~batch.truncated).float().unsqueeze(1)
        return mask

    def compute_loss(self, batch: Rollout) -> tuple[Tensor, dict[str, Tensor]]:
        hp = self.hparams
        logits = self.policy_logits(batch)
        logp = selective_log_softmax(logits, batch.completion_ids)
        old_logp = batch.old_logp if batch.old_logp is not None else logp.detach()
        mask = self.loss_mask(batch)
        loss, metrics = policy_loss(
            logp, old_logp, batch.advantages, mask,
            eps_low=hp.eps_low, eps_high=hp.eps_high, agg=hp.loss_agg, dual_clip=hp.dual_clip,
        )
        metrics["loss/policy"] = loss.detach()
        if self.needs_reference:
            kl = kl_penalty(logp, batch.ref_logp, kind=hp.kl_estimator)
            kl_loss = aggregate(kl, mask, hp.loss_agg)
            loss = loss + hp.beta * kl_loss
            metrics["kl"] = masked_mean(kl.detach(), batch.completion_mask)
            metrics["loss/kl"] = kl_loss.detach()
        metrics["entropy"] = self.token_entropy(logits, batch.completion_mask)
        metrics["loss/total"] = loss.detach()
        if batch.seq_advantages is not None:
            metrics["advantages/abs_mean"] = batch.seq_advantages.abs().mean()
        return loss, metrics
