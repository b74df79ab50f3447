"""Faults inside a run: non-finite losses and gradients, failing rewards, degenerate generations.

None may corrupt the weights or lose the checkpoint; each is counted in the logged metrics.
"""

from __future__ import annotations

import time

import pytest
import torch

from rftlab import DAPO, GRPO, RolloutDataModule
from rftlab.algorithms.faults import NonFiniteTrainingError
from rftlab.rewards.base import RewardError
from rftlab.tasks import Arithmetic
from helpers import assert_params_changed, assert_params_unchanged, fit_tiny, trainable_snapshot
from reliability_helpers import StepRecorder, fit, parity

DM = dict(task=Arithmetic(num_test=0), prompts_per_step=2, num_generations=2, max_new_tokens=4)


def module(**kwargs) -> GRPO:
    return GRPO(**{"policy": "tiny", "lr": 1e-2, "lora": True, "log": {"validate_at_start": False}, **kwargs})


class Poisoned(GRPO):
    """GRPO whose loss (or gradient) is non-finite at chosen optimizer steps."""

    def __init__(self, bad_steps: list[int] | None = None, where: str = "loss", **kwargs) -> None:
        super().__init__(**kwargs)
        self.bad_steps, self.where = set(bad_steps or []), where

    def compute_loss(self, batch):
        loss, metrics = super().compute_loss(batch)
        if self.global_step in self.bad_steps:
            if self.where == "loss":
                loss = loss * float("nan")
            else:  # a finite loss whose gradient is NaN: d/dx sqrt(|x|) at 0 is inf, times 0
                p = next(p for p in self.parameters() if p.requires_grad)
                loss = loss + (p.sum() * 0.0).abs().sqrt()
        return loss, metrics


def poisoned(bad_steps, where="loss", **kwargs) -> Poisoned:
    return Poisoned(bad_steps, where, **{"policy": "tiny", "lr": 1e-2, "lora": True, "log": {"validate_at_start": False},
                                         **kwargs})


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_k_nonfinite_steps_in_a_row_abort_after_saving_a_checkpoint(where, tmp_path):
    model = poisoned([1, 2, 3], where, optim={"max_nonfinite_steps": 3})
    model.configure_model()
    dm = RolloutDataModule(rewards={"parity": parity}, **DM)
    recorder = StepRecorder()
    with pytest.warns(UserWarning, match=f"non-finite {where} at step 1: update skipped \\(1 in a row\\)"):
        with pytest.raises(NonFiniteTrainingError, match=f"3 optimizer steps in a row had a non-finite {where}") as info:
            fit_tiny(model, dm, 10, tmp_path, callbacks=[recorder])
    assert model.faults.total == 3
    path = tmp_path / "checkpoints" / "nonfinite-abort-step=3.ckpt"
    assert str(path) in str(info.value)
    saved = torch.load(path, weights_only=True)
    weights = {k: v for k, v in saved["state_dict"].items() if "lora" in k}
    assert weights and all(torch.isfinite(v).all() for v in weights.values())
    # the skipped steps left the weights exactly where step 1 put them
    assert_params_unchanged(weights, model)
    assert saved["rftlab"]["nonfinite_steps"] == 3

    # The abort checkpoint resumes (with the cause fixed) and trains on.
    healthy, record = fit(lambda: module(), lambda: RolloutDataModule(rewards={"parity": parity}, **DM), 5,
                          tmp_path / "resumed", ckpt_path=str(path))
    assert sorted(record.rewards) == [4, 5] and healthy.faults.total == 3 and healthy.faults.in_a_row == 0


