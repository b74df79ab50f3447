"""GRPO: a registered advantage estimator and a registered policy loss, plus a KL term to the reference.

Shao et al. 2024, "DeepSeekMath", arXiv 2402.03300, eq. 3 (objective) and sec. 4.1.2 (outcome
supervision: every token of a completion gets its group-normalised reward). The pieces are chosen
by name from ``rftlab.core``'s registries, so a variant that changes one piece is a registered
function, not a new module: ``GRPO(advantage="dr_grpo")`` (Dr. GRPO, arXiv 2503.20783, with
``loss=LossSpec(agg="seq-mean-token-sum-norm")``), ``GRPO(advantage="rloo")``,
``GRPO(advantage="reinforce_pp_baseline")``, ``GRPO(loss="gspo")``, ``GRPO(loss="cispo")``, or
``GRPO(advantage="my_baseline")`` after ``@register_advantage("my_baseline")``. DAPO and PPO are
GRPO's pieces with other defaults (and, for PPO, a critic).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from rftlab.algorithms.base import RFTModule, _require
from rftlab.algorithms.options import AdvantageSpec, ClipOptions, LossSpec, resolve_spec
from rftlab.core import (
    ADVANTAGE_CONTRACT,
    ADVANTAGE_ESTIMATORS,
    AGGREGATIONS,
    POLICY_LOSS_CONTRACT,
    POLICY_LOSSES,
    adaptive_entropy_coef,
    aggregate,
    call_plugin,
    check_plugin_options,
    correction_gap_metrics,
    correction_weights,
    entropy_bonus_active,
    entropy_from_logits,
    kl_penalty,
    masked_mean,
    masked_sum,
    selective_log_softmax,
    selective_log_softmax_and_entropy,
    takes_input,
    top_entropy_mask,
)
from rftlab.core.options import signature_default
from rftlab.rollout.rollout import Rollout


class GRPO(RFTModule):
    """Group Relative Policy Optimization, built from a registered advantage estimator and policy loss.

    Args:
        advantage: the advantage estimator: a name registered in ``rftlab.core.ADVANTAGE_ESTIMATORS``
            ("grpo": group-normalised, "dr_grpo": mean-centred, "rloo": leave-one-out,
            "reinforce_pp" / "reinforce_pp_baseline": REINFORCE++, "remax": greedy baseline, or
            yours) or an ``AdvantageSpec`` (name and options, e.g.
            ``{"name": "grpo", "options": {"scale": "batch"}}``).
        loss: the policy loss: a name registered in ``rftlab.core.POLICY_LOSSES`` ("ppo_clip",
            "gspo", "gspo_token", "cispo", "sapo", "gmpo", or yours) or a ``LossSpec`` (name,
            token aggregation, truncated-completion mask, entropy controls, rollout correction,
            options); a name keeps this algorithm's default aggregation.
        **kwargs: ``RFTModule`` options (policy, lora, lr, beta, forward, optim, kl, clip, log);
            ``kl.in_reward`` puts the KL into the reward of estimators that take it.
    """

    #: Inputs this algorithm passes to an advantage estimator that names them.
    advantage_inputs: tuple[str, ...] = ("kl", "kl_coef", "baseline_rewards")
    #: Inputs this algorithm passes to a policy loss that names them.
    loss_inputs: tuple[str, ...] = ("eps_low", "eps_high", "dual_clip", "agg", "max_len")
    #: The fewest completions per prompt, for estimators that do not declare ``min_group_size``.
    min_group_size: int = 2
    kl_in_reward_supported = True

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
        _require(not self.kl_options.in_reward or takes_input(self.estimator, "kl"), "kl.in_reward", True,
                 f"False with advantage {adv.name!r}, which takes no KL (estimators that do: "
                 f"{', '.join(n for n in ADVANTAGE_ESTIMATORS.names() if takes_input(ADVANTAGE_ESTIMATORS.get(n), 'kl'))})")
        self._check_clip_is_used()
        self.entropy_coef = float(pl.entropy_coef)  # adapted each step when loss.entropy_target is set
        self.save_hyperparameters()

    @property
    def estimator(self) -> Callable[..., Tensor]:
        """The registered advantage estimator this algorithm runs."""
        return ADVANTAGE_ESTIMATORS.get(self.advantage_spec.name)

    @property
    def needs_greedy_baseline(self) -> bool:
        """Whether the DataModule draws one greedy completion per prompt (ReMax's baseline)."""
        return bool(getattr(self.estimator, "needs_greedy_baseline", False))

    def _check_clip_is_used(self) -> None:
        # A loss with its own ranges (GSPO's sequence clip) ignores the clip group: a changed
        # clip.* would silently do nothing, so it is refused.
        loss, default = POLICY_LOSSES.get(self.loss_spec.name), signature_default(type(self), "clip")
        default = default if isinstance(default, ClipOptions) else ClipOptions()
        for name in ("eps_low", "eps_high", "dual_clip"):
            value = getattr(self.clip_options, name)
            _require(takes_input(loss, name) or value == getattr(default, name), f"clip.{name}", value,
                     f"{getattr(default, name)!r}: loss {self.loss_spec.name!r} does not use the clip group "
                     "(set its own ranges in loss.options)")

    def check_datamodule(self, datamodule: Any) -> None:
        super().check_datamodule(datamodule)
        G = datamodule.num_generations
        need = getattr(self.estimator, "min_group_size", self.min_group_size)
        _require(G >= need, "num_generations", G,
                 f">= {need} for {type(self).__name__} with advantage {self.advantage_spec.name!r} "
                 "(its baseline compares completions of the same prompt)")
        backend = datamodule.sampling.backend
        _require(self.loss_spec.correction.mode == "none" or backend != "vllm", "loss.correction.mode",
                 self.loss_spec.correction.mode,
                 f"'none' with sampler_backend={backend!r} (it does not report the sampler's log-probs yet)")

    # ---- advantages ------------------------------------------------------------------------
    def record_sampling_state(self, rollout: Rollout) -> Rollout:
        """Old log-probs when the rollout feeds several updates or the KL goes into the reward."""
        if rollout.num_updates > 1 or (self.needs_reference and self.kl_options.in_reward):
            rollout.old_logp = self.batched_logprobs(rollout)
        return rollout

    def _rollout_kl(self, rollout: Rollout) -> Tensor | None:
        # log pi_old - log pi_ref per token (k1): the KL put into the reward (Ziegler et al. 2019, eq. 2)
        if self.needs_reference and rollout.old_logp is not None:
            return kl_penalty(rollout.old_logp, rollout.ref_logp, kind="k1")
        return None

    def advantage_context(self, rollout: Rollout) -> dict[str, Any]:
        """Hook: the inputs named in ``advantage_inputs``, computed for this rollout."""
        kl = self._rollout_kl(rollout) if self.kl_options.in_reward else None
        return {"kl": kl, "kl_coef": self.kl_coef, "baseline_rewards": rollout.baseline_rewards}

    def compute_advantages(self, rollout: Rollout) -> Rollout:
        spec = self.advantage_spec
        args = (rollout.rewards.float(), rollout.group_size, rollout.completion_mask)
        context = self.advantage_context(rollout)
        adv = call_plugin(self.estimator, args, context, spec.options)
        if context.get("kl") is not None and self.kl_coef:
            penalty = self.kl_coef * masked_sum(context["kl"], rollout.completion_mask, dim=-1)
            rollout.metrics["reward/kl_penalty"] = penalty.mean().item()
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

    def token_advantages(self, batch: Rollout, old_logp: Tensor, entropy: Tensor | None,
                         mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The (N, T) advantages the loss sees: rollout correction and entropy masking applied.

        Both multiply a token's advantage (by its importance weight, by its 0/1 entropy mask), which
        multiplies its loss term for every loss linear in the advantage.

        Args:
            batch: the minibatch.
            old_logp: (N, T) the trainer's log-probs of the sampling policy.
            entropy: (N, T) detached token entropies, needed with ``loss.top_entropy_quantile < 1``.
            mask: (N, T) the loss mask.

        Returns:
            ``(advantages, metrics)``: (N, T) advantages and the detached ``rollout_correction/*``
            and ``entropy/kept_*`` metrics.
        """
        spec, metrics = self.loss_spec, {}
        advantages = batch.advantages
        if batch.sampler_logp is not None:
            correction = spec.correction
            if correction.mode == "none":
                metrics.update(correction_gap_metrics(old_logp, batch.sampler_logp, mask))
            else:
                weights, found = correction_weights(old_logp, batch.sampler_logp, mask, correction.mode,
                                                    cap=correction.cap, low=correction.low, high=correction.high)
                advantages = advantages * weights.to(advantages.dtype)
                metrics.update(found)
        if spec.top_entropy_quantile < 1:
            keep = top_entropy_mask(entropy, mask, spec.top_entropy_quantile)
            advantages = advantages * keep.to(advantages.dtype)
            metrics["entropy/kept_share"] = masked_mean(keep, mask)
            metrics["entropy/kept_mean"] = masked_mean(entropy, keep * mask)
        return advantages, metrics

    def policy_objective(self, logits: Tensor, batch: Rollout, kl_in_loss: bool = True,
                         kl_kind: str | None = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The registered policy loss, the KL term and the entropy controls of one minibatch.

        Args:
            logits: (N, T, V) temperature-scaled policy logits (with grad).
            batch: the minibatch.
            kl_in_loss: add ``beta * KL`` to the loss (False when the KL is in the reward).
            kl_kind: the KL estimator of the term and the ``kl`` metric; None uses ``kl.estimator``.

        Returns:
            ``(loss, logp, metrics)``: the 0-dim loss, the (N, T) log-probs, detached metrics.
        """
        spec, clip = self.loss_spec, self.clip_options
        coef, adaptive = self.entropy_coef, spec.entropy_target is not None
        bonus = coef > 0 or adaptive
        monitored = None  # the entropy metric, from the log-softmax the log-probs need anyway
        if bonus or spec.top_entropy_quantile < 1:
            logp = selective_log_softmax(logits, batch.completion_ids)
            entropy = entropy_from_logits(logits)
            if not bonus:
                entropy = entropy.detach()
        else:
            logp, monitored = selective_log_softmax_and_entropy(logits, batch.completion_ids)
            entropy = None
        old_logp = batch.old_logp if batch.old_logp is not None else logp.detach()  # one update: no old forward
        mask = self.loss_mask(batch)
        advantages, metrics = self.token_advantages(batch, old_logp, None if entropy is None else entropy.detach(), mask)
        # The generation budget is the constant of Dr. GRPO's "seq-mean-token-sum-norm" (arXiv 2503.20783
        # §3.2; TRL's max_completion_length, verl's padded response length), whatever this batch's longest reply.
        max_len = batch.max_new_tokens
        supplied = {"eps_low": clip.eps_low, "eps_high": clip.eps_high, "dual_clip": clip.dual_clip, "agg": spec.agg,
                    "max_len": max_len}
        loss, loss_metrics = call_plugin(POLICY_LOSSES.get(spec.name), (logp, old_logp, advantages, mask),
                                         supplied, spec.options)
        metrics.update(loss_metrics)
        metrics["loss/policy"] = loss.detach()
        if self.needs_reference:
            kl = kl_penalty(logp, batch.ref_logp, kind=kl_kind or self.kl_options.estimator)
            metrics["kl"] = masked_mean(kl.detach(), batch.completion_mask)
            if kl_in_loss:
                kl_loss = aggregate(kl, mask, spec.agg, max_len)
                loss = loss + self.kl_coef * kl_loss
                metrics["loss/kl"] = kl_loss.detach()
        if entropy is None:
            metrics["entropy"] = masked_mean(monitored, batch.completion_mask)
        else:
            metrics["entropy"] = masked_mean(entropy.detach(), mask)
        if adaptive:
            # Skywork-OR1 (arXiv 2505.22312, sec. 3.3): the bonus applies only while the entropy is at or
            # below the target, and the coefficient moves by entropy_step towards it after each step.
            measured = self._mean_across_processes(metrics["entropy"])
            metrics["entropy/coef"] = torch.tensor(coef)
            self.entropy_coef = adaptive_entropy_coef(coef, measured, spec.entropy_target, spec.entropy_step,
                                                      spec.entropy_max_coef)
            coef = coef if entropy_bonus_active(measured, spec.entropy_target) else 0.0
        if coef > 0:  # entropy bonus: maximise the policy's entropy on the loss tokens
            loss = loss - coef * aggregate(entropy, mask, spec.agg, max_len)
        return loss, logp, metrics

    def _mean_across_processes(self, value: Tensor) -> float:
        # State every process updates from a measured value (a coefficient) must stay identical.
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            value = trainer.strategy.reduce(value.detach().clone(), reduce_op="mean")
        return float(value)

    def compute_loss(self, batch: Rollout) -> tuple[Tensor, dict[str, Tensor]]:
        in_reward = self.kl_options.in_reward
        loss, _, metrics = self.policy_objective(self.policy_logits(batch), batch, kl_in_loss=not in_reward,
                                                 kl_kind="k1" if in_reward else None)
        metrics["loss/total"] = loss.detach()
        if batch.seq_advantages is not None:
            metrics["advantages/abs_mean"] = batch.seq_advantages.abs().mean()
        else:
            metrics["advantages/abs_mean"] = masked_mean(batch.advantages.abs(), batch.completion_mask)
        return loss, metrics

    # ---- checkpoints -----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.loss_spec.entropy_target is not None:
            checkpoint["entropy_coef"] = self.entropy_coef

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.loss_spec.entropy_target is not None and "entropy_coef" in checkpoint:
            self.entropy_coef = float(checkpoint["entropy_coef"])
