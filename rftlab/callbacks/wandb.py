"""W&B specifics: a logger that is offline unless the user is logged in, and metric definitions.

W&B trouble never stops a run: without credentials, with the server unreachable, or when
``wandb.init`` fails, the run logs offline (to be uploaded later with ``wandb sync``) after a
single warning, instead of prompting for a key, retrying for minutes, or crashing.
"""

from __future__ import annotations

import netrc
import os
import socket
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

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


DEFAULT_BASE_URL = "https://api.wandb.ai"
_warned: set[str] = set()  # one warning per process and reason


def wandb_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the W&B server (``WANDB_BASE_URL``) opens within ``timeout`` s.

    Behind an HTTP(S) proxy the server cannot be probed directly; that counts as reachable and a
    failing ``wandb.init`` still falls back to offline (see ``RFTWandbLogger``).

    Args:
        timeout: seconds to wait for the connection.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")):
        return True
    url = urlparse(os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_wandb_mode(probe_timeout: float = 3.0) -> str:
    """The mode a run will really use: ``wandb_mode()``, except that "online" becomes "offline"
    (with one warning) when there are no credentials or the server does not answer.

    Args:
        probe_timeout: seconds to wait for the server before logging offline.
    """
    mode = wandb_mode()
    if mode != "online":
        return mode
    return "online" if online_possible(probe_timeout) else "offline"


def online_possible(probe_timeout: float = 3.0) -> bool:
    """Whether online logging can work: credentials exist and the server answers (warns once if not).

    Args:
        probe_timeout: seconds to wait for the server.
    """
    if not wandb_logged_in():
        warn_offline("online W&B logging needs credentials (WANDB_API_KEY or ~/.netrc) and none were found")
        return False
    if not wandb_reachable(probe_timeout):
        warn_offline(f"the W&B server {os.environ.get('WANDB_BASE_URL') or DEFAULT_BASE_URL} is unreachable")
        return False
    return True


def warn_offline(reason: str) -> None:
    """Warn once per process and reason that runs log offline instead."""
    if reason in _warned:
        return
    _warned.add(reason)
    warnings.warn(f"{reason}: logging to W&B offline instead (upload later with `wandb sync <run folder>`)",
                  UserWarning, stacklevel=3)


class RFTWandbLogger(WandbLogger):
    """``WandbLogger`` that falls back to offline instead of failing (see the module docstring).

    Args:
        offline: True logs offline; False or None log online when possible (None: when
            ``wandb_mode()`` says so), else offline with one warning.
        **kwargs: ``WandbLogger`` options (project, save_dir, name, group, config, ...).
    """

    def __init__(self, offline: bool | None = None, **kwargs: Any) -> None:
        if offline is None:
            offline = resolve_wandb_mode() != "online"
        elif not offline:
            offline = not online_possible()
        super().__init__(offline=offline, **kwargs)

    @property
    def mode(self) -> str:
        """"online" or "offline": what this logger does (after any fallback)."""
        return "offline" if self._offline else "online"

    @property
    def experiment(self) -> Any:
        try:
            return super().experiment
        except Exception as err:  # wandb.Error (CommError, AuthenticationError, UsageError) or a timeout
            if self._offline:
                raise
            warn_offline(f"wandb.init failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")
            self._offline = True
            self._wandb_init["mode"] = "offline"
            self._experiment = None
            return super().experiment


def make_wandb_logger(project: str = "rftlab", save_dir: str = "runs", **kwargs: Any) -> WandbLogger:
    """A WandbLogger that works without an account, and never crashes or hangs on W&B trouble.

    Offline unless you are logged in; online runs fall back to offline (one warning) when the
    server is unreachable or ``wandb.init`` fails.

    Args:
        project: W&B project.
        save_dir: folder of the local run files (``<save_dir>/wandb/...``).
        **kwargs: passed to ``WandbLogger`` (name, group, job_type, config, ...).
    """
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return RFTWandbLogger(project=project, save_dir=save_dir, **kwargs)


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
        metrics = getattr(batch, "metrics", {})
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
