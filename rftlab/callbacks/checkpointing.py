"""Checkpoints that survive kill -9 and full disks, and a ModelCheckpoint with RL-run defaults.

A checkpoint is written to a temporary file next to its target, flushed to disk (``fsync``) and
then renamed over the target (``os.replace``, atomic on POSIX and Windows). A process killed at any
moment leaves either the previous checkpoint or the new one, never a torn file; a failed write (a
full disk) raises ``CheckpointWriteError`` naming the file and the cause, and the previous checkpoint
is untouched.

Lightning's own ``TorchCheckpointIO`` serialises into memory and writes through an fsspec
transaction whose temporary file lives in the system temp directory (``fsspec`` ``LocalFileOpener``):
the final move is then a copy across file systems, not a rename, and nothing is fsynced.

    trainer = L.Trainer(callbacks=[ResumableCheckpoint(dirpath="ckpt", every_n_train_steps=10)])
    trainer.fit(module, datamodule=dm)                      # dies at hour 20 ...
    trainer.fit(module, datamodule=dm, ckpt_path="ckpt/last.ckpt")   # ... and resumes exactly
"""

from __future__ import annotations

import os
import re
from contextlib import suppress
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, permissions, ...); the previous one is kept."""


class CheckpointReadError(RuntimeError):
    """A checkpoint file exists but cannot be read (truncated or corrupt)."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic and durable, with clear errors.

    Remote paths (``s3://``, ``gs://``, ...) go through Lightning's fsspec writer unchanged.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` through a temporary file and an atomic rename.

        Args:
            checkpoint: the state Lightning dumped.
            path: the target file.
            storage_options: unsupported (as in ``TorchCheckpointIO``).
        """
        if _is_remote(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not support storage_options")
        target = Path(path)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise _write_error(target, err) from err
        write_atomically(target, lambda f: torch.save(checkpoint, f))
        _remove_stale_temporaries(target)

    def load_checkpoint(self, path: Any, map_location: Callable | None = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Load a checkpoint; a truncated or corrupt file raises ``CheckpointReadError`` naming it.

        Args:
            path: the checkpoint file.
            map_location: as ``torch.load``.
            weights_only: as ``torch.load``.
        """
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except (RuntimeError, EOFError) as err:
            if "zip archive" in str(err) or isinstance(err, EOFError) or "central directory" in str(err):
                raise CheckpointReadError(
                    f"checkpoint {str(path)!r} is unreadable (truncated or corrupt: {err}); resume from another "
                    "checkpoint (rftlab writes them atomically, so this file was not written by rftlab's checkpoint IO)"
                ) from err
            raise


def write_atomically(target: Path, write: Callable[[Any], None]) -> None:
    """Call ``write(file)`` on a temporary file beside ``target``, fsync it, and rename it over ``target``.

    Args:
        target: the final path; it is replaced only after the whole file is on disk.
        write: writes the content to the binary file object it is given.

    Raises:
        CheckpointWriteError: the write, the flush or the rename failed; ``target`` is unchanged and
            the temporary file is removed.
    """
    tmp = target.parent / f".{target.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except Exception as err:  # torch.save reports a failed write as RuntimeError, not OSError
        with suppress(OSError):
            tmp.unlink()
        raise _write_error(target, err) from err
    _fsync_directory(target.parent)  # make the rename itself durable


def install_atomic_checkpoint_io(trainer: L.Trainer) -> bool:
    """Make the trainer's checkpoint writes atomic when it uses Lightning's default checkpoint IO.

    Strategies with their own IO (DeepSpeed, sharded FSDP) are left alone. Returns whether the
    trainer now writes through ``AtomicCheckpointIO``.

    Args:
        trainer: the trainer (its strategy must exist, i.e. during or after ``setup``).
    """
    strategy = trainer.strategy
    current = strategy.checkpoint_io
    if isinstance(current, AtomicCheckpointIO):
        return True
    if type(current) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
        return True
    return False


class AtomicCheckpoints(L.Callback):
    """Installs ``AtomicCheckpointIO`` at setup, for any checkpoint the trainer writes (any ModelCheckpoint,
    ``trainer.save_checkpoint``, the non-finite abort). The CLI adds it to every run."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        install_atomic_checkpoint_io(trainer)


class ResumableCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` for long RL runs: ``last.ckpt`` every few steps, at the end, atomically.

    A resumed run (``trainer.fit(..., ckpt_path=".../last.ckpt")``) continues exactly: rftlab
    checkpoints also hold the DataModule's stream position and pending minibatches, the random
    generators and every algorithm's own state (adaptive KL, pi_rollout snapshot, fault counters).

    Args:
        dirpath: folder of the checkpoints (default: ``<default_root_dir or logger dir>/checkpoints``).
        filename: name pattern of the step checkpoints kept by ``save_top_k`` (ModelCheckpoint's).
        every_n_train_steps: save ``last.ckpt`` every this many optimizer steps (>= 1).
        save_top_k: step checkpoints kept besides ``last.ckpt``: 0 (only last), -1 (all), 1 (newest).
        **kwargs: other ``ModelCheckpoint`` options (monitor, save_weights_only, ...).
    """

    def __init__(self, dirpath: str | None = None, filename: str | None = None, every_n_train_steps: int = 10,
                 save_top_k: int = 0, **kwargs: Any) -> None:
        if isinstance(every_n_train_steps, bool) or not isinstance(every_n_train_steps, int) or every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps={every_n_train_steps!r} is invalid: must be an integer >= 1")
        # None too: LightningCLI passes every ModelCheckpoint argument, so YAML gives save_last=None
        # explicitly, and a setdefault would leave this callback saving nothing.
        if kwargs.get("save_last") is None:
            kwargs["save_last"] = True
        super().__init__(dirpath=dirpath, filename=filename, every_n_train_steps=every_n_train_steps,
                         save_top_k=save_top_k, **kwargs)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        install_atomic_checkpoint_io(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # ModelCheckpoint saves `last` at the end only if it never saved; a run that stops between
        # two saves would otherwise lose its last steps.
        if self.save_last and self._last_global_step_saved != trainer.global_step and not trainer.sanity_checking:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            return
        super().on_train_end(trainer, pl_module)


def _write_error(target: Path, err: BaseException) -> CheckpointWriteError:
    kept = "the previous checkpoint there is unchanged" if target.exists() else "no file was written"
    code = getattr(err, "errno", None)
    message = (f"could not write checkpoint {str(target)!r}: {type(err).__name__}: {err}; {kept}. "
               "Free disk space or choose another dirpath, then resume from the last good checkpoint.")
    return CheckpointWriteError(code, message) if code is not None else CheckpointWriteError(message)


def _is_remote(path: Any) -> bool:
    text = str(path)
    return "://" in text and not text.startswith("file://")


def _remove_stale_temporaries(target: Path) -> None:
    """Delete temporaries of ``target`` left by processes that were killed while writing it."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(\d+)\.tmp$")
    with suppress(OSError):
        for entry in target.parent.iterdir():
            match = pattern.match(entry.name)
            if match and not _alive(int(match.group(1))):
                with suppress(OSError):
                    entry.unlink()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but not ours (EPERM)
        return True
    return True


def _fsync_directory(folder: Path) -> None:
    if os.name != "posix":
        return
    with suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
