"""Checkpoints survive kill -9 and full disks; the CLI, demo and compare write them atomically."""

from __future__ import annotations

import errno
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rftlab.callbacks.checkpointing import (
    AtomicCheckpointIO,
    CheckpointReadError,
    CheckpointWriteError,
    ResumableCheckpoint,
    write_atomically,
)
from helpers import fit_tiny
from reliability_helpers import assert_same_weights, fit, subprocess_env
from reliability_train_script import make_dm, make_module

SCRIPT = Path(__file__).with_name("reliability_train_script.py")


def test_kill_9_during_a_checkpoint_write_then_resume_and_finish(tmp_path):
    out = tmp_path / "run"
    child = subprocess.run([sys.executable, str(SCRIPT), str(out), "--steps", "6", "--kill-during-save-at", "4",
                            "--threads", str(torch.get_num_threads())],  # float sums in the same order as here
                           env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]

    # The torn temporary file is there, and it never replaced the good checkpoint of step 3.
    torn = list(out.glob(".last.ckpt.*.tmp"))
    assert len(torn) == 1 and torn[0].stat().st_size < (out / "last.ckpt").stat().st_size * 0.75
    with pytest.raises(Exception):
        torch.load(torn[0], weights_only=True)
    assert torch.load(out / "last.ckpt", weights_only=True)["global_step"] == 3

    # Resume (a new process state: new module, DataModule, Trainer) and finish.
    resumed, second = fit(make_module, make_dm, 6, out, ckpt_path=str(out / "last.ckpt"))
    assert sorted(second.rewards) == [4, 5, 6]
    assert not list(out.glob(".last.ckpt.*.tmp")), "the next save cleans up the dead process's temporary file"
    assert torch.load(out / "last.ckpt", weights_only=True)["global_step"] == 6

    # ... to exactly where a run that was never killed ends.
    straight, record = fit(make_module, make_dm, 6, tmp_path / "straight", every=6)
    assert all(second.rewards[s] == record.rewards[s] for s in (4, 5, 6))
    assert_same_weights(resumed, straight)


def _small_checkpoint(tag: int) -> dict:
    return {"tag": tag, "weights": torch.full((1000,), float(tag))}


def test_a_full_disk_gives_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    io_ = AtomicCheckpointIO()
    io_.save_checkpoint(_small_checkpoint(1), target)
    before = target.read_bytes()

    def os_error(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    def torch_error(obj, f):  # how torch.save itself reports a failed write
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0: file write failed")

    for failing_save, cause in ((os_error, "No space left on device"), (torch_error, "file write failed")):
        monkeypatch.setattr(torch, "save", failing_save)
        with pytest.raises(CheckpointWriteError) as info:
            io_.save_checkpoint(_small_checkpoint(2), target)
        message = str(info.value)
        assert str(target) in message and cause in message and "previous checkpoint there is unchanged" in message
        assert target.read_bytes() == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"], "no temporary file left behind"


def test_a_full_disk_during_training_stops_with_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = AtomicCheckpointIO.save_checkpoint

    def fill_up_at_step_2(self, checkpoint, path, storage_options=None):
        if checkpoint["global_step"] == 2:
            def no_space(f):
                raise OSError(errno.ENOSPC, "No space left on device")
            write_atomically(Path(path), no_space)
        real(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", fill_up_at_step_2)
    with pytest.raises(CheckpointWriteError, match="No space left on device"):
        fit(make_module, make_dm, 4, tmp_path)
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 1
    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", real)
    _, record = fit(make_module, make_dm, 4, tmp_path, ckpt_path=str(tmp_path / "last.ckpt"))
    assert sorted(record.rewards) == [2, 3, 4]


def test_an_interrupted_write_leaves_the_target_untouched(tmp_path):
    target = tmp_path / "c.ckpt"
    AtomicCheckpointIO().save_checkpoint(_small_checkpoint(1), target)

    def interrupted(f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, interrupted)
    assert torch.load(target, weights_only=True)["tag"] == 1


def test_a_truncated_checkpoint_is_named_in_the_error(tmp_path):
    target = tmp_path / "c.ckpt"
    AtomicCheckpointIO().save_checkpoint(_small_checkpoint(1), target)
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointReadError, match="c.ckpt.*unreadable"):
        AtomicCheckpointIO().load_checkpoint(target)


def test_resumable_checkpoint_saves_the_final_step_and_installs_atomic_io(tmp_path):
    callback = ResumableCheckpoint(dirpath=str(tmp_path), every_n_train_steps=2)
    module, dm = make_module(), make_dm()
    trainer = fit_tiny(module, dm, 3, callbacks=[callback])
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    # every 2 steps -> step 2; the end of training (step 3) is saved too, so nothing is lost
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 3
    with pytest.raises(ValueError, match="every_n_train_steps=0"):
        ResumableCheckpoint(every_n_train_steps=0)


def test_the_cli_checkpoints_every_10_steps_atomically_by_default(tmp_path, monkeypatch):
    from rftlab.cli import make_cli

    monkeypatch.chdir(tmp_path)
    config = Path(__file__).parents[2] / "configs" / "grpo_arithmetic.yaml"
    cli = make_cli([
        "fit", "--config", str(config), "--trainer.logger", "false", "--model.init_args.policy.model", "tiny",
        "--data.init_args.num_generations", "2", "--model.init_args.log.validate_at_start", "false",
        "--data.init_args.prompts_per_step", "2", "--data.init_args.max_new_tokens", "3",
        "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.precision", "32-true",
        "--trainer.default_root_dir", str(tmp_path),
    ])
    callback = cli.trainer.checkpoint_callback
    assert isinstance(callback, ResumableCheckpoint) and callback._every_n_train_steps == 10
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert Path(callback.last_model_path).exists()
