"""SegmentRFT on the tiny model: segments of known completions, the objective's invariants, training."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from helpers import assert_params_changed, fit_tiny, trainable_snapshot
from lightning.pytorch.loggers import WandbLogger
from torch.testing import assert_close

from rftlab import Rollout, RolloutDataModule, SegmentRFT
from rftlab.core import segment_index_from_starts, segment_rewards, segment_spans
from rftlab.models.policy import completion_forward
from rftlab.rewards.critics import ArithmeticStepCritic, JudgeCritic
from rftlab.rollout.prompts import PromptEncoder
from rftlab.tasks import WordProblems
from wandb_records import complete, find_run_files, read_history

SEGMENT_METRICS = [
    "segments/mean_count", "segments/reward_mean", "segments/ratio_clip_ratio", "segments/max_abs_log_ratio",
    "loss/value", "value/explained_variance", "critic/overall_mean", "critic/unparsed",
]
SHARED_METRICS = [
    "reward/mean", "reward/std", "kl", "entropy", "grad_norm", "completions/mean_length", "loss/policy", "lr",
    "timing/generate", "val/accuracy",
]
TASK = WordProblems(num_test=4)
ROW = TASK.test_rows()[0]  # a problem whose reference solution we write out below
TEXTS = [
    ROW["solution"],                                        # M thought lines + "Answer: x"
    f"The answer is {ROW['answer']}",                       # only an answer: M = 0
    "1 + 1 = 3\n\n  so then\nAnswer: 2",                    # a wrong step, a blank line, a detour
]


def make(**kwargs) -> SegmentRFT:
    defaults = dict(policy="tiny", lr=1e-2, lora=True)
    module = SegmentRFT(**{**defaults, **kwargs})
    module.configure_model()
    return module


def segments_of(rollout: Rollout) -> dict[str, torch.Tensor]:
    """The rollout's per-segment fields (``Rollout.segment_<key>``), by key."""
    return {key: getattr(rollout, f"segment_{key}") for key in ("starts", "mask", "rewards", "targets", "old_values")}


def rollout_of(module: SegmentRFT, texts: list[str], num_updates: int = 1) -> Rollout:
    """A rollout whose completions are ``texts`` (tokenised, EOS appended), all answering ROW."""
    tok = module.tokenizer
    prompts, prompt_ids, prompt_mask = PromptEncoder().encode([ROW["prompt"]] * len(texts), tok)
    ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    width = max(len(x) for x in ids)
    completion_ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids])
    completion_mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    rewards = torch.tensor([float(TASK.is_correct(t, ROW)) for t in texts])
    return Rollout(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
        completion_mask=completion_mask, group=torch.arange(len(texts)), rewards=rewards,
        rewards_per_fn=rewards.unsqueeze(1), truncated=torch.zeros(len(texts), dtype=torch.bool),
        reward_names=["correct"], prompts=prompts, completions=texts, rows=[ROW] * len(texts),
        num_updates=num_updates,
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(segments={"ratio_mode": "geo"}), r"segments\.ratio_mode='geo' is invalid: must be one of mean, sum, token"),
        (dict(kl={"estimator": "k4"}), r"kl\.estimator='k4' is invalid: must be one of exact, k1, k2, k3"),
        (dict(segments={"rollout_sync_every": 0}), r"segments\.rollout_sync_every"),
        (dict(segments={"gamma": 1.5}), r"segments\.gamma"), (dict(segments={"td_lambda": -0.1}), r"segments\.td_lambda"),
        (dict(clip={"eps_low": -0.1, "eps_high": -0.1}), r"clip\.eps_low"), (dict(clip={"dual_clip": 1.0}), r"clip\.dual_clip"),
        (dict(critic={"value_clip": -1.0}), r"critic\.value_clip"), (dict(critic={"vf_coef": -1.0}), r"critic\.vf_coef"),
        (dict(segments={"rewards": {"window": 0}}), r"segments\.rewards\.window=0"),
        (dict(segments={"rewards": {"progress_divisor": 0.0}}), r"segments\.rewards\.progress_divisor=0.0"),
        (dict(segments={"rewards": {"whiten": "group"}}), r"segments\.rewards\.whiten='group'"),
        (dict(step_critic="arithmetic"), "step_critic"), (dict(critic={"lr": 0.0}), r"critic\.lr"), (dict(beta=-1.0), "beta"),
    ],
)
def test_bad_configuration_raises_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SegmentRFT(policy="tiny", **kwargs)


def test_hyperparameters_and_defaults():
    module = SegmentRFT(policy="tiny")
    hp = module.hparams
    assert (hp.beta, hp.segments.gamma, hp.clip.eps_low, hp.clip.eps_high, hp.critic.value_clip, hp.critic.vf_coef,
            hp.optim.max_grad_norm) == (0.05, 1.0, 0.2, 0.2, 0.2, 0.1, 1.0)
    r = hp.segments.rewards
    assert (r.alpha, r.delta, r.window, r.rho, r.alpha_1, r.alpha_2) == (1.5, 0.5, 3, 2.0, 2.0, 1.0)
    assert "step_critic" not in hp and isinstance(module.step_critic, ArithmeticStepCritic)
    assert module.policy is None, "construction must not load weights"