def test_nonfinite_steps_that_are_not_in_a_row_are_skipped_and_counted(tmp_path):
    model = poisoned([0, 2, 4], "loss", optim={"max_nonfinite_steps": 2})
    model.configure_model()
    before = trainable_snapshot(model)
    recorder = StepRecorder()
    with pytest.warns(UserWarning, match="non-finite loss"):
        fit_tiny(model, RolloutDataModule(rewards={"parity": parity}, **DM), 6, tmp_path, callbacks=[recorder])
    assert model.faults.total == 3 and model.faults.in_a_row == 0
    assert recorder.logged[6]["faults/nonfinite_steps"] == 3.0
    assert_params_changed(before, model, require="any", message="the finite steps trained")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_raising_reward_stops_the_run_naming_reward_and_sample_and_keeps_the_checkpoint(tmp_path):
    calls = []

    def breaks_on_third_rollout(completions, **_):
        calls.append(len(completions))
        if sum(n > 1 for n in calls) >= 3:  # batch calls; the per-sample retry to find the culprit fails too
            raise ValueError("grader crashed")
        return parity(completions)

    make_dm = lambda: RolloutDataModule(rewards={"grader": breaks_on_third_rollout}, **DM)  # noqa: E731
    with pytest.raises(RewardError, match=r"reward 'grader' failed on sample 0 .*grader crashed"):
        fit(module, make_dm, 5, tmp_path)
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 2


def test_rewards_that_raise_hang_or_return_junk_are_scored_and_counted_per_policy(tmp_path):
    def junk(completions, **_):
        return ["n/a"] * len(completions)  # not a number

    def hangs(completions, **_):
        time.sleep(2)
        return [1.0] * len(completions)

    dm = RolloutDataModule(rewards={"parity": parity, "junk": junk, "hangs": hangs}, reward_on_error="zero",
                           reward_timeout=0.2, **DM)
    recorder = StepRecorder()
    start = time.perf_counter()
    fit_tiny(module(), dm, 2, tmp_path, callbacks=[recorder])
    assert time.perf_counter() - start < 60, "a hung reward must not hang the run"
    logged = recorder.logged[2]
    assert logged["reward/junk/errors"] == 4.0  # per rollout: 2 prompts x 2 completions
    assert logged["reward/hangs/timeouts"] == 4.0


def _fake_generate(kind: str):
    """A generate() whose completions are all truncated (no EOS within budget) or all a bare EOS."""

    def generate(self, prompt_ids, prompt_mask, num_generations, params):
        n, T = len(prompt_ids) * num_generations, params.max_new_tokens
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        if kind == "truncated":
            ids = torch.full((n, T), 33)  # an ordinary token, never EOS
            return ids, torch.ones(n, T, dtype=torch.long), torch.ones(n, dtype=torch.bool)
        ids = torch.full((n, T), pad)
        ids[:, 0] = eos
        mask = torch.zeros(n, T, dtype=torch.long)
        mask[:, 0] = 1
        return ids, mask, torch.zeros(n, dtype=torch.bool)

    return generate


@pytest.mark.parametrize("kind", ["truncated", "eos"])
@pytest.mark.parametrize("algorithm", [GRPO, DAPO])
def test_all_truncated_or_all_empty_batches_train_without_faults(kind, algorithm, tmp_path, monkeypatch):
    monkeypatch.setattr(algorithm, "generate", _fake_generate(kind))
    extra = dict(loss={"agg": "token-mean", "mask_truncated": True}, overlong={"buffer_len": 2}) if algorithm is DAPO else {}
    model = algorithm(policy="tiny", lr=1e-2, lora=True, log={"validate_at_start": False}, **extra)
    recorder = StepRecorder()
    # every completion scores the same: dynamic sampling finds no variance and keeps the last round
    fit_tiny(model, RolloutDataModule(rewards={"parity": parity}, **DM), 2, tmp_path, callbacks=[recorder])
    logged = recorder.logged[2]
    assert model.faults.total == 0 and "faults/nonfinite_steps" not in logged
    assert torch.isfinite(torch.tensor(logged["loss/policy"]))
    if kind == "truncated":
        assert logged["completions/clipped_ratio"] == 1.0 and logged["completions/mean_length"] == 4.0
        assert logged["completions/empty_ratio"] == 0.0
    else:
        assert logged["completions/empty_ratio"] == 1.0 and logged["completions/mean_length"] == 1.0
        assert logged["completions/clipped_ratio"] == 0.0
    assert logged["frac_reward_zero_std"] == 1.0
