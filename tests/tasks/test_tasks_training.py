"""A GRPO fit on the code task: the sandboxed reward runs inside the trainer, the weights change,
and each reward's metric reaches W&B."""

from __future__ import annotations

import math

from conftest import length_parity
from helpers import assert_params_changed, fit_tiny, trainable_snapshot
from lightning.pytorch.loggers import WandbLogger
from wandb_records import complete, find_run_files, finish_offline_run, read_history

from rftlab import RolloutDataModule
from rftlab.tasks import CodeFunctions


def _fit_and_read(tmp_path, module, task, rewards, weights, steps=2):
    dm = RolloutDataModule(task=task, rewards=rewards, reward_weights=weights, prompts_per_step=2,
                           num_generations=4, max_new_tokens=8, val_batch_size=4)
    logger = WandbLogger(project="rftlab-tests", save_dir=str(tmp_path), offline=True)
    fit_tiny(module, dm, steps, tmp_path, logger=logger)
    finish_offline_run()
    logged: dict[str, list[float]] = {}
    for row in read_history(complete(find_run_files(tmp_path)[0])):
        for key, value in row.items():
            logged.setdefault(key, []).append(value)
    return logged


def test_grpo_trains_on_the_code_task_with_the_sandbox(tmp_path, tiny_grpo):
    task = CodeFunctions(num_test=2, timeout=2.0)
    # The random tiny model never writes passing code, so a reward with variance is added for
    # the update to move the weights; the sandboxed reward still scores every completion.
    rewards = {**task.reward_functions(), "parity": length_parity}
    module = tiny_grpo()
    before = trainable_snapshot(module)
    logged = _fit_and_read(tmp_path, module, task, rewards, [1.0, 0.1, 1.0])
    assert_params_changed(before, module, require="any", message="no trainable parameter changed")
    for key in ("reward/tests/mean", "reward/format/mean", "reward/parity/mean", "timing/reward"):
        assert key in logged and len(logged[key]) == 2, f"{key} did not reach W&B each step: {sorted(logged)}"
        assert all(math.isfinite(v) for v in logged[key])
    assert logged["reward/tests/mean"] == [0.0, 0.0]  # random text passes no test, and harms nothing

