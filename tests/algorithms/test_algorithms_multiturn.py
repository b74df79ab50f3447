"""Every algorithm on multi-turn rollouts: the environment's tokens are context, never trained on."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.testing import assert_close

import golden_cases
from golden_cases import perturb, reinit_lora, token_rollout
from helpers import assert_params_changed, eos_likely, fit_tiny, trainable_snapshot

from rftlab import DAPO, GRPO, PPO, RolloutDataModule, SegmentRFT
from rftlab.core import group_advantages
from rftlab.environments import Environment, Step
from rftlab.models.hf import position_ids_from_mask
from rftlab.rollout.rollout import Rollout
from rftlab.tasks import RowsTask

TINY = dict(policy={"model": "tiny", "lora_r": 4, "lora_alpha": 8, "seed": 0}, lora=True, lr=1e-2)
MODULES = {
    "grpo": lambda: GRPO(**TINY, beta=0.04),
    "dapo": lambda: DAPO(**TINY, overlong={"buffer_len": 4, "penalty_factor": 0.5}),
    "ppo": lambda: PPO(**TINY, beta=0.05, critic={"kind": "shared"}, kl={"in_reward": True}),
    "segment_rft": lambda: SegmentRFT(**TINY, beta=0.05),
}
# An observation on lines of its own, as a tool result is: SegmentRFT's line segments see it.
ENV_TEXT = "\n<tool_response>\n42\n</tool_response>\n"


def _env_tokens(tokenizer) -> list[int]:
    return tokenizer(ENV_TEXT, add_special_tokens=False)["input_ids"]


def _module(name: str):
    module = MODULES[name]()
    module.configure_model()
    reinit_lora(module)
    perturb(module, f"multiturn/{name}", 0.02)
    return module


def _with_observation(rollout: Rollout, at: int, tokenizer) -> Rollout:
    """Insert the observation after the first ``at`` completion tokens of every row (env_mask on them)."""
    pad = tokenizer.pad_token_id
    env_tokens = _env_tokens(tokenizer)
    rows_ids, rows_kind = [], []
    for ids, mask in zip(rollout.completion_ids.tolist(), rollout.completion_mask.tolist()):
        real = [t for t, m in zip(ids, mask) if m]
        cut = min(at, len(real))
        rows_ids.append(real[:cut] + env_tokens + real[cut:])
        rows_kind.append([1] * cut + [2] * len(env_tokens) + [1] * (len(real) - cut))
    width = max(len(r) for r in rows_ids)
    ids = torch.full((len(rows_ids), width), pad, dtype=torch.long)
    kind = torch.zeros((len(rows_ids), width), dtype=torch.long)
    for i, (r, k) in enumerate(zip(rows_ids, rows_kind)):
        ids[i, : len(r)], kind[i, : len(k)] = torch.tensor(r), torch.tensor(k)
    texts = tokenizer.batch_decode(ids.masked_fill(kind == 0, pad), skip_special_tokens=True)
    return dataclasses.replace(rollout, completion_ids=ids, completion_mask=(kind == 1).long(),
                               env_mask=(kind == 2).long(), completions=texts)


def _observation_in_prompt(rollout: Rollout, tokenizer) -> Rollout:
    """The single-turn twin of an env-first episode: the observation appended to the prompt."""
    n = len(rollout)
    env = torch.tensor(_env_tokens(tokenizer)).expand(n, -1)
    return dataclasses.replace(rollout, prompt_ids=torch.cat([rollout.prompt_ids, env], 1),
                               prompt_mask=torch.cat([rollout.prompt_mask, torch.ones_like(env)], 1))


def _loss_and_grads(module, rollout: Rollout):
    rollout.rewards = module.shape_rewards(rollout)
    rollout = module.score_rollout(rollout)
    module.zero_grad(set_to_none=True)
    loss, metrics = module.compute_loss(rollout)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return rollout, loss.detach(), metrics, grads


@pytest.mark.parametrize("name", ["grpo", "dapo", "ppo"])
def test_an_observation_before_the_first_turn_trains_like_the_same_text_in_the_prompt(name, tokenizer):
    """Loss, metrics and gradients of an episode that opens with the environment's tokens equal those of
    the single-turn rollout whose prompt ends with them: env tokens are attended to and carry no loss."""
    module = _module(name)
    base = token_rollout(tokenizer, 4, 1, 1.0)
    episode = _with_observation(base, 0, tokenizer)
    twin = _observation_in_prompt(base, tokenizer)
    scored_ep, loss_ep, metrics_ep, grads_ep = _loss_and_grads(module, episode)
    scored_tw, loss_tw, metrics_tw, grads_tw = _loss_and_grads(module, twin)
    assert_close(loss_ep, loss_tw, rtol=1e-4, atol=1e-6)
    for key in ("entropy", "kl", "clip_ratio"):
        if key in metrics_tw:
            assert_close(metrics_ep[key], metrics_tw[key], rtol=1e-4, atol=1e-6)
    assert grads_ep.keys() == grads_tw.keys() and grads_ep
    for key in grads_tw:
        assert_close(grads_ep[key], grads_tw[key], rtol=1e-3, atol=1e-6, msg=key)
    # per-token annotations agree on the model's tokens (shifted past the observation)
    k = len(_env_tokens(tokenizer))
    for field in ("advantages", "old_logp", "ref_logp", "values", "returns"):
        a, b = getattr(scored_ep, field), getattr(scored_tw, field)
        if b is not None:
            assert_close(a[:, k: k + b.shape[1]] * scored_tw.completion_mask, b * scored_tw.completion_mask,
                         rtol=1e-4, atol=1e-5, msg=field)


def test_grpo_loss_and_gradients_equal_a_reference_with_the_mask_by_hand(tokenizer):
    module = GRPO(**TINY, beta=0.0, loss={"agg": "token-mean"})
    module.configure_model()
    reinit_lora(module)
    perturb(module, "multiturn/grpo-hand", 0.02)
    rollout = _with_observation(token_rollout(tokenizer, 4, 1, 0.7), 2, tokenizer)  # observation after 2 tokens
    rollout = module.score_rollout(rollout)
    module.zero_grad(set_to_none=True)
    loss, _ = module.compute_loss(rollout)
    loss.backward()
    got = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}

    # Reference: one full forward over prompt + episode, attention on every real token; the loss
    # sums A_i * ratio over the positions listed by hand as the model's (not the observation's).
    module.zero_grad(set_to_none=True)
    P, k = rollout.prompt_ids.shape[1], len(_env_tokens(tokenizer))
    ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], 1)
    attention = torch.cat([rollout.prompt_mask, rollout.completion_mask + rollout.env_mask], 1)
    out = module.policy(input_ids=ids, attention_mask=attention, position_ids=position_ids_from_mask(attention))
    logits = out.logits[:, P - 1: -1].float() / 0.7
    logp = torch.log_softmax(logits, -1).gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)
    advantages = group_advantages(rollout.rewards.float(), 4)
    total, count = 0.0, 0
    for i in range(len(rollout)):
        n_model = int(rollout.completion_mask[i].sum())
        first = min(2, n_model)
        positions = list(range(first)) + list(range(first + k, first + k + n_model - first))  # by hand
        for t in positions:
            total = total + advantages[i] * torch.exp(logp[i, t] - logp[i, t].detach())
            count += 1
    reference = -total / count
    reference.backward()
    assert_close(loss.detach(), reference.detach(), rtol=1e-5, atol=1e-6)
    want = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    assert want.keys() == got.keys()
    for key in want:
        assert_close(got[key], want[key], rtol=1e-4, atol=1e-7, msg=key)


@pytest.mark.parametrize("name", list(MODULES))
def test_nothing_at_the_environment_tokens_reaches_the_loss(name, tokenizer):
    """Garbage in every per-token annotation at the observation's positions changes neither loss nor gradients."""
    module = _module(name)
    rollout = _with_observation(token_rollout(tokenizer, 4, 1, 1.0), 3, tokenizer)
    rollout.rows = [{**row, "steps": [1]} for row in rollout.rows]  # the columns SegmentRFT's step critic reads
    rollout.rewards = module.shape_rewards(rollout)
    rollout = module.score_rollout(rollout)
    if rollout.segment_starts is not None:  # SegmentRFT: every segment holds some of the model's tokens
        assert ENV_TEXT.strip().splitlines()[1] in rollout.completions[0]  # the observation has lines of its own
        for i in range(len(rollout)):
            starts = rollout.segment_starts[i][rollout.segment_mask[i] != 0].tolist()
            ends = starts[1:] + [int(rollout.attention_mask[i].sum())]
            assert all(rollout.completion_mask[i, a:b].any() for a, b in zip(starts, ends)), (i, starts)
    module.zero_grad(set_to_none=True)
    loss, _ = module.compute_loss(rollout)
    loss.backward()
    clean = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    env = rollout.env_mask.bool()
    for field in ("advantages", "old_logp", "ref_logp", "values", "returns", "sampler_logp"):
        value = getattr(rollout, field)
        if value is not None:
            setattr(rollout, field, value.masked_fill(env, 1e4))
    module.zero_grad(set_to_none=True)
    dirty_loss, _ = module.compute_loss(rollout)
    dirty_loss.backward()
    assert_close(dirty_loss.detach(), loss.detach())
    for key, grad in clean.items():
        assert_close(dict(module.named_parameters())[key].grad, grad, msg=key)


class TryAgain(Environment):
    def __init__(self) -> None:
        self.n = 0

    def step(self, text: str) -> Step:
        self.n += 1
        return Step([{"role": "user", "content": "again"}], done=self.n >= 2)


@pytest.mark.parametrize("name", list(MODULES))
def test_every_algorithm_trains_on_multi_turn_episodes(name, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    module = MODULES[name]()
    module.configure_model()
    eos_likely(module)
    task = RowsTask([{"prompt": [{"role": "user", "content": f"Question {i}"}], "answer": "1", "steps": [1]}
                     for i in range(8)],
                    {"parity": lambda completions, **_: [float(len(c) % 2) for c in completions]})
    dm = RolloutDataModule(task=task, environment=TryAgain, max_turns=3, max_new_tokens=24, prompts_per_step=2,
                           num_generations=4)
    before = trainable_snapshot(module)
    fit_tiny(module, dm, 2, tmp_path, logger=CSVLogger(tmp_path))
    assert_params_changed(before, module)
    text = next(tmp_path.rglob("metrics.csv")).read_text()
    assert "episodes/turns_mean" in text.splitlines()[0]
