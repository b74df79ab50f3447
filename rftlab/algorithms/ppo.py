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

from typing import Any

import torch
from torch import Tensor

from rftlab.algorithms.grpo import GRPO
from rftlab.algorithms.base import _require
from rftlab.algorithms.options import AdvantageSpec, CriticOptions, KLOptions, LossSpec
from rftlab.core import (
    explained_variance,
    masked_mean,
    masked_sum,
    masked_var,
    selective_log_softmax,
    token_level_rewards,
    value_loss,
    whiten,
)
from rftlab.models.build import build_policy
from rftlab.models.hf import evaluation_mode
from rftlab.models.loading import load_tokenizer
from rftlab.models.policy import adapter_active, add_adapter
from rftlab.models.sharding import shard_model, shard_module
from rftlab.models.value_head import ValueHead, completion_state_values, token_values
from rftlab.rollout.rollout import Rollout

CRITIC_ADAPTER = "critic"

__all__ = ["PPO", "AdaptiveKLController", "token_level_rewards"]


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
        _require(init_coef > 0, "beta", init_coef, f"> 0 with an adaptive KL target (kl.target={target}; the controller scales beta)")
        _require(target > 0, "kl.target", target, "> 0 or None")
        _require(horizon >= 1, "kl.horizon", horizon, ">= 1")
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


