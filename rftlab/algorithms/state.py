"""What an algorithm's hyper-parameters and checkpoints hold: resolved option groups, resume state.

``ModuleState`` is a part (mixin) of ``RFTModule``: option groups resolved against the algorithm's
own defaults and kept in ``hparams``; checkpoints that hold them as plain mappings (readable with
``torch.load(weights_only=True)``), only the trainable weights of adapter runs, the random
generators and fault counters of every process; and checkpoints of the earlier flat option layout
read through ``rftlab.models.migration``.
"""

from __future__ import annotations

import inspect
from typing import Any

from rftlab.algorithms.faults import CHECKPOINT_KEY, check_trainable_weights, restore_resume_state, resume_state
from rftlab.core.options import as_group, plain_options, signature_default
from rftlab.models.migration import load_migrated
from rftlab.models.policy import trainable_state_keys
from rftlab.rollout.resume import restore_rng_state


class ModuleState:
    """Option groups in ``hparams`` and the module's part of a checkpoint (a mixin of ``RFTModule``)."""

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        """Lightning's ``load_from_checkpoint``, reading checkpoints of earlier option layouts too."""
        return super().load_from_checkpoint(load_migrated(checkpoint_path), *args, **kwargs)

    def option_group(self, name: str, value: Any, cls: type) -> Any:
        """The group ``cls`` from an argument; a mapping changes only the fields it names of this
        algorithm's default group (its signature's default, e.g. PPO's ``KLOptions(in_reward=True)``).

        The resolved group replaces the argument in ``hparams`` (and so in checkpoints and loggers).
        """
        self._groups[name] = group = as_group(value, cls, name, signature_default(type(self), name))
        return group

    def save_hyperparameters(self, *args: Any, frame: Any = None, **kwargs: Any) -> None:
        """Lightning's, then the resolved option groups in place of the arguments as given."""
        super().save_hyperparameters(*args, frame=frame or inspect.currentframe().f_back, **kwargs)
        self.hparams.update(self._groups)

    def warn_if_nothing_is_saved(self) -> None:
        """Warn at the start of ``fit`` when no checkpoint will be written before training ends.

        Lightning's default ``ModelCheckpoint`` saves at the end of an epoch, and an RL epoch is a
        pass over the prompts: a run shorter than that ends without a checkpoint, and nothing says so.
        """
        trainer = self.trainer
        savers = trainer.checkpoint_callbacks
        if any(getattr(c, "_every_n_train_steps", 0) or getattr(c, "_train_time_interval", None) for c in savers):
            return
        epoch = getattr(trainer.datamodule, "steps_per_epoch", None) if trainer.datamodule is not None else None
        if savers and (epoch is None or trainer.max_steps < 0 or epoch <= trainer.max_steps):
            return  # an epoch ends within max_steps (or its length is unknown): no warning
        why = ("no checkpoint callback is configured" if not savers else
               f"the checkpoint callback saves at epoch ends and an epoch is {epoch} steps, more than "
               f"max_steps={trainer.max_steps}")
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(f"this run will write no checkpoint: {why}. Add "
                       "rftlab.callbacks.ResumableCheckpoint(dirpath=..., every_n_train_steps=10) to the Trainer's "
                       "callbacks (rftlab fit adds one unless the config lists its own)")

    def on_train_start(self) -> None:
        # A resumed run restores the random generators here, after the sanity check and any
        # evaluation, right where the uninterrupted run was when the checkpoint was saved.
        if self._pending_rng is not None:
            restore_rng_state(self._pending_rng)
            self._pending_rng = None

    # ---- checkpoints -----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = resume_state(self.faults)  # random generators, fault counters
        # Option groups as plain mappings: the checkpoint loads with torch.load(weights_only=True)
        # and without rftlab's classes; the constructors take the mappings back.
        checkpoint["hyper_parameters"] = plain_options(checkpoint.get("hyper_parameters", {}))
        # Only what trains (adapter, heads): frozen weights come from `policy`. Not when sharded:
        # a distributed checkpoint is loaded by asking for every key of the module's state.
        if not self.strict_loading and not getattr(self, "sharded", False):
            keep = trainable_state_keys(self)
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._pending_rng = restore_resume_state(self, checkpoint.get(CHECKPOINT_KEY))
        # A sharded checkpoint's weights were loaded by the strategy, which hands no state_dict here.
        if self.policy is not None and "state_dict" in checkpoint:
            check_trainable_weights(self, checkpoint["state_dict"])
