"""W&B specifics: a logger that is offline unless the user is logged in, and metric definitions."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from rftlab.callbacks.dashboards import logging_step


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
    """W&B dashboard set-up: every metric against the trainer step, and a reward-per-function chart.

    - ``define_metric``: all keys use ``trainer/global_step`` as their x axis (so charts of metrics
      logged at different moments, such as validation, line up); ``val/accuracy`` and
      ``reward/mean`` also keep their best value in the run summary.
    - At the end of training, ``charts/reward_per_function`` draws each reward function's mean
      (``reward/<fn>/mean``) on one chart; the separate ``reward/<fn>/mean`` panels exist anyway.
    Other loggers receive the same metric keys through ``self.log``; this callback only adds the
    W&B-specific layout and does nothing without a ``WandbLogger``.
    """

    def __init__(self) -> None:
        self.reward_curves: dict[str, list[tuple[int, float]]] = {}

    def _experiments(self, trainer: L.Trainer) -> list[Any]:
        if not trainer.is_global_zero:
            return []
        return [lg.experiment for lg in trainer.loggers if isinstance(lg, WandbLogger)]

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for experiment in self._experiments(trainer):
            if hasattr(experiment, "define_metric"):
                experiment.define_metric("trainer/global_step")
                experiment.define_metric("*", step_metric="trainer/global_step", step_sync=True)
                experiment.define_metric("val/accuracy", step_metric="trainer/global_step", summary="max,last")
                experiment.define_metric("reward/mean", step_metric="trainer/global_step", summary="max,last")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._experiments(trainer):
            return
        metrics = (getattr(batch, "extras", None) or {}).get("metrics", {})
        for key, value in metrics.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "reward" and parts[2] == "mean":
                self.reward_curves.setdefault(parts[1], []).append((logging_step(trainer), float(value)))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        experiments = self._experiments(trainer)
        if not experiments or not self.reward_curves:
            return
        import wandb

        names = sorted(self.reward_curves)
        steps = sorted({s for curve in self.reward_curves.values() for s, _ in curve})
        ys = []
        for name in names:
            by_step = dict(self.reward_curves[name])
            # line_series needs one y per x: carry the last value over steps a function skipped.
            last, series = float("nan"), []
            for step in steps:
                last = by_step.get(step, last)
                series.append(last)
            ys.append(series)
        chart = wandb.plot.line_series(xs=steps, ys=ys, keys=names, title="reward per function", xname="step")
        for experiment in experiments:
            experiment.log({"charts/reward_per_function": chart, "trainer/global_step": trainer.global_step})
