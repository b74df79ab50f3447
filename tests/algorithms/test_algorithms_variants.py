"""The literature's variants inside the algorithms: each trains the tiny model and logs its metrics.

The math of each piece is tested in ``tests/core`` (hand-computed cases, reference loops); here:
the algorithms accept them by name, refuse bad settings before any sampling, feed them what they
need (the KL in the reward, a greedy baseline, the sampler's log-probs) and log their metrics.
"""

from __future__ import annotations

import csv
import math
from dataclasses import replace

import pytest
import torch
from helpers import assert_params_changed, fit_tiny, trainable_snapshot
from lightning.pytorch.loggers import CSVLogger
from torch.testing import assert_close

from rftlab import DAPO, GRPO, PPO, RolloutDataModule
from rftlab.core import ADVANTAGE_ESTIMATORS, selective_log_softmax
from rftlab.tasks import Arithmetic


def make_dm(rewards, **kwargs) -> RolloutDataModule:
    options = dict(task=Arithmetic(num_test=4), rewards=rewards, prompts_per_step=2, num_generations=4,
                   max_new_tokens=6)
    return RolloutDataModule(**{**options, **kwargs})


def logged_metrics(tmp_path) -> dict[str, list[float]]:
    """Every metric the CSV logger wrote, by name (empty cells skipped)."""
    (path,) = tmp_path.glob("**/metrics.csv")
    out: dict[str, list[float]] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if value not in ("", None):
                    out.setdefault(key, []).append(float(value))
    return out


def fit_and_log(tmp_path, module, dm, steps: int = 2) -> dict[str, list[float]]:
    module.configure_model()
    before = trainable_snapshot(module)
    fit_tiny(module, dm, steps, tmp_path, logger=CSVLogger(tmp_path, name="csv"))
    assert_params_changed(before, module, require="any", message="no trainable parameter changed")
    return logged_metrics(tmp_path)


@pytest.mark.parametrize(
    "kwargs, metrics",
    [
        (dict(advantage="rloo"), ["advantages/abs_mean"]),
        (dict(advantage="reinforce_pp_baseline", beta=0.05, kl={"in_reward": True}), ["reward/kl_penalty", "kl"]),
        (dict(advantage="reinforce_pp", beta=0.05, kl={"in_reward": True}), ["reward/kl_penalty"]),
        (dict(loss="gspo"), ["gspo/seq_ratio_mean", "clip_ratio/high"]),
        (dict(loss="gspo_token"), ["gspo/seq_ratio_mean"]),
        (dict(loss="cispo"), ["cispo/truncated_share", "cispo/weight_mean"]),
        (dict(loss="sapo"), ["sapo/gate_weight_mean"]),
        (dict(loss="gmpo"), ["gmpo/seq_ratio_mean"]),
        (dict(loss={"top_entropy_quantile": 0.2}), ["entropy/kept_share", "entropy/kept_mean"]),
        (dict(loss={"entropy_coef": 0.01, "entropy_target": 5.0, "entropy_step": 0.01}), ["entropy/coef"]),
    ],
)
def test_variant_trains_and_logs_its_metrics(tmp_path, vary_reward, kwargs, metrics):
    module = GRPO(**{"policy": "tiny", "lr": 1e-2, **kwargs})
    logged = fit_and_log(tmp_path, module, make_dm(vary_reward))
    for key in metrics + ["loss/policy", "entropy", "rollout_correction/abs_gap"]:
        assert key in logged, f"{key} never reached the logger; logged: {sorted(logged)}"
        assert all(math.isfinite(v) for v in logged[key]), (key, logged[key])


def test_variants_in_dapo_and_ppo(tmp_path, vary_reward):
    logged = fit_and_log(tmp_path / "dapo", DAPO(policy="tiny", lr=1e-2, loss="cispo", advantage="rloo"),
                         make_dm(vary_reward))
    assert "cispo/weight_mean" in logged
    logged = fit_and_log(tmp_path / "ppo", PPO(policy="tiny", lr=1e-2, loss="sapo"), make_dm(vary_reward))
    assert "sapo/gate_weight_mean" in logged and "value/explained_variance" in logged


