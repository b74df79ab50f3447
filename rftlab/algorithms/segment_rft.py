"""SegmentRFT: segment-level chain-of-thought RFT, credit per reasoning step instead of per answer.

A completion is cut into thought segments (its lines) and a final-answer segment; a step critic
scores each thought, ``rftlab.core.segment_rewards`` turns the scores into segment rewards, and a
PPO-style objective with one ratio, one TD target and one advantage per segment trains the policy
and a value head on its last hidden state. Source: "RFT fine tuning" slides, "Reward Processing"
and "Chain-of-Thought RFT Objective" (``shared/background/003_*.txt``), specified in rftlab issue 5.

Choices the source leaves open, and what we do:

- V(s_k) is the value head at the last token before segment k (the last prompt token for k = 1),
  read from the policy's own trunk (one forward gives logits and values).
- KL: the source's ``L_kl = sum_j KL(pi_rollout || pi_ref)`` does not depend on theta (pi_rollout
  is the frozen sampler), so it has no gradient and regularises nothing. We use
  ``sum_j KL(pi_theta || pi_ref)`` over the segment's tokens instead, as GRPO does (DeepSeekMath
  arXiv 2402.03300 Eq. 4): ``kl="k3"`` (or k1/k2) estimates it from the sampled tokens, ``kl="exact"``
  sums it over the vocabulary (one extra reference forward per step; fine for small models).
- pi_rollout is the policy that sampled. With ``rollout_sync_every = n > 1`` it is a snapshot of
  the trainable weights (adapter or full weights, and the value head), re-synced to pi_theta every
  n rollouts: it samples the rollouts, gives the old log-probs and V_rollout. Validation always
  uses the current policy. The snapshot and its schedule are checkpointed, so a resumed run samples
  with the same pi_rollout as the uninterrupted one.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor

from rftlab.algorithms.base import RFTModule, _require
from rftlab.core import (
    KL_ESTIMATORS,
    SEGMENT_RATIO_MODES,
    SEGMENT_WHITENING,
    SegmentRewardParams,
    batch_segment_rewards,
    exact_kl,
    explained_variance,
    kl_penalty,
    masked_mean,
    segment_ids,
    segment_index_from_starts,
    segment_kl_loss,
    segment_policy_loss,
    segment_value_loss,
    segment_value_targets,
    selective_log_softmax,
    split_segments,
    whiten,
)
from rftlab.core.arguments import check_choice
from rftlab.models.policy import completion_forward
from rftlab.models.value_head import ValueHead, values_at
from rftlab.rewards.critics import ArithmeticStepCritic, Critic
from rftlab.rollout.rollout import Rollout
from rftlab.rollout.sampler import SamplingParams

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
    """Segment-level CoT RFT with a step critic, segment rewards and a value head (issue 5).

    Loss ``L = mean over chains of sum_k [L_clip_k + vf_coef L_vf_k + beta L_kl_k]`` over the
    M thought segments and the answer segment, with ``Y_k = R_k + gamma V_rollout(s_{k+1})`` (the
    lambda-return with ``td_lambda > 0``) and
    ``A_k = Y_k - V_theta(s_k)`` (detached).

    Args:
        critic: the step critic (``Critic``); default ``ArithmeticStepCritic()``.
        gamma: discount between segments, in [0, 1].
        td_lambda: lambda-return weight in [0, 1]: 0 is issue 5's TD target (the answer's reward
            reaches a thought segment only through the critic V), 1 the Monte-Carlo return.
        eps: clip range of the segment ratio.
        dual_clip: dual-clip constant c > 1 for negative advantages (None disables).
        ratio_mode: "sum" (``exp`` of the summed token log-ratios, as specified), "mean"
            (length-normalised, GSPO-style) or "token" (per-token ratios carrying A_k).
        value_clip: c_v, clip range of ``V_theta - V_rollout`` in the value loss; 0 disables.
        vf_coef: c_vf >= 0, weight of the value loss.
        beta: weight of the KL to the reference (adapter disabled / frozen copy); 0 disables it.
        kl: "exact" (over the vocabulary) or a sampled-token estimator "k1", "k2", "k3".
        whiten_advantages: whiten A over the minibatch's real segments.
        rollout_sync_every: re-sync pi_rollout to pi_theta every this many rollouts (>= 1).
        alpha: boost of non-negative normalised thought scores.
        delta: dampening of negative normalised thought scores.
        window: W, moving-average window of past progress.
        kappa_pos: divisor of positive progress effects.
        kappa_neg: divisor of negative progress effects.
        base: B, offset of negative progress effects.
        lam: divisor of the progress multiplier S_k / lam.
        rho: scale of the answer segment's reward ``rho * r_answer``.
        alpha_1: lower cap ``-alpha_1 * r_max`` of thought rewards.
        alpha_2: upper cap ``r_max + alpha_2`` of thought rewards.
        eps_std: added inside the std of the thought-score normalisation.
        reward_whiten: whiten combined scores C: "none", "chain" (removes G) or "batch".
        value_head_init_scale: >= 0, scale of the value head's initial weights.
        value_lr: learning rate of the value head; None uses ``lr``.
        **kwargs: policy, LoRA, sampling-group, optimisation and logging options of ``RFTModule``.
    """

    def __init__(
        self,
        critic: Critic | None = None,
        gamma: float = 1.0,
        td_lambda: float = 0.0,
        eps: float = 0.2,
        dual_clip: float | None = None,
        ratio_mode: str = "sum",
        value_clip: float = 0.2,
        vf_coef: float = 0.1,
        beta: float = 0.05,
        kl: str = "k3",
        whiten_advantages: bool = False,
        rollout_sync_every: int = 1,
        alpha: float = 1.5,
        delta: float = 0.5,
        window: int = 3,
        kappa_pos: float = 1.0,
        kappa_neg: float = 1.0,
        base: float = 1.0,
        lam: float = 1.0,
        rho: float = 2.0,
        alpha_1: float = 2.0,
        alpha_2: float = 1.0,
        eps_std: float = 1e-8,
        reward_whiten: str = "none",
        value_head_init_scale: float = 0.01,
        value_lr: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(beta=beta, **kwargs)
        _require(critic is None or isinstance(critic, Critic), "critic", type(critic).__name__, "a Critic or None")
        _require(0.0 <= gamma <= 1.0, "gamma", gamma, "in [0, 1]")
        _require(0.0 <= td_lambda <= 1.0, "td_lambda", td_lambda, "in [0, 1]")
        _require(0.0 <= eps < 1.0, "eps", eps, "in [0, 1)")
        _require(dual_clip is None or dual_clip > 1, "dual_clip", dual_clip, "None or > 1")
        check_choice(SEGMENT_RATIO_MODES, "ratio_mode", ratio_mode)  # unknown names raise, listing the valid ones
        _require(reward_whiten in SEGMENT_WHITENING, "reward_whiten", reward_whiten, f"one of {', '.join(SEGMENT_WHITENING)}")
        _require(value_clip >= 0, "value_clip", value_clip, ">= 0 (0 disables value clipping)")
        _require(vf_coef >= 0 and math.isfinite(vf_coef), "vf_coef", vf_coef, ">= 0")
        kinds = ["exact", *KL_ESTIMATORS.names()]  # read now: user-registered estimators count too
        _require(kl in kinds, "kl", kl, f"one of {', '.join(kinds)}")
        _require(isinstance(rollout_sync_every, int) and rollout_sync_every >= 1, "rollout_sync_every",
                 rollout_sync_every, "an integer >= 1")
        _require(value_head_init_scale >= 0, "value_head_init_scale", value_head_init_scale, ">= 0")
        _require(value_lr is None or (value_lr > 0 and math.isfinite(value_lr)), "value_lr", value_lr, "None or > 0")
        self.reward_params = SegmentRewardParams(
            alpha=alpha, delta=delta, window=window, kappa_pos=kappa_pos, kappa_neg=kappa_neg, base=base,
            lam=lam, rho=rho, alpha_1=alpha_1, alpha_2=alpha_2, eps_std=eps_std, whiten=reward_whiten,
        )
        self.save_hyperparameters(ignore=["critic"])
        self.step_critic = critic if critic is not None else ArithmeticStepCritic()
        self.value_head: ValueHead | None = None
        self._rollout_state: dict[str, Tensor] | None = None  # pi_rollout's weights when stale
        self._rollout_version = 0
        self._rollouts_scored = 0
        self._sync_due = True
        self._evaluating = False

    # ---- modules ---------------------------------------------------------------------------
    @property
    def needs_reference(self) -> bool:
        # The exact KL reads the reference's logits at train time: no ref log-probs in the rollout.
        return self.hparams.beta > 0 and self.hparams.kl != "exact"

    def configure_extra_modules(self) -> None:
        hp = self.hparams
        if hp.beta > 0 and hp.kl == "exact" and not hp.lora and self.ref_policy is None:
            self.ref_policy = copy.deepcopy(self.policy).eval().requires_grad_(False)
        generator = torch.Generator().manual_seed(hp.seed)
        self.value_head = ValueHead(self.policy.config.hidden_size, hp.value_head_init_scale, generator=generator)

    def optimizer_param_groups(self) -> list[dict[str, Any]]:
        head = list(self.value_head.parameters())
        ids = {id(p) for p in head}
        policy = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": policy}, {"params": head, "lr": self.hparams.value_lr or self.hparams.lr}]

    # ---- pi_rollout ------------------------------------------------------------------------
    @property
    def stale_rollouts(self) -> bool:
        """Whether pi_rollout is a snapshot that may lag pi_theta (``rollout_sync_every > 1``)."""
        return self.hparams.rollout_sync_every > 1

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

    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, num_generations: int, params: SamplingParams) -> tuple[Tensor, Tensor, Tensor]:
        """Training rollouts are sampled by pi_rollout; validation by the current policy."""
        if not (self.stale_rollouts and self._sampling_for_training()):
            return super().generate(prompt_ids, prompt_mask, num_generations, params)
        self.configure_model()
        if self._sync_due or self._rollout_state is None:
            self._sync_rollout_policy()
        with self.rollout_policy():
            return super().generate(prompt_ids, prompt_mask, num_generations, params)

    # ---- scoring a rollout -----------------------------------------------------------------
    def record_sampling_state(self, rollout: Rollout) -> Rollout:
        """pi_rollout's log-probs (when they can differ from the trained ones) and state values."""
        need_logp = rollout.num_updates > 1 or self._rollout_state is not None
        modules = (self.policy, self.value_head)
        modes = [m.training for m in modules]
        logps, states = [], []
        try:
            for m in modules:
                m.eval()  # no dropout: the distribution that sampled
            with self.rollout_policy():
                for i in range(0, len(rollout), self.hparams.logprob_batch_size):
                    mb = rollout.select(torch.arange(i, min(i + self.hparams.logprob_batch_size, len(rollout))), trim=False)
                    out = completion_forward(self.policy, mb.prompt_ids, mb.prompt_mask, mb.completion_ids,
                                             mb.completion_mask, mb.temperature, logits=need_logp, hidden=True,
                                             **self.forward_options)
                    if need_logp:
                        logps.append(selective_log_softmax(out.logits, mb.completion_ids).float())
                    states.append(self.value_head(out.hidden).float())
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)
        rollout.old_logp = torch.cat(logps) if need_logp else None
        rollout.extras["state_values"] = torch.cat(states)  # (N, T + 1), consumed by compute_advantages
        if self._rollout_state is not None:
            rollout.policy_version = self._rollout_version
        return rollout

    def segment_layout(self, rollout: Rollout) -> tuple[Tensor, list[list[str]]]:
        """(N, K) first-token index of every segment (padded with T) and the segment texts."""
        tok = self.tokenizer
        starts, texts = [], []
        for i, text in enumerate(rollout.completions):
            ids = rollout.completion_ids[i, : int(rollout.completion_mask[i].sum())].tolist()
            seg, k = segment_ids(token_char_offsets(tok, ids, text), text)
            counts = torch.bincount(seg, minlength=k)
            starts.append(torch.cumsum(counts, 0) - counts)
            texts.append(split_segments(text))
        width = max(len(s) for s in starts)
        T = rollout.completion_ids.shape[1]
        padded = torch.full((len(starts), width), T, dtype=torch.long)
        for i, s in enumerate(starts):
            padded[i, : len(s)] = s
        return padded.to(rollout.completion_ids.device), texts

    def compute_advantages(self, rollout: Rollout) -> Rollout:
        """Critic scores -> segment rewards -> TD targets with V_rollout (stored per sequence)."""
        hp = self.hparams
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
        state_values = rollout.extras.pop("state_values")
        old_values = torch.where(seg_mask != 0, values_at(state_values, starts.clamp(max=state_values.shape[1] - 1)), 0.0)
        targets = segment_value_targets(R, old_values, seg_mask, hp.gamma, hp.td_lambda)
        rollout.seq_extras.update(starts=starts, mask=seg_mask, rewards=R, targets=targets, old_values=old_values)
        rollout.seq_advantages = (targets - old_values).sum(1)  # rollout-time TD advantages, for sample tables
        self._rollouts_scored += 1
        if self._rollouts_scored % hp.rollout_sync_every == 0:
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
        rollout.extras["segment_metrics"] = metrics
        return rollout

    # ---- training --------------------------------------------------------------------------
    def compute_loss(self, batch: Rollout) -> tuple[Tensor, dict[str, Tensor]]:
        hp = self.hparams
        seg = batch.seq_extras
        T = batch.completion_ids.shape[1]
        out = completion_forward(self.policy, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                 batch.completion_mask, batch.temperature, logits=True, hidden=True,
                                 **self.forward_options)
        logp = selective_log_softmax(out.logits, batch.completion_ids)
        old_logp = batch.old_logp if batch.old_logp is not None else logp.detach()
        starts, seg_mask, targets = seg["starts"].clamp(max=T), seg["mask"], seg["targets"]
        values = values_at(self.value_head(out.hidden), starts)  # V_theta(s_k), (N, K)
        real = seg_mask != 0
        advantages = torch.where(real, targets - values.detach(), 0.0)  # the policy loss never trains V
        if hp.whiten_advantages:
            advantages = whiten(advantages, seg_mask)
        mask = batch.completion_mask.float()
        segment_index = segment_index_from_starts(starts, seg_mask, T)
        p_loss, metrics = segment_policy_loss(logp, old_logp, advantages, segment_index, mask,
                                              ratio_mode=hp.ratio_mode, eps=hp.eps, dual_clip=hp.dual_clip)
        v_loss, v_metrics = segment_value_loss(values, seg["old_values"], targets, seg_mask, clip=hp.value_clip)
        metrics.update(v_metrics)
        loss = p_loss + hp.vf_coef * v_loss
        if hp.beta > 0:
            kl = self.token_kl(out.logits, logp, batch)
            kl_loss = segment_kl_loss(kl, mask)
            loss = loss + hp.beta * kl_loss
            metrics["kl"] = masked_mean(kl.detach(), mask)
            metrics["loss/kl"] = kl_loss.detach()
        metrics["loss/policy"] = p_loss.detach()
        metrics["loss/value"] = v_loss.detach()
        metrics["loss/total"] = loss.detach()
        metrics["value/explained_variance"] = explained_variance(values.detach(), targets, seg_mask)
        metrics["value/mean"] = masked_mean(values.detach(), seg_mask)
        metrics["advantages/mean"] = masked_mean(advantages, seg_mask)
        metrics["entropy"] = self.token_entropy(out.logits, batch.completion_mask)
        metrics.update(batch.extras.get("segment_metrics", {}))
        return loss, metrics

    def token_kl(self, logits: Tensor, logp: Tensor, batch: Rollout) -> Tensor:
        """(N, T) KL(pi_theta || pi_ref) per token: exact over the vocabulary, or a k-estimator."""
        if self.hparams.kl == "exact":
            with torch.no_grad():
                ref_logits = self.policy_logits(batch, reference=True)
            return exact_kl(logits, ref_logits)
        return kl_penalty(logp, batch.ref_logp, kind=self.hparams.kl)

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
