"""Dashboards on W&B, TensorBoard and CSV: the same metric keys, histograms, sample tables, timing."""

from __future__ import annotations

import csv
import json
import math
import time

import pytest
from helpers import fit_tiny
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from rftlab import GRPO, RolloutDataModule
from rftlab.callbacks import CompletionTable, PhaseTimer, RolloutHistograms, TrainClock, WandbMetrics
from rftlab.tasks import Arithmetic
from wandb_records import WandbFileError, find_run_files, iter_records, read_history, read_tables

STEPS = 3
RL_KEYS = {"reward/mean", "reward/parity/mean", "reward/std", "entropy", "loss/policy", "grad_norm",
           "completions/mean_length", "timing/generate", "timing/reward", "timing/score", "timing/train",
           "timing/step", "timing/fraction/generate", "timing/fraction/train", "timing/validation", "val/accuracy"}


def parity(completions, **_):
    return [float(len(c) % 2 == 0) for c in completions]


def fit(tmp_path, logger):
    module = GRPO(policy="tiny", lr=1e-2)
    dm = RolloutDataModule(task=Arithmetic(num_test=2), rewards={"parity": parity}, prompts_per_step=2,
                           num_generations=4, max_new_tokens=5, val_batch_size=2)
    callbacks = [TrainClock(), WandbMetrics(), CompletionTable(every_n_steps=1, max_rows=3),
                 RolloutHistograms(every_n_steps=1), PhaseTimer()]
    return fit_tiny(module, dm, STEPS, tmp_path, logger=logger, callbacks=callbacks, val_check_interval=2,
                    check_val_every_n_epoch=None, limit_val_batches=None)


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wandb")
    fit(tmp, WandbLogger(project="rftlab-tests", save_dir=str(tmp), offline=True))
    import wandb

    wandb.finish()
    files = find_run_files(tmp)
    assert len(files) == 1
    # wandb-core writes the file from its own process; on a busy machine its last records can land
    # just after finish() returns, so wait (bounded) until the log parses to its end.
    deadline = time.monotonic() + 60
    while True:
        try:
            list(iter_records(files[0]))
            return files[0]
        except WandbFileError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def scalar_keys(history):
    keys = set()
    for row in history:
        keys |= {k for k, v in row.items() if isinstance(v, (int, float)) and not k.startswith("_")}
    return keys - {"trainer/global_step", "epoch"}


def test_wandb_metrics_are_defined_against_the_trainer_step(wandb_run):
    metrics = [r.metric for r in iter_records(wandb_run) if r.WhichOneof("record_type") == "metric"]
    assert any(m.glob_name == "*" and m.step_metric == "trainer/global_step" for m in metrics)
    assert any(m.name == "val/accuracy" and m.step_metric == "trainer/global_step" for m in metrics)
    history = read_history(wandb_run)
    # Lightning logs the k-th update's scalars at step k - 1; histograms and tables must match.
    for key in ("reward/mean", "histograms/reward", "samples"):
        assert [r["trainer/global_step"] for r in history if key in r] == list(range(STEPS)), key


def test_wandb_histograms_tables_and_reward_chart(wandb_run):
    history = read_history(wandb_run)
    hist = [r for r in history if "histograms/reward" in r]
    assert len(hist) == STEPS
    for key in ("histograms/reward", "histograms/reward/parity", "histograms/completion_length", "histograms/advantage"):
        assert hist[0][key]["_type"] == "histogram" and sum(hist[0][key]["values"]) == 8, key
    tables = {t.key: t for t in read_tables(wandb_run)}
    samples = tables["samples"].load()
    assert samples["columns"] == ["prompt", "completion", "reward", "reward/parity", "advantage", "length"]
    assert len(samples["data"]) == 3 and all(isinstance(row[4], float) for row in samples["data"])
    chart = tables["charts/reward_per_function_table"].load()
    assert len(chart["data"]) == STEPS and "parity" in {row[1] for row in chart["data"]}
    assert RL_KEYS <= scalar_keys(history), RL_KEYS - scalar_keys(history)


def test_phase_fractions_are_shares_of_the_step(wandb_run):
    for row in read_history(wandb_run):
        if "timing/step" in row:
            fractions = [row[k] for k in row if k.startswith("timing/fraction/")]
            assert len(fractions) == 4 and all(0.0 <= f <= 1.0 for f in fractions)
            assert sum(fractions) <= 1.0 + 1e-6, "phases of one step cannot exceed the step"


def test_csv_logger_gets_the_same_metric_keys(tmp_path, wandb_run):
    trainer = fit(tmp_path, CSVLogger(save_dir=tmp_path, name="csv"))
    log_dir = trainer.logger.log_dir
    with open(f"{log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0]) - {"step", "epoch"}
    quantiles = {c for c in columns if c.startswith("histograms/")}
    assert {"histograms/reward/p50", "histograms/completion_length/p90", "histograms/reward/parity/p10"} <= quantiles
    wandb_keys = scalar_keys(read_history(wandb_run))
    assert columns - quantiles == wandb_keys, (columns - quantiles) ^ wandb_keys
    values = [float(r["reward/mean"]) for r in rows if r["reward/mean"]]
    assert len(values) == STEPS and all(math.isfinite(v) for v in values)
    samples = [json.loads(line) for line in open(f"{log_dir}/samples.jsonl")]
    assert len(samples) == 3 * STEPS and {"reward/parity", "advantage", "length"} <= set(samples[0])


def test_tensorboard_logger_gets_scalars_histograms_and_samples(tmp_path, wandb_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = fit(tmp_path, TensorBoardLogger(save_dir=tmp_path, name="tb"))
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"histograms": 0, "tensors": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    scalars = set(tags["scalars"]) - {"epoch", "hp_metric"}
    assert scalars == scalar_keys(read_history(wandb_run)), scalars ^ scalar_keys(read_history(wandb_run))
    assert {"histograms/reward", "histograms/completion_length", "histograms/reward/parity"} <= set(tags["histograms"])
    assert len(events.Histograms("histograms/reward")) == STEPS
    assert any("samples" in t for t in tags["tensors"]), tags["tensors"]


def test_bad_intervals_are_reported():
    with pytest.raises(ValueError, match="every_n_steps=0 is invalid"):
        RolloutHistograms(every_n_steps=0)
