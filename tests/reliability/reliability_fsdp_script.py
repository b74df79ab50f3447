"""Two CPU processes (gloo) train with FSDP2 (``ModelParallelStrategy``) and with DDP; each writes
what it ended with.

    python reliability_fsdp_script.py OUT_DIR
    NODE_RANK=r MASTER_ADDR=127.0.0.1 MASTER_PORT=p python reliability_fsdp_script.py OUT_DIR --node

The second form is one of 2 "nodes" of 1 process each (``num_nodes=2``, as a cluster launches one
process per node): it trains grpo-lora under FSDP2 and writes ``nodes_fsdp_rank<r>.pt``.

Lightning re-runs this script for rank 1. For each case it writes
``OUT_DIR/<case>_<strategy>_rank<r>.pt``: the global step, whether the module was sharded, and the
final trainable weights (gathered whole from the shards).

- grpo-lora, ppo-lora, ppo-critic-model (a separate critic model), grpo-full (full fine-tuning with a KL term: a sharded reference copy, and
  activation checkpointing), segment-lora (SegmentRFT's value head), each with rftlab's own sampler,
  under FSDP2 and under DDP: same steps, same weights;
- dapo-uneven: dynamic sampling where rank 1 needs more generation rounds than rank 0, so under
  FSDP2 rank 0 runs placeholder rounds; it must not deadlock, and must end where DDP (which needs
  no placeholders) ends: placeholder rounds leave the prompt stream and random state alone.
- grpo-lora under ``rftlab.models.FSDP2Strategy`` with bf16 gathered weights and fp32 reductions.
- resume (FSDP2): grpo-lora for 2 steps, a sharded checkpoint, then resumed to 3 steps, written as
  ``resume_fsdp_rank<r>.pt``, to compare with the uninterrupted 3 steps of grpo-lora; the final
  sharded checkpoint of grpo-lora is kept as ``grpo-lora.ckpt`` (a folder) for one-process loading.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from rftlab import DAPO, GRPO, PPO, RolloutDataModule, SegmentRFT
from rftlab.models import FSDP2Strategy
from rftlab.tasks import Arithmetic, WordProblems
from reliability_helpers import G, UnevenReward, alternating

CASES = ("grpo-lora", "ppo-lora", "ppo-critic-model", "grpo-full", "segment-lora", "dapo-uneven")


def build(case: str) -> tuple[L.LightningModule, RolloutDataModule]:
    log = {"validate_at_start": False}
    data: dict[str, Any] = {"task": Arithmetic(num_test=0), "prompts_per_step": 2, "num_generations": G,
                            "max_new_tokens": 6}
    if case == "grpo-lora":
        module = GRPO(policy="tiny", lr=1e-2, lora=True, log=log)
    elif case == "ppo-lora":
        module = PPO(policy="tiny", lr=1e-2, lora=True, log=log)
    elif case == "ppo-critic-model":
        module = PPO(policy="tiny", lr=1e-2, lora=True, critic={"kind": "model"}, log=log)  # a separate, sharded critic
    elif case == "grpo-full":
        # with activation checkpointing inside the FSDP2 units
        module = GRPO(policy={"model": "tiny", "gradient_checkpointing": True}, lr=1e-3, lora=False, beta=0.04, log=log)
    elif case == "segment-lora":
        module = SegmentRFT(policy="tiny", lr=1e-2, lora=True, log=log)
        return module, RolloutDataModule(**{**data, "task": WordProblems(num_test=0)})
    else:
        module = DAPO(policy="tiny", lr=1e-2, lora=True, log=log)
        return module, RolloutDataModule(rewards={"uneven": UnevenReward()}, max_gen_batches=3, num_minibatches=2, **data)
    return module, RolloutDataModule(rewards={"alternating": alternating}, **data)


def full_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable weights, each gathered whole (a collective under FSDP2: every rank calls it)."""
    out = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            value = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name] = value.detach().clone()
    return out


def run(case: str, strategy_name: str, out: Path, steps: int = 3, resume: Path | None = None,
        save: Path | None = None, name: str | None = None, nodes: int = 1) -> None:
    torch.manual_seed(0)  # the LoRA adapters start from the global generator: the same start for both strategies
    module, dm = build(case)
    strategy = {"fsdp": lambda: ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                "fsdp-bf16": lambda: FSDP2Strategy(param_dtype="bfloat16", reduce_dtype="float32"),
                "ddp": lambda: "ddp"}[strategy_name]()
    trainer = L.Trainer(accelerator="cpu", devices=2 // nodes, num_nodes=nodes, strategy=strategy, max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    trainer.fit(module, datamodule=dm, ckpt_path=resume)
    if save is not None:
        trainer.save_checkpoint(save)  # every process writes its shard
    if name is not None:
        torch.save({"global_step": trainer.global_step, "sharded": module.sharded, "weights": full_weights(module)},
                   out / f"{name}_rank{trainer.global_rank}.pt")


def main() -> None:
    torch.set_num_threads(1)  # two processes share the machine's cores
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    if "--node" in sys.argv:
        run("grpo-lora", "fsdp", out, name="nodes_fsdp", nodes=2)
        return
    for case in CASES:
        for strategy_name in ("fsdp", "ddp"):
            save = out / "grpo-lora.ckpt" if (case, strategy_name) == ("grpo-lora", "fsdp") else None
            run(case, strategy_name, out, save=save, name=f"{case}_{strategy_name}")
    run("grpo-lora", "fsdp-bf16", out, name="grpo-lora_fsdp-bf16")  # rftlab's strategy, bf16 gathers
    run("grpo-lora", "fsdp", out, steps=2, save=out / "half.ckpt")
    run("grpo-lora", "fsdp", out, steps=3, resume=out / "half.ckpt", name="resume_fsdp")


if __name__ == "__main__":
    main()
