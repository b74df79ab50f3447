"""W&B specifics: a logger that is offline unless the user is logged in, and metric definitions."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger


def wandb_logged_in() -> bool:
    """Whether W&B credentials exist locally (env var or ~/.netrc); never touches the network."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        hosts = netrc.netrc(str(path)).hosts if path.exists() else {}
    except (netrc.NetrcParseError, OSError):
        return False
    return any("wandb" in host for host in hosts)


def wandb_mode() -> str:
    """``WANDB_MODE`` if set; else "online" when logged in, "offline" otherwise."""
    return os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")


def make_wandb_logger(project: str = "rftlab", save_dir: str = "runs", **kwargs: Any) -> WandbLogger:
    """A WandbLogger that works without an account: offline unless you are logged in.

    Args:
        project: W&B project.
        save_dir: folder of the local run files (``<save_dir>/wandb/...``).
        **kwargs: passed to ``WandbLogger`` (name, group, job_type, config, ...).
    """
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(project=project, save_dir=save_dir, offline=wandb_mode() != "online", **kwargs)


class WandbMetrics(L.Callback):
    """Defines every rftlab metric against the trainer step so W&B charts share one x-axis."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                experiment = logger.experiment
                if hasattr(experiment, "define_metric"):
                    experiment.define_metric("trainer/global_step")
                    experiment.define_metric("*", step_metric="trainer/global_step", step_sync=True)
