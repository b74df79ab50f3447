"""Learning curve of an rftlab algorithm on SmolLM2-135M-Instruct + Arithmetic, on 2 CPU threads.

Writes, under --out: steps.csv (per-step reward, lengths, timings), evals.csv (held-out greedy
accuracy vs step and training minutes), summary.json and curve.png.

    .venv/bin/python benchmarks/learning_curve.py --algo grpo --minutes 30

Training minutes exclude the time spent on held-out evaluation (TrainClock), include sampling.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from rftlab import DAPO, GRPO, PPO, RolloutDataModule, SegmentRFT
from rftlab.callbacks import TrainClock
from rftlab.experiments.tracking import RunRecorder
from rftlab.experiments.variants import Budget, merge_options
from rftlab.tasks import Arithmetic, BigArithmetic, WordProblems


def build(args: argparse.Namespace) -> tuple[L.LightningModule, RolloutDataModule]:
    common = dict(
        policy=dict(model=args.policy, lora_r=args.lora_r, lora_alpha=2 * args.lora_r, seed=args.seed,
                    init_checkpoint=args.init_checkpoint),
        lora=not args.full, lr=args.lr, beta=args.beta, forward=dict(sampling_dtype=args.sampling_dtype),
    )
    if args.algo == "grpo":
        # --module-options (GRPO keyword arguments as JSON) merge into these group by group, e.g. an
        # entropy floor: '{"loss": {"entropy_target": 0.3, "entropy_coef": 0.01, "entropy_step": 0.01}}'.
        options = dict(advantage=dict(name="grpo", options=dict(scale=args.scale)), loss=dict(agg=args.loss_agg), **common)
        model = GRPO(**merge_options(options, json.loads(args.module_options)))
    elif args.algo == "dapo":
        # DAPO's own defaults: token-mean loss, eps 0.2/0.28, dynamic sampling in the DataModule.
        model = DAPO(overlong=dict(buffer_len=args.overlong_buffer), **common)
    elif args.algo == "ppo":
        # A value head on the LoRA policy's trunk; gamma = lam = 1 because the only reward is the
        # outcome at the last token: the critic learns E[reward | prefix] and every token's
        # advantage is reward - V(prefix), whitened over the batch (no bootstrapping from a critic
        # that starts untrained). Open-Reasoner-Zero (arXiv 2503.24290) uses gamma = lam = 1 too.
        model = PPO(advantage=dict(name="gae", options=dict(gamma=1.0, lam=args.lam)),
                    critic=dict(kind=args.critic, vf_coef=args.vf_coef, warmup_steps=args.value_warmup_steps), **common)
    elif args.algo == "segment_rft":
        # Segment-level CoT RFT (the "RFT fine tuning" slides): the rule-based step critic reads the
        # reasoning lines, the value head sits on the LoRA policy's trunk; meant for --task word_problems.
        # --segment-options (SegmentRFT keyword arguments as JSON) merge into these group by group.
        options = dict(
            critic=dict(vf_coef=args.vf_coef, whiten_advantages=args.whiten_advantages),
            segments=dict(ratio_mode=args.ratio_mode, rewards=dict(rho=args.rho, whiten=args.reward_whiten)),
            **common,
        )
        model = SegmentRFT(**merge_options(options, json.loads(args.segment_options)))
    else:
        raise SystemExit(f"--algo {args.algo!r} is not available yet")
    dm = RolloutDataModule(
        task=make_task(args), prompts_per_step=args.prompts, num_generations=args.gens, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, val_batch_size=100, seed=args.seed, sampler_backend=args.sampler_backend,
        num_iterations=args.num_iterations, num_minibatches=args.num_minibatches,
        **multi_turn_options(args),
    )
    return model, dm


def make_task(args: argparse.Namespace) -> Any:
    if args.task == "word_problems":  # 2-3 step problems with intermediate values (SegmentRFT's critic)
        return WordProblems(num_test=args.num_test, seed=args.seed)
    if args.task == "big_arithmetic":  # 3-4 digit products: the calculator tool's task
        return BigArithmetic(num_test=args.num_test, seed=args.seed)
    return Arithmetic(digits=2, num_test=args.num_test, seed=args.seed)


def multi_turn_options(args: argparse.Namespace) -> dict[str, Any]:
    """The DataModule's multi-turn options from ``--tools`` (names in rftlab.environments) and
    ``--environment try_again`` (a wrong answer hears "try again", up to --max-turns attempts; the
    reward is the environment's: 1, 0.5, 0.25 ... for a right answer at attempt 1, 2, 3 ...)."""
    import rftlab.environments as environments

    options: dict[str, Any] = {}
    if args.tools:
        options["tools"] = [getattr(environments, name) for name in args.tools.split(",")]
    if args.environment == "try_again":
        options["environment"] = environments.TryAgain(make_task(args), max_attempts=args.max_turns)
        options["rewards"] = {"solved": environments.environment_reward}
    if options:
        options["max_turns"] = args.max_turns
    return options


def write_outputs(out: Path, rec: RunRecorder, args: argparse.Namespace, wall: float) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("steps.csv", rec.steps), ("evals.csv", rec.evals)):
        if rows:
            keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("step", "train_seconds"), k))
            with (out / name).open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=keys)
                writer.writeheader()
                writer.writerows(rows)
    summary = {
        "args": vars(args),
        "steps": rec.steps[-1]["step"] if rec.steps else 0,
        "train_minutes": round(rec.clock.train_seconds / 60, 2),
        "wall_minutes": round(wall / 60, 2),
        "accuracy_before": rec.evals[0]["val/accuracy"] if rec.evals else None,
        "accuracy_after": rec.evals[-1]["val/accuracy"] if rec.evals else None,
        "evals": rec.evals,
        "generated_tokens": rec.steps[-1].get("rollout/generated_tokens_total") if rec.steps else 0,
        "mean_gen_batches": (sum(r.get("dynamic_sampling/gen_batches", 1) for r in rec.steps) / len(rec.steps)) if rec.steps else None,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot(out, rec, args)
    return summary


def plot(out: Path, rec: RunRecorder, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if rec.steps:
        minutes = [r["train_seconds"] / 60 for r in rec.steps]
        rewards = [r.get("reward/mean", float("nan")) for r in rec.steps]
        window = 5
        smooth = [sum(rewards[max(0, i - window + 1) : i + 1]) / len(rewards[max(0, i - window + 1) : i + 1]) for i in range(len(rewards))]
        axes[0].plot(minutes, rewards, alpha=0.3, label="reward/mean (per step)")
        axes[0].plot(minutes, smooth, label=f"moving mean ({window} steps)")
        axes[0].set_xlabel("training minutes")
        axes[0].set_ylabel("mean reward")
        axes[0].legend()
    if rec.evals:
        axes[1].plot([e["train_seconds"] / 60 for e in rec.evals], [100 * e["val/accuracy"] for e in rec.evals], marker="o")
        axes[1].set_xlabel("training minutes")
        axes[1].set_ylabel(f"held-out greedy accuracy (%), {args.num_test} prompts")
        axes[1].set_ylim(0, 100)
        axes[1].grid(alpha=0.3)
    tools = f", tools: {args.tools}" if getattr(args, "tools", "") else ""
    tools += f", environment: {args.environment}" if getattr(args, "environment", "") else ""
    fig.suptitle(f"rftlab {args.algo.upper()} + LoRA r{args.lora_r} on SmolLM2-135M-Instruct, {args.task}{tools} ({args.threads} CPU threads)")
    fig.tight_layout()
    fig.savefig(out / "curve.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algo", default="grpo")
    parser.add_argument("--policy", default="default")
    parser.add_argument("--minutes", type=float, default=30.0, help="training-time budget (excl. evaluation)")
    parser.add_argument("--max-steps", type=int, default=10_000)
    parser.add_argument("--eval-every", type=int, default=10, help="steps between held-out evaluations")
    parser.add_argument("--num-test", type=int, default=200)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--gens", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--beta", type=float, default=0.0)
    parser.add_argument("--loss-agg", default="seq-mean-token-mean")
    parser.add_argument("--scale", default="group")
    parser.add_argument("--overlong-buffer", type=int, default=0, help="DAPO overlong.buffer_len (0: off)")
    parser.add_argument("--num-iterations", type=int, default=1, help="optimisation passes per rollout (PPO epochs)")
    parser.add_argument("--num-minibatches", type=int, default=1, help="optimizer steps per pass")
    parser.add_argument("--critic", default="shared", help="PPO critic: shared, adapter or model")
    parser.add_argument("--lam", type=float, default=1.0, help="PPO GAE lambda")
    parser.add_argument("--vf-coef", type=float, default=0.1, help="PPO value-loss weight")
    parser.add_argument("--value-warmup-steps", type=int, default=0, help="PPO critic-only steps first")
    parser.add_argument("--task", default="arithmetic", choices=["arithmetic", "word_problems", "big_arithmetic"])
    parser.add_argument("--tools", default="", help="comma-separated tools of rftlab.environments (calculator, python)")
    parser.add_argument("--environment", default="", choices=["", "try_again"], help="a multi-turn environment")
    parser.add_argument("--max-turns", type=int, default=3, help="model turns per episode (--tools, --environment)")
    parser.add_argument("--ratio-mode", default="sum", help="SegmentRFT segment ratio: sum, mean or token")
    parser.add_argument("--rho", type=float, default=2.0, help="SegmentRFT weight of the answer segment's reward")
    parser.add_argument("--reward-whiten", default="none", help="SegmentRFT whitening of segment scores: none, chain, batch")
    parser.add_argument("--whiten-advantages", action="store_true", help="SegmentRFT: whiten segment advantages over the batch")
    parser.add_argument("--segment-options", default="{}", help='other SegmentRFT options as JSON, merged group by group, e.g. '
                        '\'{"segments": {"rewards": {"progress_divisor": 1e6}}}\'')
    parser.add_argument("--module-options", default="{}", help='other GRPO options as JSON, merged group by group, e.g. '
                        '\'{"loss": {"entropy_target": 0.3, "entropy_coef": 0.01}}\'')
    parser.add_argument("--init-checkpoint", default=None, help="start from this checkpoint's policy (e.g. an SFT run)")
    parser.add_argument("--sampling-dtype", default=None,
                        help="sample from a copy of the weights in this dtype (bfloat16), or auto (rftlab's default)")
    parser.add_argument("--sampler-backend", default="rftlab", choices=["rftlab", "hf", "vllm"],
                        help="vllm needs vllm installed (benchmarks/.venv-vllm)")
    parser.add_argument("--precision", default="bf16-mixed", help="Lightning precision: 32-true or bf16-mixed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/out/learning_curve")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    L.seed_everything(args.seed, workers=True)
    model, dm = build(args)
    clock = TrainClock()
    rec = RunRecorder(clock, Budget(minutes=args.minutes))  # the same recorder as rftlab compare
    trainer = L.Trainer(
        max_steps=args.max_steps, accelerator="cpu", devices=1, precision=args.precision,
        logger=False, enable_checkpointing=False, callbacks=[clock, rec],
        val_check_interval=args.eval_every, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        enable_progress_bar=True,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    if not rec.evals or rec.evals[-1]["step"] != trainer.global_step:
        trainer.validate(model, datamodule=dm, verbose=False)  # the recorder keeps its result
    summary = write_outputs(Path(args.out), rec, args, time.perf_counter() - start)
    print(json.dumps({k: v for k, v in summary.items() if k != "evals"}, indent=2))
    for e in rec.evals:
        print(f"step {int(e['step']):4d}  {e['train_seconds'] / 60:6.2f} min  accuracy {100 * e['val/accuracy']:.1f}%")


if __name__ == "__main__":
    main()
