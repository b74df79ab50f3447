"""Two CPU processes (DDP, gloo) train GRPO, then DAPO, on the tiny model; each writes what it saw.

    python reliability_ddp_script.py OUT_DIR

Lightning's "ddp" strategy re-runs this script for rank 1. Each process writes
``OUT_DIR/<algorithm>_rank<r>.pt``: per optimizer step its own minibatch (prompts, groups, rewards,
advantages), its own rollout metrics and what was logged; and its final trainable weights. A final
checkpoint goes to ``OUT_DIR/<algorithm>.ckpt``.

- GRPO: rank 1 alone gets a NaN loss at step 1: both processes must skip that update together.
- DAPO with dynamic sampling: the reward varies in every group on rank 0, but on rank 1 only in
  the first group of every other generation round, so rank 1 needs more rounds, keeps fewer groups
  and tops its rollout up to ``num_minibatches`` groups; both must still take the same steps.
- Multi-turn GRPO: episodes last 1 turn on rank 0 and 3 on rank 1 (``TurnsByRank``), so the two
  processes sample for different times and their rollouts have different widths.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch

from rftlab import DAPO, GRPO, RolloutDataModule
from rftlab.tasks import Arithmetic
from reliability_helpers import G, TurnsByRank, UnevenReward, alternating, rank, talkative, trainable_snapshot


class NaNOnRank1(GRPO):
    """GRPO whose loss is NaN on rank 1 alone at step 1."""

    def compute_loss(self, batch: Any) -> Any:
        loss, metrics = super().compute_loss(batch)
        if self.global_step == 1 and rank() == 1:
            loss = loss * float("nan")
        return loss, metrics


class Record(L.Callback):
    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.steps.append({
            "step": trainer.global_step,
            "prompts": list(batch.prompts), "group": batch.group.tolist(), "rewards": batch.rewards.tolist(),
            "seq_advantages": batch.seq_advantages.tolist(), "local": dict(batch.metrics),
            "logged": {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
        })


def run(algorithm: str, out: Path) -> None:
    if algorithm == "grpo":
        module = NaNOnRank1(policy="tiny", lr=1e-2, lora=True, log={"validate_at_start": False})
        dm = RolloutDataModule(task=Arithmetic(num_test=0), rewards={"alternating": alternating}, prompts_per_step=2,
                               num_generations=G, max_new_tokens=4)
    elif algorithm == "multiturn":
        module = talkative(GRPO)(policy="tiny", lr=1e-2, lora=True, log={"validate_at_start": False})
        dm = RolloutDataModule(task=Arithmetic(num_test=0), rewards={"alternating": alternating}, prompts_per_step=2,
                               num_generations=G, max_new_tokens=24, environment=TurnsByRank(), max_turns=3)
    else:
        module = DAPO(policy="tiny", lr=1e-2, lora=True, log={"validate_at_start": False})
        dm = RolloutDataModule(task=Arithmetic(num_test=0), rewards={"uneven": UnevenReward()}, prompts_per_step=2,
                               num_generations=G, max_new_tokens=4, max_gen_batches=2, num_minibatches=2)
    record = Record()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[record])
    trainer.fit(module, datamodule=dm)
    torch.manual_seed(1000 + trainer.global_rank)  # a known, different generator state per process
    trainer.save_checkpoint(out / f"{algorithm}.ckpt")  # every process contributes its own state
    torch.save({"steps": record.steps, "global_step": trainer.global_step, "world_size": trainer.world_size,
                "nonfinite_steps": module.faults.total, "weights": trainable_snapshot(module)},
               out / f"{algorithm}_rank{trainer.global_rank}.pt")


def main() -> None:
    torch.set_num_threads(1)  # two processes share the machine's cores
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for algorithm in ("grpo", "dapo", "multiturn"):
        run(algorithm, out)


if __name__ == "__main__":
    main()
