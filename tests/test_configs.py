"""Every shipped YAML parses and instantiates through the LightningCLI (no model is loaded)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rftlab.cli import make_cli

# compare_*.yaml are `rftlab compare` configs, not LightningCLI ones (tests/experiments parses them).
CONFIGS = sorted(p for p in (Path(__file__).parent.parent / "configs").glob("*.yaml") if not p.name.startswith("compare_"))
# GPU recipes (FSDP, DeepSpeed): everything but the Trainer is instantiated here (no GPU, no deepspeed).
GPU_CONFIGS = {p for p in CONFIGS if "accelerator: gpu" in p.read_text()}


def test_there_are_configs():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_instantiates(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = make_cli(["--config", str(path), "--trainer.logger", "false"], run=False, trainer=path not in GPU_CONFIGS)
    from rftlab import RFTModule, RolloutDataModule

    assert isinstance(cli.model, RFTModule)
    assert isinstance(cli.datamodule, RolloutDataModule)
    assert cli.model.policy is None, "constructing a module must not load weights"


def test_bad_value_in_yaml_is_reported(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIGS[0].read_text().replace("num_generations: 8", "num_generations: 0"))
    with pytest.raises((ValueError, SystemExit)):
        make_cli(["--config", str(bad), "--trainer.logger", "false"], run=False)


def test_cli_fit_runs_on_the_tiny_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = make_cli(
        [
            "fit", "--config", str(CONFIGS[0]), "--trainer.logger", "false",
            "--model.init_args.policy.model", "tiny", "--data.init_args.num_generations", "2",
            "--data.init_args.prompts_per_step", "2", "--data.init_args.max_new_tokens", "4",
            "--data.init_args.task.init_args.num_test", "4", "--trainer.max_steps", "2",
            "--trainer.val_check_interval", "2", "--trainer.enable_checkpointing", "false",
            "--trainer.callbacks", "[]",
        ]
    )
    assert cli.trainer.global_step == 2
    assert "val/accuracy" in cli.trainer.callback_metrics
