"""GRPO end to end on the tiny model: validation, training changes weights, metrics reach W&B."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_params_changed, assert_params_unchanged, fit_tiny, trainable_snapshot
from lightning.pytorch.loggers import WandbLogger

from rftlab import GRPO, AdvantageSpec, RolloutDataModule
from rftlab.tasks import Arithmetic
from wandb_records import complete, find_run_files, finish_offline_run, read_history

SHARED_METRICS = [
    "reward/mean", "reward/std", "reward/parity/mean", "kl", "entropy", "grad_norm", "clip_ratio/low",
    "clip_ratio/high", "completions/mean_length", "completions/clipped_ratio", "frac_reward_zero_std",
    "loss/policy", "lr", "timing/generate", "timing/train", "tokens_per_second/generate", "val/accuracy",
    "timing/reward", "timing/logprobs", "timing/ref", "timing/forward", "timing/backward",
]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(clip={"eps_low": 0.2, "eps_high": 0.1}), "clip.eps_high"),
        (dict(beta=-0.1), "beta"),
        (dict(loss={"agg": "mean"}), "loss.agg='mean' is invalid: must be one of seq-mean-token-mean"),
        (dict(advantage={"name": "grpo", "options": {"scale": "std"}}),
         "advantage.options.scale='std' is invalid: must be one of batch, group, none"),
        (dict(kl={"estimator": "k4"}), "kl.estimator='k4' is invalid: must be one of k1, k2, k3"),
        (dict(lr=0.0), "lr"),
        (dict(policy={"model": "tiny", "lora_r": 0}), "policy.lora_r"),
        (dict(policy={"model": "tiny", "dtype": "float8"}), "policy.dtype"),
        (dict(clip={"dual_clip": 0.5}), "clip.dual_clip"),
    ],
)
def test_bad_configuration_raises_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GRPO(**{"policy": "tiny", **kwargs})


def test_groups_of_one_fail_before_sampling():
    # num_generations is the DataModule's now: the algorithm checks it when the two meet, before any sampling.
    dm = RolloutDataModule(task=Arithmetic(), num_generations=1).attach(GRPO(policy="tiny"))
    with pytest.raises(ValueError, match="num_generations=1 is invalid: must be >= 2 for GRPO"):
        dm.build_rollout()


def test_hyperparameters_cover_base_and_algorithm_arguments():
    model = GRPO(policy="tiny", lora=True, advantage=AdvantageSpec(options={"scale": "none"}))
    assert model.hparams.lora is True and model.hparams.advantage.options["scale"] == "none" and model.hparams.lr == 1e-5


def test_grpo_fit_changes_weights_and_logs_every_metric_to_wandb(tmp_path, tiny_grpo, vary_reward):
    module = tiny_grpo(lora=True, beta=0.05, lr=5e-3)
    before = trainable_snapshot(module)
    frozen_before = trainable_snapshot(module, frozen=True)
    dm = RolloutDataModule(task=Arithmetic(num_test=4), rewards=vary_reward, prompts_per_step=2, num_generations=4,
                           max_new_tokens=6, val_batch_size=4)
    logger = WandbLogger(project="rftlab-tests", save_dir=str(tmp_path), offline=True)
    fit_tiny(module, dm, 3, tmp_path, logger=logger, val_check_interval=3, limit_val_batches=None,
             num_sanity_val_steps=2)
    finish_offline_run()
    assert_params_changed(before, module, require="any", message="no trainable parameter changed")
    assert_params_unchanged(frozen_before, module)
    assert any("lora" in n for n in before) and not any("lora" not in n for n in before)

    files = find_run_files(tmp_path)
    assert len(files) == 1
    history = read_history(complete(files[0]))
    logged: dict[str, list[float]] = {}
    for row in history:
        for key, value in row.items():
            logged.setdefault(key, []).append(value)
    for key in SHARED_METRICS:
        assert key in logged, f"{key} never reached W&B; logged: {sorted(logged)}"
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in logged[key]), (key, logged[key])
    assert len(logged["reward/mean"]) == 3, "one row of RL metrics per optimizer step"
    assert len(logged["val/accuracy"]) == 2, "at start and after step 3"


def test_no_reference_forward_when_beta_is_zero(tiny_grpo, vary_reward, monkeypatch):
    # kl.log_every None: by default LoRA runs log the KL to the reference at step 0 (then every 10).
    module = tiny_grpo(lora=True, beta=0.0, kl={"log_every": None})
    calls = []
    original = module.policy_logits

    def spy(batch, reference=False):
        calls.append(reference)
        return original(batch, reference=reference)

    monkeypatch.setattr(module, "policy_logits", spy)
    dm = RolloutDataModule(task=Arithmetic(), rewards=vary_reward, prompts_per_step=2, num_generations=4,
                           max_new_tokens=4).attach(module)
    rollout = dm.build_rollout()
    module.compute_loss(rollout)
    assert calls == [False], "beta=0, one update per rollout: exactly one (training) forward"


def test_full_finetuning_with_kl_keeps_a_frozen_reference(tiny_grpo, vary_reward):
    module = tiny_grpo(lora=False, beta=0.1)
    assert module.ref_policy is not None
    assert not any(p.requires_grad for p in module.ref_policy.parameters())
    dm = RolloutDataModule(task=Arithmetic(), rewards=vary_reward, prompts_per_step=2, num_generations=4,
                           max_new_tokens=4).attach(module)
    rollout = dm.build_rollout()
    loss, metrics = module.compute_loss(rollout)
    assert metrics["kl"].item() == pytest.approx(0.0, abs=1e-6)  # policy == reference before training
    loss.backward()
    assert any(p.grad is not None for p in module.policy.parameters())


def test_dr_grpo_options(tiny_grpo, vary_reward):
    module = tiny_grpo(advantage="dr_grpo", loss={"agg": "seq-mean-token-sum-norm"})
    dm = RolloutDataModule(task=Arithmetic(), rewards=vary_reward, prompts_per_step=2, num_generations=4,
                           max_new_tokens=4).attach(module)
    rollout = dm.build_rollout()
    G = dm.num_generations
    expected = rollout.rewards.view(-1, G) - rollout.rewards.view(-1, G).mean(1, keepdim=True)
    torch.testing.assert_close(rollout.seq_advantages, expected.reshape(-1))


def test_nonfinite_loss_skips_the_update(tiny_grpo, vary_reward, monkeypatch):
    module = tiny_grpo(lora=True)
    before = trainable_snapshot(module)
    monkeypatch.setattr(module, "compute_loss", lambda batch: (torch.tensor(float("nan"), requires_grad=True), {}))
    dm = RolloutDataModule(task=Arithmetic(num_test=0), rewards=vary_reward, prompts_per_step=2, num_generations=4,
                           max_new_tokens=4)
    with pytest.warns(UserWarning, match="non-finite loss"):
        fit_tiny(module, dm, 2, max_epochs=1, limit_train_batches=2)
    assert module.faults.total == 2
    assert_params_unchanged(before, module)


def test_dr_grpo_divides_by_the_generation_budget_not_the_longest_reply(tiny_grpo, vary_reward):
    # Dr. GRPO (arXiv 2503.20783 §3.2) sums each reply's token losses over one constant, the budget:
    # a batch of short replies must not get a larger step than a batch of long ones.
    import dataclasses

    module = tiny_grpo(advantage="dr_grpo", loss={"agg": "seq-mean-token-sum-norm"}, beta=0.0)
    dm = RolloutDataModule(task=Arithmetic(), rewards=vary_reward, prompts_per_step=2, num_generations=4,
                           max_new_tokens=4).attach(module)
    rollout = dm.build_rollout()
    width = rollout.completion_ids.shape[1]
    assert rollout.max_new_tokens == 4 and width <= 4
    def gradient(r):
        module.zero_grad()
        module.compute_loss(r)[0].backward()
        return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])

    at_budget = gradient(rollout)
    assert at_budget.abs().sum() > 0  # vary_reward: the groups carry a signal
    torch.testing.assert_close(gradient(dataclasses.replace(rollout, max_new_tokens=40)), at_budget / 10)
    # an unknown budget falls back to the batch's width T
    torch.testing.assert_close(gradient(dataclasses.replace(rollout, max_new_tokens=None)), at_budget * 4 / width)
