"""A run that is meant to checkpoint does, from YAML as from Python; one that will not says so at setup."""

from __future__ import annotations

import warnings

import pytest
from helpers import fit_tiny
from lightning.pytorch.callbacks import ModelCheckpoint

from rftlab import GRPO, RolloutDataModule
from rftlab.callbacks import ResumableCheckpoint
from rftlab.tasks import Arithmetic

def guide_callbacks_yaml() -> str:
    """The ResumableCheckpoint YAML of the checkpoints guide, as the page shows it (a format string
    with its folder as ``{dirpath}``)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from docs_examples import ROOT, blocks

    page = ROOT / "docs" / "guides" / "checkpoints-and-export.md"
    [code] = [b.code for b in blocks(page) if b.language == "yaml" and "ResumableCheckpoint" in b.code]
    folder = "runs/grpo_arithmetic/checkpoints"
    assert folder in code, code
    return code.replace("{", "{{").replace("}", "}}").replace(folder, "{dirpath}")


GUIDE_CALLBACKS = guide_callbacks_yaml()


def test_the_guides_checkpoint_yaml_writes_last_ckpt(tmp_path, vary_reward):
    from rftlab.cli import main

    config = tmp_path / "run.yaml"
    config.write_text(GUIDE_CALLBACKS.format(dirpath=tmp_path / "checkpoints") + f"""  max_steps: 2
  default_root_dir: {tmp_path}
  logger: false
  enable_progress_bar: false
model:
  class_path: rftlab.GRPO
  init_args: {{policy: tiny, lr: 1.0e-2, log: {{validate_at_start: false}}}}
data:
  class_path: rftlab.RolloutDataModule
  init_args:
    task: {{class_path: rftlab.tasks.Arithmetic, init_args: {{num_test: 0}}}}
    prompts_per_step: 2
    num_generations: 2
    max_new_tokens: 4
""")
    main(["fit", "--config", str(config)])
    # YAML passes save_last=None explicitly; it used to leave the callback saving nothing at all.
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("save_last, saves", [(None, True), (True, True), (False, False)])
def test_resumable_checkpoint_save_last(save_last, saves):
    assert ResumableCheckpoint(save_last=save_last).save_last is saves


def _fit_warnings(tmp_path, vary_reward, **trainer_kwargs) -> list[str]:
    module = GRPO(policy="tiny", lr=1e-2, log={"validate_at_start": False})
    dm = RolloutDataModule(task=Arithmetic(num_test=0), rewards=vary_reward, prompts_per_step=2, num_generations=2,
                           max_new_tokens=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_tiny(module, dm, 1, tmp_path, **trainer_kwargs)
    return [str(w.message) for w in caught if "will write no checkpoint" in str(w.message)]


def test_a_run_without_checkpoints_says_so_at_setup(tmp_path, vary_reward):
    # Lightning's default ModelCheckpoint saves at epoch ends; an epoch (a pass over the prompts)
    # is far longer than this run.
    (message,) = _fit_warnings(tmp_path, vary_reward, enable_checkpointing=True)
    assert "saves at epoch ends" in message and "ResumableCheckpoint" in message
    (message,) = _fit_warnings(tmp_path / "off", vary_reward)  # enable_checkpointing=False
    assert "no checkpoint callback is configured" in message


def test_a_run_that_checkpoints_by_steps_does_not_warn(tmp_path, vary_reward):
    callbacks = [ResumableCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1)]
    assert _fit_warnings(tmp_path, vary_reward, callbacks=callbacks) == []
    assert isinstance(callbacks[0], ModelCheckpoint) and (tmp_path / "ckpt" / "last.ckpt").is_file()
