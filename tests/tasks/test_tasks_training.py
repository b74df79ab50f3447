"""A GRPO fit on the code task: the sandboxed reward runs inside the trainer, the weights change,
and each reward's metric reaches W&B."""

from __future__ import annotations

import math

from conftest import length_parity
from helpers import assert_params_changed, fit_tiny, trainable_snapshot
from lightning.pytorch.loggers import WandbLogger
from wandb_records import complete, find_run_files, finish_offline_run, read_history

from rftlab import RolloutDataModule
from rftlab.tasks import CodeFunctions, Curriculum, RowsTask
from rftlab.tasks.curriculum import STAGE_COLUMN


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


def test_grpo_trains_through_a_curriculum(tiny_grpo, vary_reward):
    import lightning as L

    seen: list[int] = []

    class Stages(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.extend(sorted({row[STAGE_COLUMN] for row in batch.rows}))

    def stage(tag: str) -> RowsTask:
        return RowsTask([{"prompt": f"{tag}{i}"} for i in range(4)],
                        rewards={"correct": lambda completions, **_: [0.0] * len(completions)})

    c = Curriculum([stage("a"), stage("b")], stage_prompts=[2])
    module = tiny_grpo()
    dm = RolloutDataModule(task=c, rewards=vary_reward, prompts_per_step=2, num_generations=4, max_new_tokens=6)
    before = trainable_snapshot(module)
    fit_tiny(module, dm, max_steps=3, callbacks=[Stages()])
    assert_params_changed(before, module)
    assert seen == [0, 1, 1], "step 1 from the easy stage (its 2 prompts), then the last stage"
