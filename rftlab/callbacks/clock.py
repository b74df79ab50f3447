"""Training wall-clock time, excluding validation: the x-axis of "accuracy after N minutes"."""

from __future__ import annotations

import time
from typing import Any

import lightning as L


class TrainClock(L.Callback):
    """Logs ``time/train_seconds``: wall time of the fit so far minus the time spent validating.

    It includes sampling rollouts (the DataModule's work happens while fetching a batch), so it is
    the honest cost of training, which is what learning curves against wall time need.
    """

    def __init__(self) -> None:
        self.train_seconds = 0.0
        self._last: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.train_seconds += now - self._last
        self._last = now
        pl_module.log("time/train_seconds", self.train_seconds, on_step=True, batch_size=1)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last is not None:  # close the training interval before validating
            self.train_seconds += time.perf_counter() - self._last
            self._last = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._last = time.perf_counter()

    def state_dict(self) -> dict[str, float]:
        return {"train_seconds": self.train_seconds}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.train_seconds = float(state_dict["train_seconds"])
