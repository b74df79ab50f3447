"""A variant defined outside the package (a registered advantage and a registered loss) works everywhere:
Python, ``rftlab fit`` with a YAML that names it, ``rftlab compare``, and its metrics reach W&B offline."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

from rftlab import GRPO, PPO, RolloutDataModule
from rftlab.tasks import Arithmetic
from wandb_records import complete, find_run_files, read_history

HERE = Path(__file__).resolve().parent
PLUGIN = HERE / "plugins" / "my_variants.py"
ROOT = HERE.parent
LOSS = {"name": "test_clipped_reinforce", "options": {"max_weight": 3.0}}


def parity(completions, **_):
    """Reward with variance on random text."""
    return [float(len(c) % 2 == 0) for c in completions]


def _import_plugin():
    from rftlab.core.plugins import import_plugins

    return import_plugins([str(PLUGIN)])[0]


def _history_with(path, key, seconds=60):
    """The run's history once ``key`` is in it: wandb-core (another process) may still be writing."""
    deadline = time.monotonic() + seconds
    while True:
        history = read_history(path)
        if any(key in row for row in history) or time.monotonic() > deadline:
            return history
        time.sleep(0.5)


def test_registered_pieces_train_from_python(tmp_path):
    _import_plugin()
    for module in (GRPO(policy="tiny", lora=True, lr=1e-2, advantage="test_leave_one_out", loss=LOSS),
                   PPO(policy="tiny", lora=True, lr=1e-2, loss=LOSS)):  # a loss of one's own under PPO's critic
        dm = RolloutDataModule(task=Arithmetic(num_test=2), rewards={"parity": parity}, prompts_per_step=2,
                               num_generations=4, max_new_tokens=6, num_iterations=2)
        module.configure_model()
        before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
        trainer = L.Trainer(max_steps=2, logger=CSVLogger(tmp_path), enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
        trainer.fit(module, datamodule=dm)
        unchanged = [n for n, p in module.named_parameters() if n in before and torch.equal(before[n], p.detach())]
        assert not unchanged, f"parameters that did not train: {unchanged[:5]}"
        assert "test_reinforce/capped_fraction" in trainer.logged_metrics
        assert trainer.logged_metrics["test_reinforce/max_weight"] == 3.0, "the option reached the loss"


def test_registered_pieces_train_from_rftlab_fit_yaml_and_reach_wandb(tmp_path):
    config = tmp_path / "plugin.yaml"
    config.write_text(f"""
imports: [{PLUGIN}]
seed_everything: 0
trainer:
  max_steps: 2
  enable_checkpointing: false
  enable_progress_bar: false
  logger:
    class_path: rftlab.callbacks.wandb.RFTWandbLogger
    init_args: {{project: rftlab-test, save_dir: {tmp_path / "runs"}, offline: true}}
  callbacks: []
model:
  class_path: rftlab.GRPO
  init_args:
    policy: tiny
    lora: true
    lr: 1.0e-2
    advantage: {{name: test_leave_one_out, options: {{scale: 2.0}}}}
    loss: {{name: test_clipped_reinforce, options: {{max_weight: 3.0}}}}
    log: {{validate_at_start: false}}
data:
  class_path: rftlab.RolloutDataModule
  init_args:
    task: {{class_path: rftlab.tasks.Arithmetic, init_args: {{num_test: 2}}}}
    rewards: {{parity: {{class_path: rftlab.rewards.RegexFormat, init_args: {{pattern: "^.{{0,3}}$"}}}}}}
    prompts_per_step: 2
    num_generations: 4
    max_new_tokens: 6
""")
    # A fresh process, as a user runs it: nothing of the plug-in is imported but through `imports`.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    out = subprocess.run([sys.executable, "-m", "rftlab.cli", "fit", "--config", str(config)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=400, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    files = [complete(f) for f in find_run_files(tmp_path / "runs")]
    assert len(files) == 1
    history = _history_with(files[0], "test_reinforce/capped_fraction")
    assert any("test_reinforce/capped_fraction" in row for row in history), "the loss's metric reached W&B"
    assert any("reward/mean" in row for row in history)


def test_a_yaml_naming_an_unimported_piece_fails_listing_the_registered_ones(tmp_path):
    config = tmp_path / "missing.yaml"
    config.write_text("model: {class_path: rftlab.GRPO, init_args: {policy: tiny, advantage: not_registered_anywhere}}\n"
                      "data: {class_path: rftlab.RolloutDataModule, init_args: {task: {class_path: rftlab.tasks.Arithmetic}}}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    out = subprocess.run([sys.executable, "-m", "rftlab.cli", "fit", "--config", str(config), "--trainer.logger", "false"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode != 0
    assert "advantage.name='not_registered_anywhere' is invalid: must be one of dr_grpo, gae, grpo" in out.stderr


def test_registered_pieces_train_inside_rftlab_compare(tmp_path):
    from rftlab.cli import main

    config = tmp_path / "compare.yaml"
    config.write_text(f"""
imports: [{PLUGIN}]
experiment: plugin-exp
processes: 2             # worker processes start without the plug-in: `imports` must reach them too
threads: 1
seeds: [0]
budget: {{steps: 2}}
eval_every: null
logger: wandb
project: rftlab-test
model: {{policy: tiny, lora: true, lr: 1.0e-2}}
data:
  task: {{class_path: rftlab.tasks.Arithmetic, init_args: {{num_test: 2}}}}
  rewards: {{parity: {{class_path: rftlab.rewards.RegexFormat, init_args: {{pattern: "^.{{0,3}}$"}}}}}}
  prompts_per_step: 2
  num_generations: 4
  max_new_tokens: 4
variants:
  - {{name: grpo, algorithm: rftlab.GRPO}}
  - name: mine
    algorithm: rftlab.GRPO
    model: {{advantage: test_leave_one_out, loss: {{name: test_clipped_reinforce}}, optim: {{warmup_steps: 1}}}}
""")
    os.environ.setdefault("WANDB_MODE", "offline")
    main(["compare", "--config", str(config), "--output_dir", str(tmp_path / "out")])
    out = tmp_path / "out"
    assert "| mine |" in (out / "results.md").read_text()
    histories = {f.parent.name: _history_with(complete(f), "reward/mean") for f in find_run_files(out)}
    mine = [h for h in histories.values() if any("test_reinforce/capped_fraction" in row for row in h)]
    assert len(mine) == 1, "exactly the plug-in variant logs the plug-in loss's metric to W&B"
