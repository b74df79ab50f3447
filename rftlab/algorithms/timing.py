"""Where an optimizer step's time goes: ``timing/forward``, ``timing/backward``, ``timing/train``."""

from __future__ import annotations

import time
from typing import Any

import lightning as L


class StepTimer(L.Callback):
    """Logs the forward, backward and whole-step wall time of every optimizer step (seconds).

    Every rftlab algorithm adds it through ``configure_callbacks``; the rollout's own phases
    (``timing/generate``, ``timing/score``, ...) are measured by the DataModule and the module.
    """

    def __init__(self) -> None:
        self._start = 0.0
        self._backward = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Any) -> None:
        self._backward = time.perf_counter()
        pl_module.log("timing/forward", self._backward - self._start, on_step=True, batch_size=1)

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.log("timing/backward", time.perf_counter() - self._backward, on_step=True, batch_size=1)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        pl_module.log("timing/train", time.perf_counter() - self._start, on_step=True, batch_size=len(batch))
