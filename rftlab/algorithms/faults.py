"""Faults during training: non-finite steps (skip, count, abort), and the module state a resume needs.

A non-finite loss or gradient never reaches the weights: the step is skipped, counted in
``faults/nonfinite_steps`` and warned about. ``max_nonfinite_steps`` such steps in a row mean the run
is broken rather than unlucky (a diverged policy, a reward producing garbage): training stops with
``NonFiniteTrainingError``, after saving a checkpoint of the last good state to resume from once
the cause is fixed (a lower learning rate, a fixed reward).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L

from rftlab.rollout.distributed import gather_objects
from rftlab.rollout.resume import capture_rng_state

CHECKPOINT_KEY = "rftlab"  # our entry in the Lightning checkpoint dict


class NonFiniteTrainingError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


def fault_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where the abort checkpoint goes: the ModelCheckpoint's folder, else ``<root>/checkpoints``.

    Args:
        trainer: the running trainer.
    """
    callback = trainer.checkpoint_callback
    folder = getattr(callback, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints"
    return Path(folder) / f"nonfinite-abort-step={trainer.global_step}.ckpt"


def abort_nonfinite(module: L.LightningModule, what: str, in_a_row: int) -> NonFiniteTrainingError:
    """Save a checkpoint (when attached to a Trainer) and build the error that stops training.

    The weights in the checkpoint are the last finite ones: skipped steps never updated them, and
    the optimizer state is untouched by steps without gradients.

    Args:
        module: the RFTModule.
        what: "loss" or "gradient", the last non-finite quantity.
        in_a_row: the number of consecutive non-finite steps.
    """
    trainer = module._trainer
    where = "no checkpoint saved (no Trainer attached)"
    if trainer is not None:
        path = fault_checkpoint_path(trainer)
        try:
            trainer.save_checkpoint(path)
            where = f"checkpoint of the last finite state saved to {str(path)!r} (resume with ckpt_path=...)"
        except Exception as err:  # the error below matters more than the failed save
            where = f"saving a checkpoint to {str(path)!r} failed too ({type(err).__name__}: {err})"
    return NonFiniteTrainingError(
        f"{in_a_row} optimizer steps in a row had a non-finite {what} (last at step {module.global_step}); "
        f"training stopped. Every one was skipped, so the weights are finite; {where}. Lower the learning "
        "rate or check the rewards and inputs, or raise max_nonfinite_steps (None never stops)."
    )


def grad_scaler_active(trainer: L.Trainer | None) -> bool:
    """Whether a float16 GradScaler handles overflowing gradients (it skips those steps itself)."""
    plugin = getattr(trainer, "precision_plugin", None) if trainer is not None else None
    return getattr(plugin, "scaler", None) is not None


def resume_state(module: Any) -> dict[str, Any]:
    """The module's entry of a checkpoint: every process's random generators and the fault counters.

    Called on every process while a checkpoint is dumped (each process has its own generators).

    Args:
        module: the RFTModule.
    """
    return {
        "rng": gather_objects(capture_rng_state()),
        "nonfinite_steps": int(module.nonfinite_steps),
        "consecutive_nonfinite": int(module.consecutive_nonfinite),
    }


def pending_rng(state: dict[str, Any], rank: int, world_size: int) -> dict[str, Any] | None:
    """This process's saved generator state, or None (with a warning) when the process count changed.

    Args:
        state: the module's checkpoint entry.
        rank: this process's global rank.
        world_size: the number of processes now.
    """
    states = state.get("rng") or []
    if len(states) == world_size:
        return states[rank]
    warnings.warn(
        f"the checkpoint was saved by {len(states)} process(es) and is resumed on {world_size}: random "
        "generators are not restored, so dropout differs from the uninterrupted run", stacklevel=2,
    )
    return None
