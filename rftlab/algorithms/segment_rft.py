"""SegmentRFT: segment-level chain-of-thought RFT, credit per reasoning step instead of per answer.

A completion is cut into thought segments (its lines) and a final-answer segment; a step critic
scores each thought, ``rftlab.core.segment_rewards`` turns the scores into segment rewards, and a
PPO-style objective with one ratio, one TD target and one advantage per segment trains the policy
and a value head on its last hidden state. Source: the "RFT fine tuning" slides, sections "Reward
Processing" and "Chain-of-Thought RFT Objective".

Choices the source leaves open, and what we do:

- V(s_k) is the value head at the last token before segment k (the last prompt token for k = 1),
  read from the policy's own trunk (one forward gives logits and values).
- KL: the source's ``L_kl = sum_j KL(pi_rollout || pi_ref)`` does not depend on theta (pi_rollout
  is the frozen sampler), so it has no gradient and regularises nothing. We use
  ``sum_j KL(pi_theta || pi_ref)`` over the segment's tokens instead, as GRPO does (DeepSeekMath
  arXiv 2402.03300 Eq. 4): ``kl.estimator="k3"`` (or k1/k2) estimates it from the sampled tokens, "exact"
  sums it over the vocabulary (one extra reference forward per step; fine for small models).
- pi_rollout is the policy that sampled. With ``segments.rollout_sync_every = n > 1`` it is a snapshot of
  the trainable weights (adapter or full weights, and the value head), re-synced to pi_theta every
  n rollouts: it samples the rollouts, gives the old log-probs and V_rollout. Validation always
  uses the current policy. The snapshot and its schedule are checkpointed, so a resumed run samples
  with the same pi_rollout as the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor

from rftlab.algorithms.base import RFTModule, _require
from rftlab.algorithms.options import CriticOptions, KLOptions, SegmentOptions
from rftlab.core import (
    KL_ESTIMATORS,
    batch_segment_rewards,
    exact_kl,
    explained_variance,
    kl_penalty,
    masked_mean,
    merge_environment_segments,
    segment_ids,
    segment_index_from_starts,
    segment_kl_loss,
    segment_policy_loss,
    segment_value_loss,
    segment_value_targets,
    selective_log_softmax,
    selective_log_softmax_and_entropy,
    split_segments,
    whiten,
)
from rftlab.models.hf import evaluation_mode
from rftlab.models.sharding import shard_module
from rftlab.models.value_head import ValueHead, values_at
from rftlab.rewards.critics import ArithmeticStepCritic, Critic, missing_columns
from rftlab.rollout.rollout import Rollout
from rftlab.rollout.sampler import SamplingParams

#: Rows of a lazily generated task checked for the critic's columns (each costs a generation;
#: generated rows all have the same columns). In-memory lists are checked whole.
COLUMN_CHECK_ROWS = 1000


def token_char_offsets(tokenizer: Any, ids: list[int], text: str) -> list[tuple[int, int]]:
    """Character offsets of sampled tokens in their decoded text: token i starts at
    ``len(decode(ids[:i]))``, clamped to [previous start, len(text)].

    Decoding prefixes (rather than re-tokenising the text) keeps the tokens that were sampled, which
    need not be the ones the tokenizer would produce for the text. Special tokens decode to nothing:
    at the end (EOS) they start at ``len(text)``.
    """
    starts: list[int] = []
    previous = 0
    for i in range(len(ids)):
        start = min(max(len(tokenizer.decode(ids[:i], skip_special_tokens=True)), previous), len(text))
        starts.append(start)
        previous = start
    return list(zip(starts, starts[1:] + [len(text)]))


class SegmentRFT(RFTModule):
    """Segment-level CoT RFT with a step critic, segment rewards and a value head.

    Loss ``L = mean over chains of sum_k [L_clip_k + vf_coef L_vf_k + beta L_kl_k]`` over the
    M thought segments and the answer segment, with ``Y_k = R_k + gamma V_rollout(s_{k+1})`` (the
    lambda-return with ``segments.td_lambda > 0``) and ``A_k = Y_k - V_theta(s_k)`` (detached).

    Args:
        step_critic: the step critic (``Critic``) scoring each thought; default ``ArithmeticStepCritic()``.
        beta: weight of the KL to the reference (adapter disabled / frozen copy); 0 disables it.
        kl: KL options; ``kl.estimator`` "exact" sums the KL over the vocabulary (one extra
            reference forward per step), "k1"/"k2"/"k3" estimate it from the sampled tokens.
        critic: the value head (``CriticOptions``; kind "shared" only: it reads the policy's trunk):
            vf_coef, value_clip, lr, head_init_scale, whiten_advantages (over the minibatch's segments).
        segments: discounting, ratio mode, pi_rollout's sync schedule and the segment-reward
            hyper-parameters (``SegmentOptions``).
        **kwargs: ``RFTModule`` options (policy, lora, lr, forward, optim, clip, log); ``clip``'s
            eps_low/eps_high bound the segment ratio, its dual_clip the negative advantages.
    """

    def __init__(
        self,
        step_critic: Critic | None = None,
        beta: float = 0.05,
        kl: KLOptions = KLOptions(),
        critic: CriticOptions = CriticOptions(whiten_advantages=False),
        segments: SegmentOptions = SegmentOptions(),
        **kwargs: Any,
    ) -> None:
        super().__init__(beta=beta, kl=kl, **kwargs)
        _require(step_critic is None or isinstance(step_critic, Critic), "step_critic", type(step_critic).__name__,
                 "a Critic or None")
        self.critic_options = self.option_group("critic", critic, CriticOptions)
        _require(self.critic_options.kind == "shared", "critic.kind", self.critic_options.kind,
                 "'shared' for SegmentRFT (its value head reads the policy's own trunk)")
        self.segment_options = self.option_group("segments", segments, SegmentOptions)
        self.reward_params = self.segment_options.rewards
        self.save_hyperparameters(ignore=["step_critic"])
        self.step_critic = step_critic if step_critic is not None else ArithmeticStepCritic()
        self.value_head: ValueHead | None = None
        self._rollout_state: dict[str, Tensor] | None = None  # pi_rollout's weights when stale
        self._rollout_version = 0
        self._rollouts_scored = 0
        self._sync_due = True
        self._evaluating = False

    def kl_estimators(self) -> list[str]:
        return ["exact", *KL_ESTIMATORS.names()]  # read now: user-registered estimators count too

    # ---- modules ---------------------------------------------------------------------------
    @property
    def needs_reference(self) -> bool:
        # The exact KL reads the reference's logits at train time: no ref log-probs in the rollout.
        return self.beta > 0 and self.kl_options.estimator != "exact"

    @property
    def needs_reference_model(self) -> bool:
        return self.beta > 0

    def configure_extra_modules(self) -> None:
        generator = torch.Generator().manual_seed(self.policy_spec.seed)
        self.value_head = ValueHead(self.policy.config.hidden_size, self.critic_options.head_init_scale, generator=generator)

    def shard_extra_modules(self, mesh: Any) -> None:
        """The value head, as one unit (the policy is sharded by ``shard``)."""
        shard_module(self.value_head, mesh)

    # ---- setup checks ----------------------------------------------------------------------
    def check_datamodule(self, datamodule: Any) -> None:
        """Also refuse a task whose rows lack a column the step critic reads, before any sampling."""
        super().check_datamodule(datamodule)
        self._check_critic_columns(datamodule.task, datamodule.train_rows)

    def _check_critic_columns(self, task: Any, rows: Any) -> None:
        """Raise if the training rows lack a column of ``step_critic.required_columns``.

        Args:
            task: the DataModule's task (named in the error).
            rows: its training rows (dicts), the ones the critic will score.
        """
        if not isinstance(rows, (list, tuple)):
            rows = [rows[i] for i in range(min(len(rows), COLUMN_CHECK_ROWS))]
        missing = missing_columns(self.step_critic, rows)
        if not missing:
            return
        critic = self.step_critic
        lacking = ", ".join(f"{c!r} (absent from {n} of the {len(rows)} training rows checked)" for c, n in missing.items())
        have = sorted({column for row in rows for column in row})
        raise ValueError(
            f"{type(self).__name__}'s step critic {critic.name!r} ({type(critic).__name__}) needs the task column(s) "
            f"{lacking}, which task {getattr(task, 'name', type(task).__name__)!r} lacks; its rows have the columns "
            f"{', '.join(map(repr, have))}. Use a task with these columns (WordProblems has them), point the critic "
            f"at columns the task has, or give SegmentRFT a critic that needs none (a JudgeCritic)"
        )

    def optimizer_param_groups(self) -> list[dict[str, Any]]:
        head = list(self.value_head.parameters())
        ids = {id(p) for p in head}
        policy = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": policy}, {"params": head, "lr": self.critic_options.lr or self.hparams.lr}]

    # ---- pi_rollout ------------------------------------------------------------------------
    @property
    def stale_rollouts(self) -> bool:
        """Whether pi_rollout is a snapshot that may lag pi_theta (``rollout_sync_every > 1``)."""
        return self.segment_options.rollout_sync_every > 1

    def _sync_rollout_policy(self) -> None:
        self._rollout_state = {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}
        self._rollout_version = int(self.global_step)
        self._sync_due = False

    @contextmanager
    def rollout_policy(self) -> Iterator[None]:
        """Run with pi_rollout's weights (the snapshot, when stale); the current ones come back after."""
        if self._rollout_state is None:
            yield
            return
        params = dict(self.named_parameters())
        current = {n: params[n].detach().clone() for n in self._rollout_state}
        with torch.no_grad():
            for n, value in self._rollout_state.items():
                params[n].copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, value in current.items():
                    params[n].copy_(value)

    def _sampling_for_training(self) -> bool:
        trainer = self._trainer
        evaluating = trainer is not None and (trainer.validating or trainer.sanity_checking or trainer.testing)
        return not (self._evaluating or evaluating)

    def validate_before_training(self) -> None:
        self._evaluating = True
        try:
            super().validate_before_training()
        finally:
            self._evaluating = False

    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, num_generations: int, params: SamplingParams,
                 episodes: Any = None) -> Any:
        """Training rollouts are sampled by pi_rollout; validation by the current policy."""
        if not (self.stale_rollouts and self._sampling_for_training()):
            return super().generate(prompt_ids, prompt_mask, num_generations, params, episodes=episodes)
        self.configure_model()
        if self._sync_due or self._rollout_state is None:
            self._sync_rollout_policy()
        with self.rollout_policy():
            return super().generate(prompt_ids, prompt_mask, num_generations, params, episodes=episodes)

    # ---- scoring a rollout -----------------------------------------------------------------
    def record_sampling_state(self, rollout: Rollout) -> Rollout:
        """pi_rollout's log-probs (when they can differ from the trained ones) and state values."""
        need_logp = rollout.num_updates > 1 or self._rollout_state is not None
        logps, states = [], []
        # no dropout: the distribution that sampled
        with evaluation_mode(self.policy, self.value_head), self.rollout_policy():
            for mb, real in self.rollout_chunks(rollout):
                out = self.runtime.forward(self.policy, mb.prompt_ids, mb.prompt_mask, mb.completion_ids,
                                           mb.attention_mask, mb.temperature, logits=need_logp, hidden=True)
                state = self.value_head(out.hidden).float()  # a collective too when sharded
                if not real:
                    continue
                if need_logp:
                    logps.append(selective_log_softmax(out.logits, mb.completion_ids).float())
                states.append(state)
        rollout.old_logp = torch.cat(logps) if need_logp else None
        rollout.state_values = torch.cat(states)  # (N, T + 1), consumed by compute_advantages
        if self._rollout_state is not None:
            rollout.policy_version = self._rollout_version
        return rollout

    def segment_layout(self, rollout: Rollout) -> tuple[Tensor, list[list[str]]]:
        """(N, K) first-token index of every segment (padded with T) and the segment texts."""
        tok = self.tokenizer
        starts, texts = [], []
        for i, text in enumerate(rollout.completions):
            length = int(rollout.attention_mask[i].sum())
            ids = rollout.completion_ids[i, :length].tolist()
            seg, k = segment_ids(token_char_offsets(tok, ids, text), text)
            pieces = split_segments(text)
            if rollout.env_mask is not None:  # a multi-turn episode: observation lines are no steps
                seg, target = merge_environment_segments(seg, k, rollout.completion_mask[i, :length].cpu() != 0)
                k = int(target.max()) + 1
                pieces = ["\n".join(p for p, t in zip(pieces, target.tolist()) if t == j) for j in range(k)]
            counts = torch.bincount(seg, minlength=k)
            starts.append(torch.cumsum(counts, 0) - counts)
            texts.append(pieces)
        width = max(len(s) for s in starts)
        T = rollout.completion_ids.shape[1]
        padded = torch.full((len(starts), width), T, dtype=torch.long)
        for i, s in enumerate(starts):
            padded[i, : len(s)] = s
        return padded.to(rollout.completion_ids.device), texts

    def compute_advantages(self, rollout: Rollout) -> Rollout:
        """Critic scores -> segment rewards -> TD targets with V_rollout (stored per sequence)."""
        opts = self.segment_options
        starts, texts = self.segment_layout(rollout)
        unparsed_before = self.step_critic.num_unparsed
        critiques = self.step_critic.score_batch(rollout.prompts, texts, rollout.rows)
        for c, segs in zip(critiques, texts):
            if len(c.S) != len(segs) - 1 or len(c.P) != len(segs) - 1:
                raise RuntimeError(f"critic {type(self.step_critic).__name__} returned {len(c.S)} thought scores "
                                   f"for {len(segs) - 1} thought segments")
        as_tensor = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
        R, seg_mask = batch_segment_rewards(
            as_tensor([c.G for c in critiques]), [as_tensor(c.S) for c in critiques], [as_tensor(c.P) for c in critiques],
            rollout.rewards.float().cpu(), **dataclasses.asdict(self.reward_params),
        )
        device = rollout.completion_ids.device
        R, seg_mask = R.to(device), seg_mask.to(device)
        state_values, rollout.state_values = rollout.state_values, None
        old_values = torch.where(seg_mask != 0, values_at(state_values, starts.clamp(max=state_values.shape[1] - 1)), 0.0)
        targets = segment_value_targets(R, old_values, seg_mask, opts.gamma, opts.td_lambda)
        rollout.segment_starts, rollout.segment_mask, rollout.segment_rewards = starts, seg_mask, R
        rollout.segment_targets, rollout.segment_old_values = targets, old_values
        rollout.seq_advantages = (targets - old_values).sum(1)  # rollout-time TD advantages, for sample tables
        self._rollouts_scored += 1
        if self._rollouts_scored % opts.rollout_sync_every == 0:
            self._sync_due = True
        metrics = {
            "segments/mean_count": seg_mask.sum(1).float().mean().item(),
            "segments/reward_mean": masked_mean(R, seg_mask).item(),
            "segments/answer_reward_mean": (R * _last_real(seg_mask)).sum(1).mean().item(),
            "critic/overall_mean": sum(c.G for c in critiques) / max(len(critiques), 1),
            "critic/unparsed": float(self.step_critic.num_unparsed - unparsed_before),
        }
        thoughts = [(s, p) for c in critiques for s, p in zip(c.S, c.P)]
        if thoughts:  # no thought segment at all: nothing to average
            metrics["critic/thought_mean"] = sum(s for s, _ in thoughts) / len(thoughts)
            metrics["critic/progress_mean"] = sum(p for _, p in thoughts) / len(thoughts)
        rollout.metrics.update(metrics)
        return rollout

    # ---- training --------------------------------------------------------------------------
    def compute_loss(self, batch: Rollout) -> tuple[Tensor, dict[str, Tensor]]:
        clip, crit = self.clip_options, self.critic_options
        T = batch.completion_ids.shape[1]
        out = self.runtime.forward(self.policy, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                   batch.attention_mask, batch.temperature, logits=True, hidden=True)
        # the entropy metric comes from the same normalisation of the logits as the log-probs
        logp, entropy = selective_log_softmax_and_entropy(out.logits, batch.completion_ids)
        old_logp = batch.old_logp if batch.old_logp is not None else logp.detach()
        starts, seg_mask, targets = batch.segment_starts.clamp(max=T), batch.segment_mask, batch.segment_targets
        values = values_at(self.value_head(out.hidden), starts)  # V_theta(s_k), (N, K)
        real = seg_mask != 0
        advantages = torch.where(real, targets - values.detach(), 0.0)  # the policy loss never trains V
        if crit.whiten_advantages:
            advantages = whiten(advantages, seg_mask)
        mask = batch.completion_mask.float()
        segment_index = segment_index_from_starts(starts, seg_mask, T)
        p_loss, metrics = segment_policy_loss(logp, old_logp, advantages, segment_index, mask,
                                              ratio_mode=self.segment_options.ratio_mode, eps_low=clip.eps_low,
                                              eps_high=clip.eps_high, dual_clip=clip.dual_clip)
        v_loss, v_metrics = segment_value_loss(values, batch.segment_old_values, targets, seg_mask, clip=crit.value_clip)
        metrics.update(v_metrics)
        loss = p_loss + crit.vf_coef * v_loss
        if self.beta > 0:
            kl = self.token_kl(out.logits, logp, batch)
            kl_loss = segment_kl_loss(kl, mask)
            loss = loss + self.beta * kl_loss
            metrics["kl"] = masked_mean(kl.detach(), mask)
            metrics["loss/kl"] = kl_loss.detach()
        metrics["loss/policy"] = p_loss.detach()
        metrics["loss/value"] = v_loss.detach()
        metrics["loss/total"] = loss.detach()
        metrics["value/explained_variance"] = explained_variance(values.detach(), targets, seg_mask)
        metrics["value/mean"] = masked_mean(values.detach(), seg_mask)
        metrics["advantages/mean"] = masked_mean(advantages, seg_mask)
        metrics["entropy"] = masked_mean(entropy, batch.completion_mask)
        return loss, metrics

    def token_kl(self, logits: Tensor, logp: Tensor, batch: Rollout) -> Tensor:
        """(N, T) KL(pi_theta || pi_ref) per token: exact over the vocabulary, or a k-estimator."""
        if self.kl_options.estimator == "exact":
            with torch.no_grad():
                ref_logits = self.policy_logits(batch, reference=True)
            return exact_kl(logits, ref_logits)
        return kl_penalty(logp, batch.ref_logp, kind=self.kl_options.estimator)

    # ---- checkpoints -----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        # pi_rollout may lag pi_theta by up to rollout_sync_every - 1 updates: its weights cannot be
        # recomputed from the current ones, so they are saved (only the trainable ones: adapter/head).
        checkpoint["rollout_policy"] = {
            "state": self._rollout_state, "version": self._rollout_version,
            "rollouts_scored": self._rollouts_scored, "sync_due": self._sync_due,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("rollout_policy")
        if saved is None:
            return
        state = saved["state"]
        self._rollout_state = {k: v.to(self.device) for k, v in state.items()} if state is not None else None
        self._rollout_version = int(saved["version"])
        self._rollouts_scored = int(saved["rollouts_scored"])
        self._sync_due = bool(saved["sync_due"])


def _last_real(segment_mask: Tensor) -> Tensor:
    """(N, K) one-hot of each chain's last real segment (the answer segment)."""
    last = (segment_mask.sum(1) - 1).clamp_min(0)
    return torch.nn.functional.one_hot(last, segment_mask.shape[1]).to(torch.float32)