def test_adaptive_entropy_coefficient_moves_towards_the_target_and_is_checkpointed(tmp_path, vary_reward):
    # The tiny random model's entropy is ~ log(vocab) > 1: above the target, so the coefficient falls.
    module = GRPO(policy="tiny", lr=1e-2, loss={"entropy_coef": 0.05, "entropy_target": 1.0, "entropy_step": 0.01})
    logged = fit_and_log(tmp_path, module, make_dm(vary_reward), steps=3)
    assert logged["entropy/coef"] == pytest.approx([0.05, 0.04, 0.03])
    assert module.entropy_coef == pytest.approx(0.02)
    checkpoint: dict = {"state_dict": {}}
    module.on_save_checkpoint(checkpoint)
    fresh = GRPO(policy="tiny", loss={"entropy_coef": 0.05, "entropy_target": 1.0, "entropy_step": 0.01})
    fresh.on_load_checkpoint(checkpoint)
    assert fresh.entropy_coef == pytest.approx(0.02)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(loss="gspo", clip={"eps_high": 0.28}), "clip.eps_high=0.28 is invalid: must be 0.2: loss 'gspo'"),
        (dict(loss={"name": "gspo", "options": {"seq_eps_low": -1.0}}), "loss.options.seq_eps_low"),
        (dict(loss={"name": "sapo", "options": {"tau_neg": 0.0}}), "loss.options.tau_neg"),
        (dict(kl={"in_reward": True}), "kl.in_reward=True is invalid: must be False with advantage 'grpo'"),
        (dict(advantage={"name": "reinforce_pp", "options": {"gamma": 1.5}}), "advantage.options.gamma"),
        (dict(advantage={"name": "rloo", "options": {"scale": "group"}}), "advantage.options.scale"),
        (dict(loss={"top_entropy_quantile": 0.0}), "loss.top_entropy_quantile=0.0 is invalid"),
        (dict(loss={"top_entropy_quantile": 1.5}), "loss.top_entropy_quantile"),
        (dict(loss={"entropy_step": 0.0}), "loss.entropy_step"),
        (dict(loss={"correction": {"mode": "bogus"}}), "loss.correction.mode='bogus' is invalid"),
        (dict(loss={"correction": {"mode": "token_truncate", "cap": -1.0}}), "loss.correction.cap"),
        (dict(loss={"correction": {"mode": "icepop", "low": 2.0}}), "loss.correction.low"),
    ],
)
def test_bad_variant_settings_raise_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GRPO(**{"policy": "tiny", **kwargs})


def test_dapo_accepts_gspo_with_its_own_clip_defaults():
    # DAPO's own clip group (0.2 / 0.28) is its default, so choosing GSPO does not trip the check.
    assert DAPO(policy="tiny", loss="gspo").loss_spec.name == "gspo"


@pytest.mark.parametrize("advantage, minimum", [("rloo", 2), ("reinforce_pp_baseline", 2)])
def test_group_size_one_is_refused_before_sampling(advantage, minimum):
    dm = RolloutDataModule(task=Arithmetic(), num_generations=1).attach(GRPO(policy="tiny", advantage=advantage))
    with pytest.raises(ValueError, match=f"num_generations=1 is invalid: must be >= {minimum} for GRPO with advantage '{advantage}'"):
        dm.build_rollout()


def test_reinforce_pp_accepts_groups_of_one(vary_reward):
    module = GRPO(policy="tiny", advantage="reinforce_pp")
    module.configure_model()
    rollout = make_dm(vary_reward, num_generations=1).attach(module).build_rollout()
    assert rollout.advantages.shape == rollout.completion_mask.shape


