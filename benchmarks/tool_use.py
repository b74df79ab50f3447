"""Tool use: SFT warm-up on generated episodes, then GRPO, with and without a calculator tool.

Task: ``BigArithmetic`` (products of two 3-4 digit numbers), which SmolLM2-135M alone almost never
gets right. Each arm runs a short supervised warm-up, then GRPO + LoRA for a fixed training-time
budget (``benchmarks/learning_curve.py``, held-out greedy accuracy every ``--eval-every`` steps):

- ``tools``: the warm-up imitates the rows' ``episode`` (call the calculator, read its result,
  answer); GRPO samples multi-turn episodes with ``tools=[calculator]``.
- ``none``: the warm-up imitates the bare answer sentence; GRPO samples single-turn answers.

    .venv/bin/python benchmarks/tool_use.py --arms tools,none --sft-steps 8 --minutes 30

Writes, under --out/<arm>: the SFT checkpoint, the learning curve's steps.csv, evals.csv,
summary.json and curve.png; and --out/summary.json with both arms (summary_<arm>.json for one).
The two arms can run side by side, one per core:

    taskset -c 0 .venv/bin/python benchmarks/tool_use.py --arms tools --threads 1 ... &
    taskset -c 1 .venv/bin/python benchmarks/tool_use.py --arms none --threads 1 ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parent))
import learning_curve  # noqa: E402

from rftlab import SFT, SFTDataModule  # noqa: E402
from rftlab.callbacks import ResumableCheckpoint  # noqa: E402
from rftlab.environments import calculator  # noqa: E402
from rftlab.tasks import BigArithmetic  # noqa: E402


def warm_up(arm: str, args: argparse.Namespace, out: Path) -> tuple[Path, float]:
    """SFT for ``--sft-steps`` steps; returns the checkpoint path and the seconds it took."""
    tools = arm == "tools"
    L.seed_everything(args.seed, workers=True)
    sft = SFT(policy=dict(model="default", lora_r=args.lora_r, lora_alpha=2 * args.lora_r, seed=args.seed),
              lora=True, lr=args.sft_lr)
    data = SFTDataModule(task=BigArithmetic(num_test=args.num_test, seed=args.seed), batch_size=args.sft_batch,
                         episode_column="episode" if tools else None, tools=[calculator] if tools else None,
                         max_turns=args.max_turns, seed=args.seed)
    ckpt = out / "sft"
    start = time.perf_counter()
    L.Trainer(max_steps=args.sft_steps, accelerator="cpu", devices=1, precision="bf16-mixed", logger=False,
              limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False,
              callbacks=[ResumableCheckpoint(dirpath=str(ckpt))]).fit(sft, datamodule=data)
    return ckpt / "last.ckpt", time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default="tools,none", help="comma-separated: tools, none")
    parser.add_argument("--sft-steps", type=int, default=8)
    parser.add_argument("--sft-batch", type=int, default=8)
    parser.add_argument("--sft-lr", type=float, default=2e-4)
    parser.add_argument("--minutes", type=float, default=30.0, help="GRPO training-time budget (excl. evaluation)")
    parser.add_argument("--max-steps", type=int, default=10_000)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--num-test", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=96, help="episode budget (model + tool tokens)")
    parser.add_argument("--max-turns", type=int, default=3)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/out/tool_use")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    results = {}
    for arm in args.arms.split(","):
        out = Path(args.out) / arm
        ckpt, sft_seconds = warm_up(arm, args, out)
        curve = ["--task", "big_arithmetic", "--init-checkpoint", str(ckpt), "--minutes", str(args.minutes),
                 "--max-steps", str(args.max_steps), "--eval-every", str(args.eval_every),
                 "--num-test", str(args.num_test), "--max-new-tokens", str(args.max_new_tokens),
                 "--lr", str(args.lr), "--lora-r", str(args.lora_r), "--threads", str(args.threads),
                 "--seed", str(args.seed), "--out", str(out)]
        if arm == "tools":
            curve += ["--tools", "calculator", "--max-turns", str(args.max_turns)]
        learning_curve.main(curve)
        summary = json.loads((out / "summary.json").read_text())
        results[arm] = {"sft_steps": args.sft_steps, "sft_minutes": round(sft_seconds / 60, 2),
                        **{k: summary[k] for k in ("steps", "train_minutes", "accuracy_before", "accuracy_after", "evals")}}
    name = "summary.json" if args.arms == "tools,none" else f"summary_{args.arms.replace(',', '_')}.json"
    (Path(args.out) / name).write_text(json.dumps({"args": vars(args), "arms": results}, indent=2))
    for arm, r in results.items():
        print(f"{arm:6s} SFT start {100 * r['accuracy_before']:.1f}%  ->  {100 * r['accuracy_after']:.1f}% after "
              f"{r['steps']} GRPO steps ({r['train_minutes']} training minutes)")


if __name__ == "__main__":
    main()
