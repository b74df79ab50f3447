"""Sharded against replicated training on 2 CPU processes: step time and memory per process.

GRPO, full fine-tuning with a KL term (a frozen reference copy), the bundled SmolLM2-135M, fp32,
on 2 processes with gloo, once with DDP (every process holds every weight) and once with FSDP2
(``rftlab.models.FSDP2Strategy``: each process holds half of every weight and gathers a layer just
before it runs). Per process: the median training-step time (sampling, scoring and update), the
peak resident memory, and the bytes of parameters, gradients and optimizer state it holds.

    .venv/bin/python benchmarks/sharded_training.py --out benchmarks/results/sharded_training.json

Each strategy runs in its own pair of processes (this script re-runs itself with ``--strategy``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def held_bytes(module, optimizer) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state held by this process (local shards only)."""
    def local(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = list(module.parameters())
    ref = getattr(module, "ref_policy", None)  # a reference kept off the device is not a submodule
    seen = {id(p) for p in params}
    params += [p for p in (ref.parameters() if ref is not None else []) if id(p) not in seen]
    state = [v for s in optimizer.state.values() for v in s.values() if hasattr(v, "numel") and v.dim() > 0]
    return {"parameters": sum(local(p) for p in params),
            "gradients": sum(local(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(local(v) for v in state)}


def run_one(strategy_name: str, steps: int, out: Path) -> None:
    import lightning as L
    import torch

    from rftlab import GRPO, RolloutDataModule
    from rftlab.models import FSDP2Strategy
    from rftlab.tasks import Arithmetic

    torch.set_num_threads(1)  # two processes on two cores

    class Clock(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.held: dict[str, int] = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.times.append(time.perf_counter() - self.start)
            self.held = held_bytes(pl_module, trainer.optimizers[0])

    torch.manual_seed(0)
    module = GRPO(policy="default", lora=False, beta=0.04, lr=1e-6, log={"validate_at_start": False})
    # The clock measures the step; the rollout is built in the DataModule's iterator, before
    # on_train_batch_start, so it is timed through the datamodule's own rollout metrics instead.
    data = RolloutDataModule(task=Arithmetic(num_test=0), prompts_per_step=1, num_generations=4, max_new_tokens=16)
    clock = Clock()
    strategy = FSDP2Strategy() if strategy_name == "fsdp2" else "ddp"
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=steps, precision="32-true",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[clock])
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    total = time.perf_counter() - start
    result = {
        "strategy": strategy_name, "rank": trainer.global_rank, "steps": trainer.global_step,
        "seconds_per_step_with_rollout": total / max(1, trainer.global_step),
        "update_seconds_median": statistics.median(clock.times[1:] or clock.times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "held_mb": {k: v / 2**20 for k, v in clock.held.items()},
    }
    (out / f"{strategy_name}_rank{trainer.global_rank}.json").write_text(json.dumps(result, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--strategy", choices=["ddp", "fsdp2"], default=None, help="run one strategy (internal)")
    parser.add_argument("--work", type=Path, default=Path("benchmarks/out/sharded_training"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/sharded_training.json"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.strategy:
        run_one(args.strategy, args.steps, args.work)
        return
    env = {k: v for k, v in os.environ.items() if k != "LOCAL_RANK"}
    results = {}
    for name in ("ddp", "fsdp2"):
        subprocess.run([sys.executable, str(HERE), "--strategy", name, "--steps", str(args.steps),
                        "--work", str(args.work)], env=env, check=True)
        results[name] = [json.loads((args.work / f"{name}_rank{r}.json").read_text()) for r in (0, 1)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    for name, ranks in results.items():
        r = ranks[0]
        print(f"{name:6s} step+rollout {r['seconds_per_step_with_rollout']:.2f} s, update {r['update_seconds_median']:.2f} s, "
              f"peak RSS {r['peak_rss_mb']:.0f} MB, held {r['held_mb']}")


if __name__ == "__main__":
    main()
