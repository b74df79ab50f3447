"""``make demo``: GRPO + LoRA on the bundled SmolLM2-135M-Instruct, 2-digit addition, on the CPU.

Prints held-out accuracy before and after, and where the W&B run and the checkpoint are.

    python -m rftlab.demo --steps 40
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import lightning as L
import torch
from rftlab import GRPO, RolloutDataModule
from rftlab.callbacks import CompletionTable, TrainClock, WandbMetrics, make_wandb_logger
from rftlab.callbacks.checkpointing import ResumableCheckpoint
from rftlab.tasks import Arithmetic


def cpu_supports_bf16() -> bool:
    """Whether bf16 autocast is fast here (oneDNN reports native AVX512-BF16/AMX support)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def demo_parser() -> argparse.ArgumentParser:
    """The demo's options (underscores, as every ``rftlab`` flag; the dashed spellings still work)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps (about 12 s each on 2 cores)")
    parser.add_argument("--eval_every", "--eval-every", type=int, default=20, help="steps between held-out evaluations")
    parser.add_argument("--out", default="runs/demo", help="folder of the run's logs and checkpoints")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--ckpt_path", "--ckpt-path", default=None,
                        help="resume from this checkpoint (e.g. runs/demo/checkpoints/last.ckpt)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = demo_parser().parse_args(argv)

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    L.seed_everything(0)
    out = Path(args.out)
    model = GRPO(policy="default", lora=True, beta=0.0, lr=2e-4)
    dm = RolloutDataModule(task=Arithmetic(digits=2, num_test=200), prompts_per_step=4, max_new_tokens=32,
                           val_batch_size=100)
    logger = make_wandb_logger(project="rftlab", save_dir=str(out), name="demo-grpo-arithmetic", job_type="demo")
    # last.ckpt every 10 steps and at the end, written atomically; resume with --ckpt_path.
    checkpoint = ResumableCheckpoint(dirpath=str(out / "checkpoints"), every_n_train_steps=10)
    precision = "bf16-mixed" if cpu_supports_bf16() else "32-true"
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=args.steps, precision=precision, logger=logger,
        callbacks=[TrainClock(), CompletionTable(every_n_steps=10), WandbMetrics(), checkpoint],
        val_check_interval=args.eval_every, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        default_root_dir=str(out),
    )
    trainer.fit(model, datamodule=dm, ckpt_path=args.ckpt_path)
    after = float(trainer.callback_metrics.get("val/accuracy", float("nan")))
    import wandb

    run_dir = wandb.run.dir if wandb.run is not None else str(out / "wandb")
    wandb.finish()
    print()
    print(f"held-out accuracy (greedy, 200 prompts): before {100 * (model.initial_val_accuracy or 0):.1f}%"
          f"  after {100 * after:.1f}%  ({trainer.global_step} steps, precision {precision})")
    print(f"W&B run ({logger.mode}): {Path(run_dir).parent}")
    if logger.mode == "offline":
        print(f"  upload it later with: wandb sync {Path(run_dir).parent}")
    print(f"checkpoint: {checkpoint.last_model_path or checkpoint.best_model_path}")


if __name__ == "__main__":
    main()