def test_segments_rewards_and_targets_of_known_completions():
    module = make(beta=0.0, segments={"gamma": 0.9})
    rollout = module.score_rollout(rollout_of(module, TEXTS))
    seg = segments_of(rollout)
    tok = module.tokenizer
    mask = rollout.completion_mask
    with torch.no_grad():
        hidden = completion_forward(module.policy, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                                    mask, logits=False, hidden=True).hidden
        state_values = module.value_head(hidden)
    critic = ArithmeticStepCritic()
    for i, text in enumerate(TEXTS):
        spans = segment_spans(text)
        k = len(spans)
        assert seg["mask"][i].tolist() == [1] * k + [0] * (seg["mask"].shape[1] - k)
        # expected first tokens, from the tokenizer's own offsets (independent of prefix decoding)
        offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        expected_starts = [sum(1 for s, _ in offsets if s < lo) for lo, _ in spans]
        assert seg["starts"][i, :k].tolist() == expected_starts
        # every real token in exactly one segment; the EOS (last real token) in the answer segment
        index = segment_index_from_starts(seg["starts"], seg["mask"], mask.shape[1])[i, : int(mask[i].sum())]
        assert torch.bincount(index, minlength=k).sum() == mask[i].sum() and index[-1] == k - 1
        # rewards: the critic's scores through segment_rewards; r_answer is the verifier's reward
        G, S, P = critic.score("", [text[a:b].strip() for a, b in spans], ROW)
        R = segment_rewards(G, torch.tensor(S), torch.tensor(P), rollout.rewards[i])
        assert_close(seg["rewards"][i, :k], R)
        # V_rollout(s_k): the value head at the last token before segment k (the last prompt token
        # for k = 1 is column 0 of the state values); Y_k = R_k + gamma V(s_{k+1}), V(terminal) = 0
        v = state_values[i, seg["starts"][i, :k]]
        assert_close(seg["old_values"][i, :k], v)
        next_v = torch.cat([v[1:], torch.zeros(1)])
        assert_close(seg["targets"][i, :k], R + 0.9 * next_v)
    assert rollout.rewards.tolist() == [1.0, 1.0, 0.0]
    # minibatches carry their rows' segment data (the Rollout's segment fields are sliced with it)
    part = segments_of(rollout.select([2, 0]))
    for key, value in seg.items():
        assert torch.equal(part[key], value[[2, 0]]), key
    assert seg["rewards"][0, len(ROW["steps"])] == 2.0  # answer segment: rho * 1
    assert rollout.metrics["segments/mean_count"] == pytest.approx((len(ROW["steps"]) + 1 + 1 + 3) / 3)


def test_td_lambda_one_gives_every_segment_the_later_rewards():
    # td_lambda = 1, gamma = 1: Y_k = R_k + R_{k+1} + ... + R_{M+1} (the answer's reward included), V unused.
    module = make(beta=0.0, segments={"td_lambda": 1.0})
    seg = segments_of(module.score_rollout(rollout_of(module, TEXTS)))
    for i in range(len(TEXTS)):
        k = int(seg["mask"][i].sum())
        R = seg["rewards"][i, :k]
        assert_close(seg["targets"][i, :k], R.flip(0).cumsum(0).flip(0))
        assert (seg["targets"][i, k:] == 0).all()


@pytest.mark.parametrize("kl", ["k3", "exact"])
@pytest.mark.parametrize("ratio_mode", ["sum", "token"])
def test_equal_policies_ratio_one_kl_zero_and_loss_minus_sum_of_advantages(kl, ratio_mode):
    # A fresh LoRA adapter is a no-op: pi_theta == pi_rollout == pi_ref. Two updates per rollout make
    # the module record pi_rollout's log-probs in score_rollout instead of reusing the trained ones.
    module = make(beta=0.1, kl={"estimator": kl}, segments={"ratio_mode": ratio_mode}, critic={"vf_coef": 0.0})
    rollout = module.score_rollout(rollout_of(module, TEXTS, num_updates=2))
    assert rollout.old_logp is not None and (rollout.ref_logp is not None) == (kl == "k3")
    loss, metrics = module.compute_loss(rollout)
    seg = segments_of(rollout)
    advantages = torch.where(seg["mask"] != 0, seg["targets"] - seg["old_values"], 0.0)  # V_theta == V_rollout
    assert metrics["segments/max_abs_log_ratio"] < 1e-5  # every ratio is 1
    assert abs(float(metrics["kl"])) < 1e-6
    assert_close(metrics["loss/policy"], -advantages.sum(1).mean(), atol=1e-5, rtol=1e-5)
    assert_close(loss, metrics["loss/policy"] + 0.1 * metrics["loss/kl"])


