"""DAPO: defaults, overlong shaping, dynamic sampling in the shared DataModule, metrics in W&B."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from helpers import assert_params_changed, fit_tiny, trainable_snapshot
from lightning.pytorch.loggers import WandbLogger

from rftlab import DAPO, GRPO, PPO, RolloutDataModule
from rftlab.tasks import Arithmetic, RowsTask
from wandb_records import complete, find_run_files, finish_offline_run, read_history


def half_constant_task(n: int = 40) -> RowsTask:
    """Even rows: the reward is 1 for every completion (zero variance). Odd rows: it alternates."""
    rows = [{"prompt": f"Question {i}?", "answer": str(i), "kind": "const" if i % 2 == 0 else "vary"} for i in range(n)]

    def half_constant(completions, kind, **_):
        # Within a group (G consecutive samples), "vary" rows get 0,1,0,1,...: variance guaranteed.
        return [1.0 if k == "const" else float(i % 2) for i, k in enumerate(kind)]

    return RowsTask(rows, rewards={"half_constant": half_constant})


def tiny_dapo(**kwargs) -> DAPO:
    module = DAPO(**{"policy": "tiny", "lr": 1e-2, **kwargs})
    module.configure_model()
    return module


def test_dapo_defaults_are_the_paper_settings():
    m = DAPO(policy="tiny")
    hp = m.hparams
    assert hp.loss.agg == "token-mean" and hp.clip.eps_low == 0.2 and hp.clip.eps_high == 0.28
    assert m.hparams.beta == 0.0 and not m.needs_reference, "DAPO runs no reference model"
    assert m.prefers_dynamic_sampling and not GRPO(policy="tiny").prefers_dynamic_sampling


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(clip={"eps_low": 0.3, "eps_high": 0.2}), "clip.eps_high"),
        (dict(overlong={"buffer_len": 16, "max_len": 16}), "overlong.buffer_len"),
        (dict(overlong={"buffer_len": -1}), "overlong.buffer_len"),
    ],
)
def test_bad_dapo_configuration(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DAPO(policy="tiny", **kwargs)


def test_groups_of_one_fail_before_sampling():
    # num_generations is the DataModule's now: DAPO checks it when the two meet, before any sampling.
    dm = RolloutDataModule(task=Arithmetic(), num_generations=1, dynamic_sampling=False).attach(DAPO(policy="tiny"))
    with pytest.raises(ValueError, match="num_generations=1 is invalid: must be >= 2 for DAPO"):
        dm.build_rollout()


def test_buffer_longer_than_the_completion_budget_fails_before_sampling():
    module = tiny_dapo(overlong={"buffer_len": 8})
    dm = RolloutDataModule(task=Arithmetic(), num_generations=4, max_new_tokens=8).attach(module)
    with pytest.raises(ValueError, match="overlong.buffer_len=8 is invalid: must be < the maximum length 8"):
        dm.build_rollout()


def test_dynamic_sampling_needs_groups_of_two():
    # PPO accepts one completion per prompt, so only the DataModule's own check can refuse it.
    dm = RolloutDataModule(task=Arithmetic(), num_generations=1, dynamic_sampling=True).attach(PPO(policy="tiny"))
    with pytest.raises(ValueError, match="dynamic_sampling needs num_generations >= 2"):
        dm.build_rollout()


def test_overlong_shaping_is_added_to_the_reward():
    module = tiny_dapo(overlong={"buffer_len": 4})
    dm = RolloutDataModule(task=Arithmetic(), rewards={"one": lambda completions, **_: [1.0] * len(completions)},
                           prompts_per_step=2, num_generations=4, max_new_tokens=8, dynamic_sampling=False).attach(module)
    rollout = dm.build_rollout()
    lengths = rollout.completion_lengths.float()
    # L <= 4: 0; 4 < L <= 8: (4 - L) / 4 -> the tiny random model rarely stops, so most are -1 at L = 8.
    expected = 1.0 + torch.where(lengths <= 4, torch.zeros_like(lengths), (4 - lengths) / 4)
    torch.testing.assert_close(rollout.rewards, expected)


class SeenKinds(L.Callback):
    def __init__(self):
        self.kinds, self.groups, self.metrics = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.kinds.extend(row["kind"] for row in batch.rows)
        self.groups.append(len(torch.unique(batch.group)))
        self.metrics.append(dict(batch.metrics))


def test_dynamic_sampling_drops_zero_variance_groups_and_fills_the_batch():
    module = tiny_dapo()
    dm = RolloutDataModule(task=half_constant_task(), prompts_per_step=3, num_generations=4, max_new_tokens=4,
                           max_gen_batches=10)
    spy = SeenKinds()
    fit_tiny(module, dm, 3, callbacks=[spy])
    assert set(spy.kinds) == {"vary"}, "a zero-variance group reached training_step"
    assert spy.groups == [3, 3, 3], "every step gets its full batch of groups"
    for m in spy.metrics:
        rounds = m["dynamic_sampling/gen_batches"]
        sampled_groups = 3 * rounds
        # kept 3 groups out of everything sampled; the zero-std fraction is measured before filtering
        assert m["dynamic_sampling/kept_fraction"] == pytest.approx(3 / sampled_groups)
        assert m["frac_reward_zero_std"] <= 1 - 3 / sampled_groups + 1e-9
        # a second round is sampled only when the first one lost groups to the filter
        assert (rounds > 1) == (m["frac_reward_zero_std"] > 0)
    assert any(m["frac_reward_zero_std"] > 0 for m in spy.metrics), "the filter never had work to do"


def test_max_gen_batches_is_respected(monkeypatch):
    module = tiny_dapo()
    calls = []
    original = module.generate
    monkeypatch.setattr(module, "generate", lambda *a, **k: calls.append(1) or original(*a, **k))
    constant = RowsTask([{"prompt": f"q{i}"} for i in range(20)], rewards={"c": lambda completions, **_: [1.0] * len(completions)})
    dm = RolloutDataModule(task=constant, prompts_per_step=2, num_generations=4, max_new_tokens=4,
                           max_gen_batches=3).attach(module)
    rollout = dm.build_rollout()
    assert len(calls) == 3
    assert rollout.metrics["dynamic_sampling/gen_batches"] == 3
    assert rollout.metrics["dynamic_sampling/kept_fraction"] == 0
    assert torch.all(rollout.seq_advantages == 0), "nothing to learn from an all-constant batch"
    strict = RolloutDataModule(task=constant, prompts_per_step=2, num_generations=4, max_new_tokens=4,
                               max_gen_batches=2, on_short_batch="raise").attach(module)
    with pytest.raises(RuntimeError, match="max_gen_batches=2"):
        strict.build_rollout()


def test_dapo_trains_and_logs_its_metrics_to_wandb(tmp_path):
    module = tiny_dapo(overlong={"buffer_len": 2}, loss={"mask_truncated": False})
    before = trainable_snapshot(module)
    dm = RolloutDataModule(task=half_constant_task(), prompts_per_step=2, num_generations=4, max_new_tokens=4)
    logger = WandbLogger(project="rftlab-tests", save_dir=str(tmp_path), offline=True)
    fit_tiny(module, dm, 2, logger=logger)
    finish_offline_run()
    assert_params_changed(before, module, require="any")
    history = read_history(complete(find_run_files(tmp_path)[0]))
    keys = {k for row in history for k in row}
    for key in ("dynamic_sampling/gen_batches", "dynamic_sampling/kept_fraction", "frac_reward_zero_std",
                "overlong/penalty_mean", "clip_ratio/low", "clip_ratio/high", "loss/policy", "entropy", "grad_norm"):
        assert key in keys, f"{key} missing; logged {sorted(keys)}"
        values = [row[key] for row in history if key in row]
        assert all(math.isfinite(v) for v in values)


def test_mask_truncated_completions_removes_their_loss():
    module = tiny_dapo(loss={"mask_truncated": True})
    dm = RolloutDataModule(task=Arithmetic(), rewards={"r": lambda completions, **_: [float(i % 2) for i in range(len(completions))]},
                           prompts_per_step=2, num_generations=4, max_new_tokens=3, dynamic_sampling=False).attach(module)
    rollout = dm.build_rollout()
    assert rollout.truncated.all(), "3 tokens from a random model: every completion is truncated"
    loss, _ = module.compute_loss(rollout)
    assert loss.item() == 0.0
