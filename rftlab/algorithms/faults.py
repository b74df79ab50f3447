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


def resume_state(guard: "NonFiniteGuard") -> dict[str, Any]:
    """The module's entry of a checkpoint: every process's random generators and the fault counters.

    Called on every process while a checkpoint is dumped (each process has its own generators).

    Args:
        guard: the module's non-finite step counters.
    """
    return {
        "rng": gather_objects(capture_rng_state()),
        "nonfinite_steps": int(guard.total),
        "consecutive_nonfinite": int(guard.in_a_row),
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


class NonFiniteGuard:
    """Skips optimizer steps with a non-finite loss or gradient, counts them, stops after too many in a row.

    Args:
        max_in_a_row: stop (``NonFiniteTrainingError``, after saving a checkpoint) at this many
            consecutive skipped steps; None never stops.
    """

    def __init__(self, max_in_a_row: int | None) -> None:
        self.max_in_a_row = max_in_a_row
        self.total = 0
        self.in_a_row = 0
        self.drop_update = False  # a skipped non-finite loss under DDP: on_before_optimizer_step drops it

    def screen_loss(self, module: L.LightningModule, loss: Any) -> Any:
        """The loss to return from ``training_step``: ``loss``, or None / a zero loss (DDP) to skip the step.

        Every process must skip together, or DDP's gradient all-reduce waits for the one that did not.
        """
        import torch

        from rftlab.rollout.distributed import any_rank, is_distributed

        if not any_rank(not torch.isfinite(loss)):
            return loss
        self.record(module, "loss")
        if not is_distributed():
            return None  # Lightning skips the update
        # Lightning refuses None under DDP: a zero loss over every trainable weight keeps the
        # gradient all-reduce in step, and ``screen_gradients`` drops the update.
        self.drop_update = True
        return sum((p * 0.0).sum() for p in module.parameters() if p.requires_grad)

    def screen_gradients(self, module: L.LightningModule) -> None:
        """Log ``grad_norm``; drop the update when it is non-finite (or a skipped loss's zero gradients)."""
        import torch

        params = [p for p in module.parameters() if p.grad is not None]
        if self.drop_update:
            self.drop_update = False
            for p in params:
                p.grad = None
            return
        grads = [p.grad.detach().float().norm() for p in params]
        norm = torch.linalg.vector_norm(torch.stack(grads)) if grads else torch.tensor(0.0)
        module.log("grad_norm", norm, on_step=True, batch_size=1)
        # Gradients are all-reduced before this hook, so every process reaches the same verdict.
        if not torch.isfinite(norm):
            for p in params:
                p.grad = None  # AdamW skips parameters without gradients: the step becomes a no-op
            if not grad_scaler_active(module._trainer):  # float16's GradScaler skips overflows by design
                self.record(module, "gradient")
        elif grads:  # a real update (a skipped non-finite loss reaches this hook without gradients)
            self.in_a_row = 0

    def record(self, module: L.LightningModule, what: str) -> None:
        """Count and warn about a skipped step; raise after ``max_in_a_row`` in a row.

        Args:
            module: the training module.
            what: "loss" or "gradient".
        """
        self.total += 1
        self.in_a_row += 1
        module.log("faults/nonfinite_steps", float(self.total), on_step=True, batch_size=1)
        warnings.warn(f"non-finite {what} at step {module.global_step}: update skipped ({self.in_a_row} in a row)",
                      stacklevel=3)
        if self.max_in_a_row is not None and self.in_a_row >= self.max_in_a_row:
            raise abort_nonfinite(module, what, self.in_a_row)


def restore_resume_state(module: Any, state: dict[str, Any] | None) -> dict[str, Any] | None:
    """Restore the fault counters from a checkpoint's entry; return this process's generator state to
    restore when training starts (None when absent or the process count changed).

    Args:
        module: the RFTModule (its ``faults`` guard is updated).
        state: the checkpoint's ``"rftlab"`` entry (None for checkpoints saved before it existed).
    """
    if not state:
        return None
    module.faults.total = int(state.get("nonfinite_steps", 0))
    module.faults.in_a_row = int(state.get("consecutive_nonfinite", 0))
    trainer = module._trainer
    rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
    return pending_rng(state, rank, world)


def check_trainable_weights(module: Any, state_dict: dict[str, Any]) -> None:
    """Raise a KeyError naming trainable weights of ``module`` that ``state_dict`` lacks.

    Args:
        module: the module the checkpoint is loaded into.
        state_dict: the checkpoint's ``state_dict``.
    """
    missing = sorted(n for n, p in module.named_parameters() if p.requires_grad and n not in state_dict)
    if missing:
        raise KeyError(f"checkpoint lacks trainable weights {missing[:5]}{'...' if len(missing) > 5 else ''}")
