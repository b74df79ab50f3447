"""A table of sample prompts, completions and rewards, every N steps.

W&B gets a ``samples`` table, TensorBoard a ``samples`` text panel (a Markdown table), and every
other logger (CSV, ...) a ``samples.jsonl`` file in its log folder; without a logger, nothing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from rftlab.callbacks.dashboards import logging_step


class CompletionTable(L.Callback):
    """Every ``every_n_steps`` steps, log up to ``max_rows`` samples of the current rollout.

    Columns: prompt, completion, total reward, each reward function (``reward/<fn>``), advantage and
    completion length. With a W&B logger they go to a ``samples`` table, with TensorBoard to a
    ``samples`` text panel; otherwise they are appended to ``<log_dir>/samples.jsonl``.

    Args:
        every_n_steps: logging interval in optimizer steps (>= 1).
        max_rows: samples per table (>= 1).
    """

    def __init__(self, every_n_steps: int = 10, max_rows: int = 8) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.every_n_steps = every_n_steps
        self.max_rows = max_rows

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = logging_step(trainer)  # the step this batch's scalars are logged at
        if not trainer.is_global_zero or step % self.every_n_steps != 0 or not hasattr(batch, "completions"):
            return
        rows = sample_rows(batch, self.max_rows)
        if not rows:
            return
        columns = list(rows[0])
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        for logger in wandb_loggers:
            logger.log_table(key="samples", columns=columns, data=[list(r.values()) for r in rows], step=step)
        tensorboard = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        for logger in tensorboard:
            logger.experiment.add_text("samples", markdown_rows(rows), global_step=step)
        # The first logger's folder, read here: Trainer.log_dir broadcasts from rank 0, a collective
        # the other processes never join from inside this rank-zero-only branch (a DDP hang).
        # Without a logger nothing is written (no file appears in the working folder).
        log_dir = getattr(trainer.loggers[0], "log_dir", None) if trainer.loggers else None
        if not wandb_loggers and not tensorboard and log_dir:
            path = Path(log_dir) / "samples.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                for row in rows:
                    f.write(json.dumps({"step": step, **row}) + "\n")


def sample_rows(batch: Any, max_rows: int) -> list[dict[str, Any]]:
    """Up to ``max_rows`` dicts (prompt, completion, reward, per-function rewards, advantage, length;
    for multi-turn episodes also the model's turns and the environment's token count)."""
    rows = []
    for i in range(min(max_rows, len(batch.completions))):
        row: dict[str, Any] = {
            "prompt": batch.prompts[i] if batch.prompts else "",
            "completion": batch.completions[i],
            "reward": float(batch.rewards[i]),
        }
        for j, name in enumerate(batch.reward_names):
            value = float(batch.rewards_per_fn[i, j])
            row[f"reward/{name}"] = None if math.isnan(value) else value
        adv = batch.seq_advantages
        row["advantage"] = float(adv[i]) if adv is not None else None
        row["length"] = int(batch.completion_mask[i].sum())
        env_mask = getattr(batch, "env_mask", None)
        if env_mask is not None:  # a multi-turn episode: the completion holds every turn and observation
            model = batch.completion_mask[i]
            row["turns"] = int(model[0]) + int(((model[1:] != 0) & (model[:-1] == 0)).sum())
            row["env_tokens"] = int(env_mask[i].sum())
        rows.append(row)
    return rows


def markdown_rows(rows: list[dict[str, Any]]) -> str:
    """Sample rows as a Markdown table (TensorBoard renders text panels as Markdown)."""
    columns = list(rows[0])

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3f}"
        text = "" if value is None else str(value)
        return text.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