def test_kl_in_the_reward_changes_reinforce_pp_advantages(vary_reward):
    # Same rollout, same rewards: only the KL penalty in the per-token rewards differs.
    torch.manual_seed(0)
    module = GRPO(policy="tiny", lr=1e-2, beta=0.5, advantage="reinforce_pp", kl={"in_reward": True})
    module.configure_model()
    with torch.no_grad():  # move the policy away from its reference so the KL is not zero
        for p in module.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rollout = make_dm(vary_reward).attach(module).build_rollout()
    assert rollout.old_logp is not None and rollout.ref_logp is not None
    kl = rollout.old_logp - rollout.ref_logp
    assert masked_abs(kl, rollout.completion_mask) > 0
    with_kl = rollout.advantages.clone()
    expected = ADVANTAGE_ESTIMATORS.get("reinforce_pp")(rollout.rewards.float(), 4, rollout.completion_mask,
                                                        kl=kl, kl_coef=0.5)
    assert_close(with_kl, expected)
    without = ADVANTAGE_ESTIMATORS.get("reinforce_pp")(rollout.rewards.float(), 4, rollout.completion_mask)
    assert not torch.allclose(with_kl, without)
    assert "reward/kl_penalty" in rollout.metrics


def masked_abs(x, mask) -> float:
    return float((x.abs() * mask).sum() / mask.sum())


def test_remax_draws_one_greedy_completion_per_prompt_as_baseline(tokenizer):
    # Reward = completion length, so the greedy answer's reward is known from its own length.
    def length(completions, **_):
        return [float(len(c)) for c in completions]

    module = GRPO(policy="tiny", advantage="remax")
    module.configure_model()
    assert module.needs_greedy_baseline and not GRPO(policy="tiny").needs_greedy_baseline
    dm = make_dm({"length": length}, num_generations=3).attach(module)
    rollout = dm.build_rollout()
    prompt_ids, prompt_mask = rollout.prompt_ids[::3], rollout.prompt_mask[::3]
    greedy_ids, greedy_mask = module.generate(prompt_ids, prompt_mask, 1, replace(dm.sampling, greedy=True))[:2]
    texts = tokenizer.batch_decode(greedy_ids.masked_fill(greedy_mask == 0, tokenizer.pad_token_id),
                                   skip_special_tokens=True)
    expected = torch.tensor([float(len(t)) for t in texts]).repeat_interleave(3)
    assert_close(rollout.baseline_rewards, expected)
    assert_close(rollout.seq_advantages, rollout.rewards.float() - expected)
    assert rollout.metrics["reward/greedy_mean"] == pytest.approx(expected.mean().item())


def test_sampler_logprobs_are_the_trainers_in_float32(vary_reward):
    module = GRPO(policy="tiny")
    module.configure_model()
    rollout = make_dm(vary_reward).attach(module).build_rollout()
    assert rollout.sampler_logp is not None and rollout.sampler_logp.shape == rollout.completion_mask.shape
    with torch.no_grad():
        trainer_logp = selective_log_softmax(module.policy_logits(rollout), rollout.completion_ids)
    mask = rollout.completion_mask.bool()
    assert_close(rollout.sampler_logp[mask], trainer_logp[mask], atol=1e-4, rtol=1e-4)
    assert (rollout.sampler_logp[~mask] == 0).all()


def test_bfloat16_sampling_copy_shows_a_gap_and_correction_reweights(tmp_path, vary_reward):
    module = GRPO(policy="tiny", lr=1e-2, forward={"sampling_dtype": "bfloat16"},
                  loss={"correction": {"mode": "token_truncate", "cap": 1.0}})
    logged = fit_and_log(tmp_path, module, make_dm(vary_reward))
    assert min(logged["rollout_correction/abs_gap"]) > 0, "a bfloat16 sampler differs from the float32 trainer"
    # cap 1: every token whose trainer probability exceeds the sampler's is truncated
    assert max(logged["rollout_correction/corrected_share"]) > 0
    assert max(logged["rollout_correction/weight_mean"]) <= 1.0


def test_correction_is_refused_with_a_sampler_that_reports_no_log_probs(monkeypatch):
    from rftlab.rollout import vllm_backend

    monkeypatch.setattr(vllm_backend, "vllm_installed", lambda: True)  # pretend vllm and a GPU exist
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    module = GRPO(policy="tiny", loss={"correction": {"mode": "token_truncate"}})
    dm = RolloutDataModule(task=Arithmetic(num_test=0), sampler_backend="vllm").attach(module)
    with pytest.raises(ValueError, match="loss.correction.mode='token_truncate' is invalid: must be 'none' with "
                                         "sampler_backend='vllm'"):
        dm.build_rollout()
