"""PPO with a learned critic, on the shared rollout DataModule.

Classic RLHF-style PPO: the clipped objective of Schulman et al. 2017 (arXiv 1707.06347, eq. 7);
token-level rewards with the verifier's score on the last completion token and an optional per-token
KL penalty to the reference (Ziegler et al. 2019, arXiv 1909.08593, eq. 2; Ouyang et al. 2022,
arXiv 2203.02155, eq. 2); GAE (Schulman et al. 2016, arXiv 1506.02438); the adaptive KL controller
of Ziegler et al. 2019 sec. 2.2; and the implementation details collected by Huang et al. 2024,
"The N+ Implementation Details of RLHF with PPO" (arXiv 2403.17031): value clipping, advantage
whitening over the batch, old log-probs and old values recorded once per rollout.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from rftlab.algorithms.base import DTYPES, RFTModule, _require
from rftlab.core import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    aggregate,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_penalty,
    masked_mean,
    masked_sum,
    masked_var,
    policy_loss,
    selective_log_softmax,
    value_loss,
    whiten,
)
from rftlab.core.arguments import check_choice
from rftlab.models.hf import set_checkpointing
from rftlab.models.loading import load_causal_lm, load_tokenizer
from rftlab.models.policy import adapter_active, add_adapter, apply_lora, completion_forward
from rftlab.models.value_head import ValueHead, completion_state_values, token_values
from rftlab.rollout.rollout import Rollout

#: Critic layouts: a value head on the policy's own trunk; a value head on the policy's base with its
#: own LoRA adapter; a separate model (own weights; own LoRA when ``lora=True``).
CRITICS = ("shared", "adapter", "model")
CRITIC_ADAPTER = "critic"


def token_level_rewards(scores: Tensor, mask: Tensor, kl: Tensor | None = None, kl_coef: float = 0.0) -> Tensor:
    """Per-token rewards of RLHF PPO: the outcome score on the last real token, minus a KL penalty.

    ``r_t = -kl_coef * kl_t + [t == L_i - 1] * score_i`` on real tokens, 0 on padding, where L_i is
    row i's number of real tokens. Summed over t this is Ziegler et al. 2019 eq. 2,
    ``R(x, y) = r(x, y) - beta log(pi(y|x) / rho(y|x))``, with the log-ratio spread over the tokens
    as in Stiennon et al. 2020 / Ouyang et al. 2022 (and TRL's and OpenRLHF's ``compute_rewards``).

    Args:
        scores: (N,) outcome reward of each completion.
        mask: (N, T) 1 on real completion tokens (a prefix of each row).
        kl: (N, T) per-token KL estimate (k1 = logp - ref_logp in classic RLHF), or None.
        kl_coef: >= 0, weight of the KL penalty.

    Returns:
        (N, T) float rewards; a row with no real token is all zeros.
    """
    if scores.dim() != 1 or mask.dim() != 2 or scores.shape[0] != mask.shape[0]:
        raise ValueError(f"scores must be (N,) and mask (N, T), got {tuple(scores.shape)} and {tuple(mask.shape)}")
    if kl is not None and kl.shape != mask.shape:
        raise ValueError(f"kl must be (N, T) = {tuple(mask.shape)}, got {tuple(kl.shape)}")
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    real = mask != 0
    dtype = torch.promote_types(scores.dtype, torch.float32)
    rewards = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    if kl is not None and kl_coef:
        rewards = torch.where(real, -kl_coef * kl.to(dtype), rewards)
    lengths = real.sum(-1)
    last = (lengths - 1).clamp_min(0).unsqueeze(1)
    outcome = torch.where(lengths > 0, scores.to(dtype), torch.zeros((), dtype=dtype, device=mask.device))
    return rewards.scatter_add(1, last, outcome.unsqueeze(1))


class AdaptiveKLController:
    """The adaptive KL coefficient of Ziegler et al. 2019 (arXiv 1909.08593) sec. 2.2.

    After each rollout with measured KL (per sequence, summed over tokens):
    ``e = clip(KL / target - 1, -0.2, 0.2)``, ``beta <- beta * (1 + e * n_steps / horizon)``,
    with ``n_steps`` the number of sequences in the rollout (their ``K_beta = n_steps / horizon``,
    as in lm-human-preferences' and TRL's ``AdaptiveKLController``).

    Args:
        init_coef: > 0, the initial coefficient.
        target: > 0, the KL the controller steers towards (nats per sequence).
        horizon: >= 1, sequences over which a 20 % KL error changes beta by about e^0.2.
    """

    def __init__(self, init_coef: float, target: float, horizon: int) -> None:
        _require(init_coef > 0, "beta", init_coef, f"> 0 with an adaptive KL target (kl_target={target}; the controller scales beta)")
        _require(target > 0, "kl_target", target, "> 0 or None")
        _require(horizon >= 1, "kl_horizon", horizon, ">= 1")
        self.value, self.target, self.horizon = float(init_coef), float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Update and return the coefficient after a rollout of ``n_steps`` sequences."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class PPO(RFTModule):
    """Proximal Policy Optimization with a critic (value head) and token-level rewards.

    Args:
        gamma: discount over completion tokens, in [0, 1].
        lam: GAE lambda, in [0, 1] (1: Monte-Carlo returns minus the value baseline).
        eps_low: lower clip range of the policy ratio.
        eps_high: upper clip range (>= eps_low).
        cliprange_value: clip range of ``V - V_old`` in the value loss; 0 disables value clipping.
        vf_coef: >= 0, weight of the value loss.
        ent_coef: >= 0, weight of the entropy bonus (0: entropy is only logged).
        loss_agg: aggregation of the policy loss, entropy and KL terms ("token-mean" as TRL's PPO).
        whiten_advantages: whiten the GAE advantages over the rollout's real tokens.
        kl_in_reward: put ``beta * k1`` per token into the reward (classic RLHF); False adds
            ``beta * kl_estimator`` as a loss term instead (as GRPO).
        kl_estimator: KL estimator of the loss term ("k1", "k2", "k3"); the reward penalty is k1.
        kl_target: adapt the KL coefficient (starting from ``beta``) towards this KL per sequence
            (Ziegler et al. 2019); None keeps ``beta`` fixed.
        kl_horizon: horizon of the adaptive controller, in sequences.
        critic: "shared" (value head on the policy's trunk: one model in memory, the value loss
            also trains the trunk), "adapter" (own LoRA adapter on the policy's base; needs
            ``lora=True``) or "model" (separate model: own weights, own LoRA when ``lora=True``).
        critic_model: for ``critic="model"``: the critic's model ("default", "tiny", a folder or a hub
            id); None uses the policy's. Its tokenizer must equal the policy's.
        critic_lr: learning rate of the value head and critic weights; None uses ``lr``.
        value_head_init_scale: >= 0, scale of the value head's initial weights (see ``ValueHead``).
        value_warmup_steps: first optimizer steps that train only the critic (the policy, and a
            shared trunk, stay unchanged) so the values are useful before the policy moves.
        **kwargs: policy, LoRA, sampling-group, optimisation and logging options of ``RFTModule``.
    """

    def __init__(
        self,
        gamma: float = 1.0,
        lam: float = 0.95,
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        cliprange_value: float = 0.2,
        vf_coef: float = 0.1,
        ent_coef: float = 0.0,
        loss_agg: str = "token-mean",
        whiten_advantages: bool = True,
        kl_in_reward: bool = True,
        kl_estimator: str = "k3",
        kl_target: float | None = None,
        kl_horizon: int = 10_000,
        critic: str = "shared",
        critic_model: str | None = None,
        critic_lr: float | None = None,
        value_head_init_scale: float = 0.01,
        value_warmup_steps: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _require(0.0 <= gamma <= 1.0, "gamma", gamma, "in [0, 1]")
        _require(0.0 <= lam <= 1.0, "lam", lam, "in [0, 1]")
        _require(eps_low >= 0, "eps_low", eps_low, ">= 0")
        _require(eps_high >= eps_low, "eps_high", eps_high, f">= eps_low ({eps_low})")
        _require(cliprange_value >= 0, "cliprange_value", cliprange_value, ">= 0 (0 disables value clipping)")
        _require(vf_coef >= 0 and math.isfinite(vf_coef), "vf_coef", vf_coef, ">= 0")
        _require(ent_coef >= 0 and math.isfinite(ent_coef), "ent_coef", ent_coef, ">= 0")
        check_choice(AGGREGATIONS, "loss_agg", loss_agg)  # unknown names raise, listing the valid ones
        check_choice(KL_ESTIMATORS, "kl_estimator", kl_estimator)
        _require(critic in CRITICS, "critic", critic, f"one of {', '.join(CRITICS)}")
        _require(critic != "adapter" or self.hparams.lora, "critic", critic, "'shared' or 'model' unless lora=True")
        _require(critic_model is None or critic == "model", "critic_model", critic_model, "None unless critic='model'")
        _require(critic_lr is None or (critic_lr > 0 and math.isfinite(critic_lr)), "critic_lr", critic_lr, "None or > 0")
        _require(isinstance(value_warmup_steps, int) and value_warmup_steps >= 0, "value_warmup_steps", value_warmup_steps, "an integer >= 0")
        self.kl_controller = AdaptiveKLController(self.hparams.beta, kl_target, kl_horizon) if kl_target is not None else None
        if critic_model is not None and critic_model != self.hparams.policy:
            _check_same_tokenizer(self.hparams.policy, critic_model)
        self.save_hyperparameters()
        self.critic: torch.nn.Module | None = None
        self.value_head: ValueHead | None = None

    # ---- the critic ------------------------------------------------------------------------
    def configure_extra_modules(self) -> None:
        hp = self.hparams
        if hp.critic == "model":
            critic = load_causal_lm(hp.critic_model or hp.policy, DTYPES[hp.dtype], vocab_size=len(self.tokenizer), seed=hp.seed)
            if hp.gradient_checkpointing:
                set_checkpointing(critic, True)
            if hp.lora:
                critic = apply_lora(critic, hp.lora_r, hp.lora_alpha, hp.lora_dropout, hp.lora_target_modules)
            self.critic = critic
        elif hp.critic == "adapter":
            add_adapter(self.policy, CRITIC_ADAPTER, hp.lora_r, hp.lora_alpha, hp.lora_dropout, hp.lora_target_modules)
        trunk = self.critic if self.critic is not None else self.policy
        generator = torch.Generator().manual_seed(hp.seed)
        self.value_head = ValueHead(trunk.config.hidden_size, hp.value_head_init_scale, generator=generator)

    def critic_parameters(self) -> list[torch.nn.Parameter]:
        """Trainable parameters of the critic alone (head, separate model, or critic adapter)."""
        params = list(self.value_head.parameters())
        if self.critic is not None:
            params += [p for p in self.critic.parameters() if p.requires_grad]
        elif self.hparams.critic == "adapter":
            params += [p for n, p in self.policy.named_parameters() if f".{CRITIC_ADAPTER}." in n]
        return params

    def optimizer_param_groups(self) -> list[dict[str, Any]]:
        critic = self.critic_parameters()
        ids = {id(p) for p in critic}
        policy = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": policy}, {"params": critic, "lr": self.hparams.critic_lr or self.hparams.lr}]

    @property
    def kl_coef(self) -> float:
        """The current KL coefficient: the adaptive controller's, else ``beta``."""
        return self.kl_controller.value if self.kl_controller is not None else float(self.hparams.beta)

    def policy_and_values(self, batch: Rollout, logits: bool = True, train_policy: bool = True) -> tuple[Tensor | None, Tensor]:
        """(N, T, V) temperature-scaled policy logits (or None) and (N, T) values V(s_t).

        With ``train_policy=False`` (value warm-up) the policy forward carries no gradient, so only
        the critic trains; a shared trunk then feeds the value head detached hidden states.
        """
        shared = self.hparams.critic == "shared"
        inputs = (batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
        out = None
        if logits or shared:
            with torch.set_grad_enabled(torch.is_grad_enabled() and train_policy):
                out = completion_forward(self.policy, *inputs, batch.temperature, logits=logits, hidden=shared,
                                         **self.forward_options)
        if shared:
            state = self.value_head(out.hidden)
        elif self.critic is not None:
            state = completion_state_values(self.critic, self.value_head, *inputs, **self.forward_options)
        else:  # the policy's base with the critic's adapter: generation never sees it
            with adapter_active(self.policy, CRITIC_ADAPTER):
                state = completion_state_values(self.policy, self.value_head, *inputs, **self.forward_options)
        return (out.logits if out is not None else None), token_values(state)

    # ---- scoring a rollout -----------------------------------------------------------------
    def record_sampling_state(self, rollout: Rollout) -> Rollout:
        """Old values (always) and old log-probs (when needed) in one chunked no-grad pass."""
        hp = self.hparams
        need_logp = rollout.num_updates > 1 or (self.needs_reference and (hp.kl_in_reward or self.kl_controller is not None))
        modules = [m for m in (self.policy, self.critic, self.value_head) if m is not None]
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()  # no dropout: the distribution (and critic) that sampled
        logps, values = [], []
        try:
            for i in range(0, len(rollout), hp.logprob_batch_size):
                mb = rollout.select(torch.arange(i, min(i + hp.logprob_batch_size, len(rollout))), trim=False)
                logits, vals = self.policy_and_values(mb, logits=need_logp)
                if need_logp:
                    logps.append(selective_log_softmax(logits, mb.completion_ids).float())
                values.append(vals.float())
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)
        rollout.values = torch.cat(values)
        rollout.old_logp = torch.cat(logps) if need_logp else None
        return rollout

    def compute_advantages(self, rollout: Rollout) -> Rollout:
        hp = self.hparams
        mask = rollout.completion_mask
        metrics: dict[str, float] = {}
        kl = None
        if self.needs_reference and rollout.old_logp is not None:
            kl = kl_penalty(rollout.old_logp, rollout.ref_logp, kind="k1")  # log pi_old - log pi_ref
        coef = self.kl_coef
        in_reward = kl if hp.kl_in_reward else None
        rewards = token_level_rewards(rollout.rewards.float(), mask, in_reward, coef)
        advantages, returns = gae(rewards, rollout.values, mask, hp.gamma, hp.lam)
        metrics["value/mean"] = masked_mean(rollout.values, mask).item()
        metrics["value/explained_variance"] = explained_variance(rollout.values, returns, mask).item()
        metrics["returns/mean"] = masked_mean(returns, mask).item()
        # Raw GAE statistics: after whitening they would be 0 and 1 by construction.
        metrics["advantages/mean"] = masked_mean(advantages, mask).item()
        metrics["advantages/std"] = masked_var(advantages, mask).sqrt().item()
        if in_reward is not None:
            metrics["reward/kl_penalty"] = (coef * masked_sum(kl, mask, dim=-1)).mean().item()
        if self.kl_controller is not None:
            metrics["kl_coef"] = coef
            if kl is not None:
                self.kl_controller.update(self._mean_across_processes(masked_sum(kl, mask, dim=-1).mean()), len(rollout) * self._world_size())
        rollout.advantages = whiten(advantages, mask) if hp.whiten_advantages else advantages
        rollout.returns = returns
        rollout.extras["ppo_metrics"] = metrics
        return rollout

    def _world_size(self) -> int:
        return self._trainer.world_size if self._trainer is not None else 1

    def _mean_across_processes(self, value: Tensor) -> float:
        # Every process must apply the same KL coefficient update.
        if self._world_size() > 1:
            value = self.trainer.strategy.reduce(value, reduce_op="mean")
        return float(value)

    # ---- training --------------------------------------------------------------------------
    def compute_loss(self, batch: Rollout) -> tuple[Tensor, dict[str, Tensor]]:
        hp = self.hparams
        train_policy = self.global_step >= hp.value_warmup_steps
        logits, values = self.policy_and_values(batch, train_policy=train_policy)
        logp = selective_log_softmax(logits, batch.completion_ids)
        old_logp = batch.old_logp if batch.old_logp is not None else logp.detach()
        mask = batch.completion_mask.float()
        p_loss, metrics = policy_loss(logp, old_logp, batch.advantages, mask, eps_low=hp.eps_low, eps_high=hp.eps_high, agg=hp.loss_agg)
        v_loss, v_metrics = value_loss(values, batch.values, batch.returns, mask, clip=hp.cliprange_value)
        metrics.update(v_metrics)
        metrics["loss/policy"] = p_loss.detach()
        metrics["loss/value"] = v_loss.detach()
        loss = hp.vf_coef * v_loss
        if train_policy:
            loss = loss + p_loss + self._regularisers(logits, logp, batch, mask, metrics)
        else:
            metrics["entropy"] = self.token_entropy(logits, batch.completion_mask)
        metrics["value/warmup"] = float(not train_policy)
        metrics["loss/total"] = loss.detach()
        metrics.update(batch.extras.get("ppo_metrics", {}))  # per-rollout statistics
        return loss, metrics

    def _regularisers(self, logits: Tensor, logp: Tensor, batch: Rollout, mask: Tensor, metrics: dict[str, Tensor]) -> Tensor:
        """Entropy bonus and KL-to-reference loss term (each only when its coefficient is > 0)."""
        hp = self.hparams
        extra = logp.new_zeros(())
        if hp.ent_coef > 0:
            entropy = entropy_from_logits(logits)
            extra = extra - hp.ent_coef * aggregate(entropy, mask, hp.loss_agg)
            metrics["entropy"] = masked_mean(entropy.detach(), mask)
        else:
            metrics["entropy"] = self.token_entropy(logits, batch.completion_mask)
        if self.needs_reference:
            kl = kl_penalty(logp, batch.ref_logp, kind="k1" if hp.kl_in_reward else hp.kl_estimator)
            metrics["kl"] = masked_mean(kl.detach(), mask)
            if not hp.kl_in_reward:
                kl_loss = aggregate(kl, mask, hp.loss_agg)
                extra = extra + self.kl_coef * kl_loss
                metrics["loss/kl"] = kl_loss.detach()
        return extra

    # ---- checkpoints -----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.kl_controller is not None:
            checkpoint["kl_controller"] = self.kl_controller.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.kl_controller is not None and "kl_controller" in checkpoint:
            self.kl_controller.load_state_dict(checkpoint["kl_controller"])


def _check_same_tokenizer(policy: str, critic_model: str) -> None:
    """A separate critic reads the policy's token ids: its tokenizer must be the same."""
    ours, theirs = load_tokenizer(policy), load_tokenizer(critic_model)
    same = ours.get_vocab() == theirs.get_vocab() and ours.eos_token_id == theirs.eos_token_id
    if not same:
        raise ValueError(
            f"critic_model={critic_model!r} is invalid: its tokenizer differs from policy={policy!r}'s "
            f"(vocabulary {len(theirs)} vs {len(ours)} tokens); the critic must read the policy's token ids"
        )
