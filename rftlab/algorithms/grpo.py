"""GRPO: a registered advantage estimator and a registered policy loss, plus a KL term to the reference.

Shao et al. 2024, "DeepSeekMath", arXiv 2402.03300, eq. 3 (objective) and sec. 4.1.2 (outcome
supervision: every token of a completion gets its group-normalised reward). The pieces are chosen
by name from ``rftlab.core``'s registries, so a variant that changes one piece is a registered
function, not a new module: ``GRPO(advantage="dr_grpo")`` (Dr. GRPO, arXiv 2503.20783, with
``loss=LossSpec(agg="seq-mean-token-sum-norm")``), ``GRPO(advantage="my_baseline")`` after
``@register_advantage("my_baseline")``. DAPO and PPO are GRPO's pieces with other defaults (and,
for PPO, a critic).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from rftlab.algorithms.base import RFTModule, _require
from rftlab.algorithms.options import AdvantageSpec, LossSpec, resolve_spec
from rftlab.core import (
    ADVANTAGE_CONTRACT,
    ADVANTAGE_ESTIMATORS,
    AGGREGATIONS,
    POLICY_LOSS_CONTRACT,
    POLICY_LOSSES,
    aggregate,
    call_plugin,
    check_plugin_options,
    entropy_from_logits,
    kl_penalty,
    masked_mean,
    selective_log_softmax,
)
from rftlab.core.options import signature_default
from rftlab.rollout.rollout import Rollout


class GRPO(RFTModule):
    """Group Relative Policy Optimization, built from a registered advantage estimator and policy loss.

    Args:
        advantage: the advantage estimator: a name registered in ``rftlab.core.ADVANTAGE_ESTIMATORS``
            ("grpo": group-normalised, "dr_grpo": mean-centred, or yours) or an ``AdvantageSpec``
            (name and options, e.g. ``{"name": "grpo", "options": {"scale": "batch"}}``).
        loss: the policy loss: a name registered in ``rftlab.core.POLICY_LOSSES`` ("ppo_clip" or
            yours) or a ``LossSpec`` (name, token aggregation, truncated-completion mask, entropy
            bonus, options); a name keeps this algorithm's default aggregation.
        **kwargs: ``RFTModule`` options (policy, lora, lr, beta, forward, optim, kl, clip, log).
    """

    #: Inputs this algorithm passes to an advantage estimator that names them.
    advantage_inputs: tuple[str, ...] = ()
    #: Inputs this algorithm passes to a policy loss that names them.
    loss_inputs: tuple[str, ...] = ("eps_low", "eps_high", "dual_clip", "agg")
    #: The fewest completions per prompt the algorithm's advantages make sense with.
    min_group_size: int = 2

    def __init__(self, advantage: str | AdvantageSpec = AdvantageSpec(name="grpo"),
                 loss: str | LossSpec = LossSpec(agg="seq-mean-token-mean"),
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.advantage_spec = self._groups["advantage"] = resolve_spec(
            advantage, signature_default(type(self), "advantage"), AdvantageSpec)
        self.loss_spec = self._groups["loss"] = resolve_spec(loss, signature_default(type(self), "loss"), LossSpec)
        adv, pl = self.advantage_spec, self.loss_spec
        for spec, registry, contract, supplied in ((adv, ADVANTAGE_ESTIMATORS, ADVANTAGE_CONTRACT, self.advantage_inputs),
                                                   (pl, POLICY_LOSSES, POLICY_LOSS_CONTRACT, self.loss_inputs)):
            _require(spec.name in registry, f"{spec.group}.name", spec.name, f"one of {', '.join(registry.names())}")
            check_plugin_options(registry.get(spec.name), spec.group, spec.name, contract, spec.options, supplied,
                                 f"{spec.group}.options")
        _require(pl.agg in AGGREGATIONS, "loss.agg", pl.agg, f"one of {', '.join(AGGREGATIONS.names())}")
        self.save_hyperparameters()

    def check_datamodule(self, datamodule: Any) -> None:
        G = datamodule.num_generations
        _require(G >= self.min_group_size, "num_generations", G,
                 f">= {self.min_group_size} for {type(self).__name__} with advantage {self.advantage_spec.name!r} "
                 "(group-relative advantages need at least two completions per prompt)")

    # ---- advantages ------------------------------------------------------------------------
    def advantage_context(self, rollout: Rollout) -> dict[str, Any]:
        """Hook: the inputs named in ``advantage_inputs``, computed for this rollout."""
        return {}

    def compute_advantages(self, rollout: Rollout) -> Rollout:
        spec = self.advantage_spec
        estimator = ADVANTAGE_ESTIMATORS.get(spec.name)
        args = (rollout.rewards.float(), rollout.group_size, rollout.completion_mask)
        adv = call_plugin(estimator, args, self.advantage_context(rollout), spec.options)
        if adv.dim() == 1:  # outcome supervision: each completion's advantage is every token's
            rollout.seq_advantages = adv
            adv = adv.unsqueeze(1).expand_as(rollout.completion_mask).contiguous()
        rollout.advantages = self.transform_advantages(rollout, adv)
        return rollout

    def transform_advantages(self, rollout: Rollout, advantages: Tensor) -> Tensor:
        """Hook: (N, T) advantages after the estimator, before training (PPO whitens and keeps returns)."""
        return advantages

    # ---- the loss --------------------------------------------------------------------------
    @property
    def kl_coef(self) -> float:
        """The KL term's coefficient: ``beta`` (PPO's adaptive controller overrides it)."""
        return self.beta

    def loss_mask(self, batch: Rollout) -> Tensor:
        """Tokens that carry loss: the completion mask, minus truncated completions if asked (DAPO)."""
        mask = batch.completion_mask.float()
        if self.loss_spec.mask_truncated:
            mask = mask * (~batch.truncated).float().unsqueeze(1)
        return mask

    def policy_objective(self, logits: Tensor, batch: Rollout, kl_in_loss: bool = True,
                         kl_kind: str | None = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The registered policy loss, the KL term and the entropy bonus of one minibatch.

        Args:
            logits: (N, T, V) temperature-scaled policy logits (with grad).
            batch: the minibatch.
            kl_in_loss: add ``beta * KL`` to the loss (False when the KL is in the reward).
            kl_kind: the KL estimator of the term and the ``kl`` metric; None uses ``kl.estimator``.

        Returns:
            ``(loss, logp, metrics)``: the 0-dim loss, the (N, T) log-probs, detached metrics.
        """
        spec, clip = self.loss_spec, self.clip_options
        logp = selective_log_softmax(logits, batch.completion_ids)
        old_logp = batch.old_logp if batch.old_logp is not None else logp.detach()  # one update: no old forward
        mask = self.loss_mask(batch)
        supplied = {"eps_low": clip.eps_low, "eps_high": clip.eps_high, "dual_clip": clip.dual_clip, "agg": spec.agg}
        loss, metrics = call_plugin(POLICY_LOSSES.get(spec.name), (logp, old_logp, batch.advantages, mask),
                                    supplied, spec.options)
        metrics = dict(metrics)
        metrics["loss/policy"] = loss.detach()
        if self.needs_reference:
            kl = kl_penalty(logp, batch.ref_logp, kind=kl_kind or self.kl_options.estimator)
            metrics["kl"] = masked_mean(kl.detach(), batch.completion_mask)
            if kl_in_loss:
                kl_loss = aggregate(kl, mask, spec.agg)
                loss = loss + self.kl_coef * kl_loss
                metrics["loss/kl"] = kl_loss.detach()
        if spec.entropy_coef > 0:  # entropy bonus: maximise the policy's entropy on the loss tokens
            entropy = entropy_from_logits(logits)
            loss = loss - spec.entropy_coef * aggregate(entropy, mask, spec.agg)
            metrics["entropy"] = masked_mean(entropy.detach(), mask)
        else:
            metrics["entropy"] = self.token_entropy(logits, batch.completion_mask)
        return loss, logp, metrics

    def compute_loss(self, batch: Rollout) -> tuple[Tensor, dict[str, Tensor]]:
        loss, _, metrics = self.policy_objective(self.policy_logits(batch), batch)
        metrics["loss/total"] = loss.detach()
        if batch.seq_advantages is not None:
            metrics["advantages/abs_mean"] = batch.seq_advantages.abs().mean()
        return loss, metrics

