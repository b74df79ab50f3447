"""A GRPO run on the tiny model for the kill -9 test: run as a subprocess, or imported.

    python reliability_train_script.py OUT_DIR --steps 6 --kill-during-save-at 4

With ``--kill-during-save-at k`` the process writes half of the step-k checkpoint into its
temporary file and then sends itself SIGKILL, as a power cut or the OOM killer would: no Python
cleanup runs. ``OUT_DIR/last.ckpt`` must still be the step-(k-1) checkpoint.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
from pathlib import Path
from typing import Any

import torch

from rftlab import GRPO, RolloutDataModule
from rftlab.callbacks.checkpointing import AtomicCheckpointIO, write_atomically
from rftlab.tasks import Arithmetic
from reliability_helpers import fit, parity


def make_module() -> GRPO:
    return GRPO(policy={"model": "tiny", "lora_dropout": 0.1}, lr=1e-2, lora=True, log={"validate_at_start": False})


def make_dm() -> RolloutDataModule:
    return RolloutDataModule(task=Arithmetic(num_test=0), rewards={"parity": parity}, prompts_per_step=2,
                             num_generations=2, max_new_tokens=5, num_minibatches=2)


class DieDuringSave(AtomicCheckpointIO):
    """Checkpoint IO that is SIGKILLed half-way through writing the checkpoint of one step."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if checkpoint["global_step"] == self.step:
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            data = buffer.getvalue()

            def torn(f: Any) -> None:
                f.write(data[: len(data) // 2])
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)

            write_atomically(Path(path), torn)
        super().save_checkpoint(checkpoint, path, storage_options)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--kill-during-save-at", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="the parent's torch threads: same arithmetic")
    args = parser.parse_args()
    torch.set_num_threads(args.threads or min(2, torch.get_num_threads()))
    plugins = [DieDuringSave(args.kill_during_save_at)] if args.kill_during_save_at else []
    fit(make_module, make_dm, args.steps, Path(args.out), plugins=plugins)


if __name__ == "__main__":
    main()