class PPO(GRPO):
    """Proximal Policy Optimization with a critic (value head): GRPO's pieces with GAE and a learned baseline.

    Args:
        advantage: the advantage estimator; "gae" (default: ``{"gamma": 1.0, "lam": 0.95}`` in its
            options) reads the critic's values and the KL put into the reward.
        loss: the policy loss (as ``GRPO``); PPO's aggregation is "token-mean" (as TRL's PPO), and
            ``LossSpec(entropy_coef=...)`` adds an entropy bonus.
        kl: KL options; ``in_reward`` (default here) puts ``beta * k1`` per token into the reward
            (classic RLHF), ``target`` adapts beta (Ziegler et al. 2019).
        critic: the critic (``CriticOptions``: kind, model, lr, vf_coef, value_clip, warm-up, whitening).
        **kwargs: ``RFTModule`` options (policy, lora, lr, beta, forward, optim, clip, log).
    """

    advantage_inputs = ("values", "kl", "kl_coef", "baseline_rewards")
    min_group_size = 1
    kl_target_supported = True

    def __init__(
        self,
        advantage: str | AdvantageSpec = AdvantageSpec(name="gae"),
        loss: str | LossSpec = LossSpec(agg="token-mean"),
        kl: KLOptions = KLOptions(in_reward=True),
        critic: CriticOptions = CriticOptions(),
        **kwargs: Any,
    ) -> None:
        super().__init__(advantage=advantage, loss=loss, kl=kl, **kwargs)
        self.critic_options = crit = self.option_group("critic", critic, CriticOptions)
        _require(crit.kind != "adapter" or self.policy_spec.lora, "critic.kind", crit.kind, "'shared' or 'model' unless lora=True")
        target = self.kl_options.target
        self.kl_controller = AdaptiveKLController(self.beta, target, self.kl_options.horizon) if target is not None else None
        if crit.model is not None and crit.model != self.policy_spec.model:
            _check_same_tokenizer(self.policy_spec.model, crit.model)
        self.save_hyperparameters()
        self.critic: torch.nn.Module | None = None
        self.value_head: ValueHead | None = None

    # ---- the critic ------------------------------------------------------------------------
    def configure_extra_modules(self) -> None:
        crit, spec = self.critic_options, self.policy_spec
        if crit.kind == "model":
            # Built like the policy (dtype, quantization, LoRA, checkpointing); another base model
            # does not start from the policy's init checkpoint.
            other = crit.model is not None and crit.model != spec.model
            critic_spec = spec.replace(model=crit.model or spec.model, init_checkpoint=None if other else spec.init_checkpoint)
            self.critic = build_policy(critic_spec, vocab_size=len(self.tokenizer), device=self._policy_device())
        elif crit.kind == "adapter":
            add_adapter(self.policy, CRITIC_ADAPTER, spec.lora_r, spec.lora_alpha, spec.lora_dropout, spec.lora_target_modules)
        trunk = self.critic if self.critic is not None else self.policy
        generator = torch.Generator().manual_seed(spec.seed)
        self.value_head = ValueHead(trunk.config.hidden_size, crit.head_init_scale, generator=generator)

    def shard_extra_modules(self, mesh: Any) -> None:
        """The critic model (layer by layer, when separate) and the value head (one unit)."""
        if self.critic is not None:
            shard_model(self.critic, mesh, **self.sharding_options())
        shard_module(self.value_head, mesh)

    def critic_parameters(self) -> list[torch.nn.Parameter]:
        """Trainable parameters of the critic alone (head, separate model, or critic adapter)."""
        params = list(self.value_head.parameters())
        if self.critic is not None:
            params += [p for p in self.critic.parameters() if p.requires_grad]
        elif self.critic_options.kind == "adapter":
            params += [p for n, p in self.policy.named_parameters() if f".{CRITIC_ADAPTER}." in n]
        return params

    def optimizer_param_groups(self) -> list[dict[str, Any]]:
        critic = self.critic_parameters()
        ids = {id(p) for p in critic}
        policy = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": policy}, {"params": critic, "lr": self.critic_options.lr or self.hparams.lr}]

    @property
    def kl_coef(self) -> float:
        """The current KL coefficient: the adaptive controller's, else ``beta``."""
        return self.kl_controller.value if self.kl_controller is not None else self.beta

    def policy_and_values(self, batch: Rollout, logits: bool = True, train_policy: bool = True) -> tuple[Tensor | None, Tensor]:
        """(N, T, V) temperature-scaled policy logits (or None) and (N, T) values V(s_t).

        With ``train_policy=False`` (value warm-up) the policy forward carries no gradient, so only
        the critic trains; a shared trunk then feeds the value head detached hidden states.
        """
        shared = self.critic_options.kind == "shared"
        inputs = (batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.attention_mask)
        out = None
        if logits or shared:
            with torch.set_grad_enabled(torch.is_grad_enabled() and train_policy):
                out = self.runtime.forward(self.policy, *inputs, batch.temperature, logits=logits, hidden=shared)
        layout = {"share_prompt": self.forward_options.share_prompt, "packing": self.forward_options.packing,
                  "packed_attention": self.forward_options.packed_attention}
        if shared:
            state = self.value_head(out.hidden)
        elif self.critic is not None:
            state = completion_state_values(self.critic, self.value_head, *inputs, **layout)
        else:  # the policy's base with the critic's adapter: generation never sees it
            with adapter_active(self.policy, CRITIC_ADAPTER):
                state = completion_state_values(self.policy, self.value_head, *inputs, **layout)
        return (out.logits if out is not None else None), token_values(state)

    # ---- scoring a rollout -----------------------------------------------------------------
    def record_sampling_state(self, rollout: Rollout) -> Rollout:
        """Old values (always) and old log-probs (when needed) in one chunked no-grad pass."""
        kl = self.kl_options
        need_logp = rollout.num_updates > 1 or (self.needs_reference and (kl.in_reward or self.kl_controller is not None))
        logps, values = [], []
        # no dropout: the distribution (and critic) that sampled
        with evaluation_mode(self.policy, self.critic, self.value_head):
            for mb, real in self.rollout_chunks(rollout):
                logits, vals = self.policy_and_values(mb, logits=need_logp)
                if not real:
                    continue
                if need_logp:
                    logps.append(selective_log_softmax(logits, mb.completion_ids).float())
                values.append(vals.float())
        rollout.values = torch.cat(values)
        rollout.old_logp = torch.cat(logps) if need_logp else None
        return rollout

    def advantage_context(self, rollout: Rollout) -> dict[str, Any]:
        return {**super().advantage_context(rollout), "values": rollout.values}

    def transform_advantages(self, rollout: Rollout, advantages: Tensor) -> Tensor:
        """Value targets ``returns = A + V`` from the raw advantages; whitened advantages (critic option)."""
        mask = rollout.completion_mask
        real = mask != 0
        returns = torch.where(real, advantages + rollout.values.to(advantages.dtype), torch.zeros((), dtype=advantages.dtype))
        kl, coef = self._rollout_kl(rollout), self.kl_coef
        m = rollout.metrics
        m["value/mean"] = masked_mean(rollout.values, mask).item()
        m["value/explained_variance"] = explained_variance(rollout.values, returns, mask).item()
        m["returns/mean"] = masked_mean(returns, mask).item()
        # Raw advantage statistics: after whitening they would be 0 and 1 by construction.
        m["advantages/mean"] = masked_mean(advantages, mask).item()
        m["advantages/std"] = masked_var(advantages, mask).sqrt().item()
        if self.kl_controller is not None:
            m["kl_coef"] = coef
            if kl is not None:
                mean_kl = self._mean_across_processes(masked_sum(kl, mask, dim=-1).mean())
                self.kl_controller.update(mean_kl, len(rollout) * self._world_size())
        rollout.returns = returns
        return whiten(advantages, mask) if self.critic_options.whiten_advantages else advantages

    def _world_size(self) -> int:
        return self._trainer.world_size if self._trainer is not None else 1

    # ---- training --------------------------------------------------------------------------
    def compute_loss(self, batch: Rollout) -> tuple[Tensor, dict[str, Tensor]]:
        crit = self.critic_options
        train_policy = self.global_step >= crit.warmup_steps
        logits, values = self.policy_and_values(batch, train_policy=train_policy)
        in_reward = self.kl_options.in_reward
        p_loss, logp, metrics = self.policy_objective(logits, batch, kl_in_loss=not in_reward,
                                                      kl_kind="k1" if in_reward else None)
        mask = batch.completion_mask.float()
        v_loss, v_metrics = value_loss(values, batch.values, batch.returns, mask, clip=crit.value_clip)
        metrics.update(v_metrics)
        metrics["loss/value"] = v_loss.detach()
        loss = crit.vf_coef * v_loss
        if train_policy:
            loss = loss + p_loss
        metrics["value/warmup"] = float(not train_policy)
        metrics["loss/total"] = loss.detach()
        return loss, metrics

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
            f"critic.model={critic_model!r} is invalid: its tokenizer differs from policy={policy!r}'s "
            f"(vocabulary {len(theirs)} vs {len(ours)} tokens); the critic must read the policy's token ids"
        )
