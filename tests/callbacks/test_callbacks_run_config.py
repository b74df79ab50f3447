"""A run from Python (no CLI, no callbacks given) still tells which algorithm, task and data options it
used, gets the sample table and W&B layout, and logs the KL to the reference when one is free."""

from __future__ import annotations

import lightning as L
import pytest
from helpers import fit_tiny
from lightning.pytorch.loggers import CSVLogger

from rftlab import DAPO, GRPO, RolloutDataModule
from rftlab.callbacks import AtomicCheckpoints, CompletionTable, TrainClock, WandbMetrics, make_wandb_logger
from rftlab.tasks import Arithmetic
from wandb_records import complete, find_run_files, finish_offline_run, read_config


def parity(completions, **_):
    return [float(len(c) % 2 == 0) for c in completions]


def _data(**overrides):
    return RolloutDataModule(task=Arithmetic(digits=3, num_test=2), rewards={"parity": parity}, prompts_per_step=2,
                             num_generations=2, max_new_tokens=3, **overrides)


def test_a_python_run_records_algorithm_task_and_data_options_in_wandb(tmp_path):
    logger = make_wandb_logger(project="rftlab-tests", save_dir=str(tmp_path), offline=True)
    module = DAPO(policy="tiny", lr=1e-2, lora=True, log={"validate_at_start": False})
    fit_tiny(module, _data(temperature=0.9), 1, logger=logger)
    finish_offline_run()
    config = read_config(complete(find_run_files(tmp_path)[0]))
    assert config["algorithm"] == "rftlab.algorithms.dapo.DAPO"
    assert config["task"] == {"class_path": "rftlab.tasks.arithmetic.Arithmetic", "name": "arithmetic"} | {
        k: v for k, v in config["task"].items() if k not in ("class_path", "name")}
    assert config["task"]["digits"] == 3
    data = config["data"]
    assert data["temperature"] == 0.9 and data["num_generations"] == 2 and data["max_new_tokens"] == 3
    assert data["rewards"] == {"parity": f"{__name__}.parity"}
    assert config["lr"] == 1e-2, "the module's own hyperparameters are still there"


def test_default_callbacks_join_a_bare_trainer_and_yield_to_the_users_own(tmp_path):
    module = GRPO(policy="tiny", lr=1e-2, lora=True, log={"validate_at_start": False})
    trainer = fit_tiny(module, _data(), 1, tmp_path)
    kinds = [type(c) for c in trainer.callbacks]
    for kind in (TrainClock, CompletionTable, WandbMetrics, AtomicCheckpoints):
        assert kinds.count(kind) == 1, f"{kind.__name__}: {kinds}"

    mine = CompletionTable(every_n_steps=3)
    module = GRPO(policy="tiny", lr=1e-2, lora=True, log={"validate_at_start": False})
    trainer = fit_tiny(module, _data(), 1, tmp_path, callbacks=[mine])
    tables = [c for c in trainer.callbacks if isinstance(c, CompletionTable)]
    assert tables == [mine], "the user's own settings are kept"

    module = GRPO(policy="tiny", lr=1e-2, lora=True, log={"validate_at_start": False, "default_callbacks": False})
    trainer = fit_tiny(module, _data(), 1, tmp_path)
    assert not any(isinstance(c, (CompletionTable, WandbMetrics)) for c in trainer.callbacks)


def test_kl_reaches_the_logger_at_beta_0_when_the_reference_is_free(tmp_path):
    module = GRPO(policy="tiny", lr=1e-2, lora=True, log={"validate_at_start": False})  # beta 0, kl defaults
    trainer = fit_tiny(module, _data(), 1, tmp_path, logger=CSVLogger(tmp_path))
    assert "kl" in trainer.logged_metrics
    header = next(tmp_path.rglob("metrics.csv")).read_text().splitlines()[0].split(",")
    assert "kl" in header


def test_full_fine_tuning_at_beta_0_says_why_kl_is_absent(tmp_path, caplog):
    module = GRPO(policy="tiny", lr=1e-2, log={"validate_at_start": False})
    with caplog.at_level("INFO", logger="lightning.pytorch"):  # Lightning's own info messages
        trainer = fit_tiny(module, _data(), 1, tmp_path)
    assert "kl" not in trainer.logged_metrics
    said = [r.getMessage() for r in caplog.records if "kl is not logged" in r.getMessage()]
    assert len(said) == 1 and "lora=True" in said[0], said


@pytest.mark.parametrize("value", ["sometimes", 0])
def test_bad_kl_log_every(value):
    with pytest.raises(ValueError, match=r"kl\.log_every="):
        GRPO(policy="tiny", lora=True, kl={"log_every": value})


@pytest.mark.parametrize("limit, expected", [(1, 1), (2, 2), (0.5, 2), (1.0, 4), (100, 4)])
def test_validation_before_training_honours_limit_val_batches(tmp_path, limit, expected):
    # 8 held-out prompts in batches of 2: four batches; Lightning's own validation loop obeys
    # limit_val_batches, and so must the evaluation before the first step.
    module = GRPO(policy="tiny", lr=1e-2, lora=True)
    dm = RolloutDataModule(task=Arithmetic(num_test=8), rewards={"parity": parity}, prompts_per_step=2,
                           num_generations=2, max_new_tokens=2, val_batch_size=2, val_max_new_tokens=2)
    served = []
    original = dm.val_dataloader

    class Counted:
        def __init__(self, stream):
            self.stream = stream

        def __len__(self):
            return len(self.stream)

        def __iter__(self):
            for batch in self.stream:
                served.append(len(batch.correct))
                yield batch

    dm.val_dataloader = lambda: Counted(original())
    fit_tiny(module, dm, 1, tmp_path, limit_val_batches=limit, val_check_interval=10**6,
             check_val_every_n_epoch=None, num_sanity_val_steps=0)
    assert len(served) == expected and module.initial_val_accuracy is not None