def test_policy_loss_does_not_train_the_value_head_and_kl_grows_after_an_update():
    module = make(beta=0.0, critic={"vf_coef": 0.0})
    rollout = module.score_rollout(rollout_of(module, TEXTS))
    loss, _ = module.compute_loss(rollout)
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in module.value_head.parameters())
    assert any(p.grad is not None and p.grad.any() for n, p in module.policy.named_parameters() if "lora" in n)
    # move the adapter: both KL forms see pi_theta != pi_ref
    with torch.no_grad():
        for n, p in module.policy.named_parameters():
            if "lora_B" in n:
                p.add_(0.05 * torch.randn_like(p))
    for kl in ("exact", "k3"):
        module.kl_options, module.hparams.beta = module.kl_options.replace(estimator=kl), 0.1
        scored = module.score_rollout(rollout_of(module, TEXTS))
        _, metrics = module.compute_loss(scored)
        assert metrics["kl"] > 1e-4, kl


def test_unparseable_judge_gives_neutral_rewards_and_is_counted():
    judge = JudgeCritic(lambda messages: ["no idea"] * len(messages))
    module = make(step_critic=judge, beta=0.0)
    rollout = module.score_rollout(rollout_of(module, TEXTS))
    assert rollout.metrics["critic/unparsed"] == 3.0
    seg = segments_of(rollout)
    thoughts = (seg["mask"] != 0) & (torch.arange(seg["mask"].shape[1]) < seg["mask"].sum(1, keepdim=True) - 1)
    assert_close(seg["rewards"][thoughts], torch.full((int(thoughts.sum()),), 0.5))  # C_k = G = 0.5


def _logged(tmp_path) -> dict[str, list[float]]:
    files = find_run_files(tmp_path)
    assert len(files) == 1
    logged: dict[str, list[float]] = {}
    for row in read_history(complete(files[0])):
        for key, value in row.items():
            logged.setdefault(key, []).append(value)
    return logged


def _fit(tmp_path, module, max_steps, **dm_kwargs):
    dm = RolloutDataModule(task=WordProblems(num_test=2), prompts_per_step=2, num_generations=2, max_new_tokens=8,
                           val_batch_size=2, **dm_kwargs)
    logger = WandbLogger(project="rftlab-tests", save_dir=str(tmp_path), offline=True)
    fit_tiny(module, dm, max_steps, tmp_path, logger=logger, val_check_interval=max_steps, limit_val_batches=None,
             num_sanity_val_steps=2)
    import wandb

    wandb.finish()
    # finish() can return before wandb-core has written the file (under load: an empty or partial
    # .wandb file); teardown() waits for the service to exit, so the file is complete.
    wandb.teardown()
    return _logged(tmp_path)


def test_fit_changes_weights_and_logs_segment_metrics_to_wandb(tmp_path, vary_reward):
    module = make(lr=5e-3)
    before = trainable_snapshot(module)
    assert any(n.startswith("value_head") for n in before) and any("lora" in n for n in before)
    logged = _fit(tmp_path, module, 3, num_minibatches=2, rewards=vary_reward)  # minibatches slice segment data
    for prefix in ("value_head", "policy"):
        assert_params_changed(before, module, names=lambda n: n.startswith(prefix), require="any",
                              message=f"{prefix} unchanged")
    for key in SEGMENT_METRICS + SHARED_METRICS + ["reward/parity/mean"]:
        assert key in logged, f"{key} never reached W&B; logged: {sorted(logged)}"
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in logged[key]), (key, logged[key])
    assert len(logged["loss/value"]) == 3


class _StepMetrics(L.Callback):
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def test_rollout_policy_resyncs_every_n_rollouts(vary_reward):
    module = make(lr=5e-2, segments={"rollout_sync_every": 2}, beta=0.0, log={"validate_at_start": False})
    dm = RolloutDataModule(task=WordProblems(num_test=0), rewards=vary_reward, prompts_per_step=2, num_generations=2,
                           max_new_tokens=8)
    record = _StepMetrics()
    fit_tiny(module, dm, 4, callbacks=[record])
    # rollouts 1 and 3 are sampled right after a sync (lag 0, ratio 1); 2 and 4 by the snapshot taken
    # one update earlier (lag 1): their log-probs come from pi_rollout, so the ratios move off 1.
    assert [r["rollout/policy_lag"] for r in record.rows] == [0.0, 1.0, 0.0, 1.0]
    drift = [r["segments/max_abs_log_ratio"] for r in record.rows]
    assert drift[0] < 1e-4 and drift[2] < 1e-4 and drift[1] > 1e-3 and drift[3] > 1e-3, drift
