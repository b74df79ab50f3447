"""Peak memory and step time of GRPO on SmolLM2-135M-Instruct: full fp32, LoRA fp32, LoRA bf16
autocast, QLoRA nf4, each with and without gradient checkpointing and with beta 0 and beta > 0,
plus full fine-tuning with 8-bit AdamW.

Each configuration runs in its own subprocess (so peak RSS is that configuration's alone) for a few
GRPO steps with the same settings, and reports:
  peak_rss_mb        the process's peak resident set (ru_maxrss: loading included)
  train_peak_rss_mb  the largest RSS sampled (every 10 ms) from the start of training on: rollouts
                     (generation, scoring) and updates, after the model is loaded
  median_step_s      median wall time of one optimizer step (rollout + update), first step excluded
  ckpt_mb / ckpt_weights_mb  Lightning checkpoint with / without optimizer state
Targets: LoRA with beta > 0 at most 10% above beta 0 (no reference copy); QLoRA's peak
below LoRA fp32's; a LoRA checkpoint under 5% of the full model's size.

    nice -n 10 .venv/bin/python benchmarks/memory.py                         # all 18 configurations
    nice -n 10 .venv/bin/python benchmarks/memory.py --only lora_fp32_beta0,qlora_nf4_beta0
    nice -n 10 .venv/bin/python benchmarks/memory.py --policy tiny --steps 2  # a quick check of the script
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from rss import RssPeak, current_rss_bytes  # benchmarks/rss.py

BASES: dict[str, dict[str, Any]] = {
    "full_fp32": {"lora": False},
    "lora_fp32": {"lora": True},
    "lora_bf16": {"lora": True, "precision": "bf16-mixed"},
    "qlora_nf4": {"lora": True, "quantization": "nf4"},
}
BETA = 0.04


def configurations() -> dict[str, dict[str, Any]]:
    """Name -> options: every base x gradient checkpointing x beta, plus full fine-tuning with AdamW8bit
    and LoRA over bf16-stored base weights."""
    out = {}
    for base, options in BASES.items():
        for gc in (False, True):
            for beta in (0.0, BETA):
                name = f"{base}{'_gc' if gc else ''}_beta{beta:g}"
                out[name] = {"precision": "32-true", **options, "gradient_checkpointing": gc, "beta": beta}
    out["full_fp32_adamw8bit_beta0"] = {"precision": "32-true", "lora": False, "optimizer": "adamw8bit",
                                        "gradient_checkpointing": False, "beta": 0.0}
    # bf16 autocast over frozen base weights stored in bf16 (dtype="bfloat16"): the matmuls of lora_bf16,
    # without re-casting the fp32 weights at every op (autocast caches the casts of trained weights only).
    out["lora_bf16_weights_beta0"] = {"precision": "bf16-mixed", "lora": True, "dtype": "bfloat16",
                                      "gradient_checkpointing": False, "beta": 0.0}
    return out


def run_child(name: str, options: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Train one configuration a few steps in this process and measure it."""
    import lightning as L
    import torch

    from rftlab import GRPO, RolloutDataModule
    from rftlab.tasks import Arithmetic

    torch.set_num_threads(args.threads)
    L.seed_everything(0, verbose=False)
    sampler = RssPeak()
    sampler.start()
    policy = dict(model=args.policy, lora=options["lora"], quantization=options.get("quantization", "none"),
                  dtype=options.get("dtype", "float32"), gradient_checkpointing=options["gradient_checkpointing"])
    module = GRPO(policy=policy, lr=1e-5, beta=options["beta"], optim=dict(optimizer=options.get("optimizer", "adamw")),
                  log=dict(validate_at_start=False))
    start = time.perf_counter()
    module.configure_model()
    load_s = time.perf_counter() - start
    loaded_rss = current_rss_bytes()
    dm = RolloutDataModule(task=Arithmetic(), prompts_per_step=args.prompts, num_generations=args.gens,
                           max_new_tokens=args.max_new_tokens, seed=0)
    timer = StepTimer(sampler)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, precision=options["precision"],
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, callbacks=[timer], default_root_dir=tmp)
        trainer.fit(module, datamodule=dm)
        train_peak = sampler.peak
        trainer.save_checkpoint(Path(tmp) / "full.ckpt")
        trainer.save_checkpoint(Path(tmp) / "weights.ckpt", weights_only=True)
        ckpt_mb = (Path(tmp) / "full.ckpt").stat().st_size / 1e6
        ckpt_weights_mb = (Path(tmp) / "weights.ckpt").stat().st_size / 1e6
    sampler.stop()
    base_params = sum(p.numel() for n, p in module.policy.named_parameters() if "lora_" not in n)
    return {
        "name": name, **options, "steps": len(timer.step_seconds),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # KiB on Linux
        "train_peak_rss_mb": round(train_peak / 2**20, 1),
        "loaded_rss_mb": round(loaded_rss / 2**20, 1),
        "load_s": round(load_s, 2),
        "median_step_s": round(statistics.median(timer.measured(timer.step_seconds)), 3),
        "median_generate_s": round(statistics.median(timer.metric("timing/generate")), 3),
        "median_train_s": round(statistics.median(timer.metric("timing/train")), 3),
        "ckpt_mb": round(ckpt_mb, 2),
        "ckpt_weights_mb": round(ckpt_weights_mb, 2),
        "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
        # 4-bit parameters count packed bytes, not weights: the fp32 size is only known unquantized.
        "model_fp32_mb": round(base_params * 4 / 1e6, 1) if options.get("quantization", "none") == "none" else None,
        "has_reference_copy": module.ref_policy is not None,
    }


class StepTimer(Callback):
    """Wall time between consecutive optimizer steps (rollout + update), and per-step logged timings."""

    def __init__(self, sampler: RssPeak) -> None:
        self.sampler, self.step_seconds, self.logged = sampler, [], []
        self._last = self._update_start = 0.0

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.sampler.reset()  # from here on: training only, the model already loaded and placed
        self._last = time.perf_counter()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._update_start = time.perf_counter()  # the rollout is already built: the update starts

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        self.step_seconds.append(now - self._last)
        self._last = now
        # Callbacks run before the module's own hook, so the update time is measured here.
        row = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("timing/")}
        self.logged.append({**row, "timing/train": now - self._update_start})

    @staticmethod
    def measured(values: list[float]) -> list[float]:
        """The values of the steps after the first (warm-up), when there are at least three."""
        return values[1:] if len(values) > 2 else values

    def metric(self, key: str) -> list[float]:
        """Per-step values of a ``timing/...`` metric, warm-up step excluded."""
        values = self.measured([row.get(key, float("nan")) for row in self.logged])
        return values or [float("nan")]


def markdown(results: list[dict[str, Any]]) -> str:
    """The results as a Markdown table (MB are MiB of RSS; checkpoint sizes in MB)."""
    lines = ["| configuration | peak RSS (MiB) | train peak RSS (MiB) | median step (s) | generate (s) | update (s) | ckpt (MB) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | error: {r['error'][:60]} | | | | | |")
            continue
        lines.append(f"| {r['name']} | {r['peak_rss_mb']:.0f} | {r['train_peak_rss_mb']:.0f} | {r['median_step_s']:.2f} | "
                     f"{r['median_generate_s']:.2f} | {r['median_train_s']:.2f} | {r['ckpt_mb']:.1f} |")
    return "\n".join(lines)


def targets(results: list[dict[str, Any]]) -> list[str]:
    """The memory targets above, checked on whatever configurations ran."""
    by = {r["name"]: r for r in results if "error" not in r}
    out = []
    for base in ("lora_fp32", "lora_bf16", "qlora_nf4", "lora_fp32_gc", "lora_bf16_gc", "qlora_nf4_gc"):
        a, b = by.get(f"{base}_beta0"), by.get(f"{base}_beta{BETA:g}")
        if a and b:
            for key in ("peak_rss_mb", "train_peak_rss_mb"):
                ratio = b[key] / a[key]
                out.append(f"{'PASS' if ratio <= 1.10 else 'FAIL'} {base}: beta>0 / beta=0 {key} = {ratio:.3f} (target <= 1.10)")
    for gc in ("", "_gc"):
        q, lo = by.get(f"qlora_nf4{gc}_beta0"), by.get(f"lora_fp32{gc}_beta0")
        if q and lo:
            for key in ("peak_rss_mb", "train_peak_rss_mb"):
                out.append(f"{'PASS' if q[key] < lo[key] else 'FAIL'} qlora_nf4{gc} {key} {q[key]:.0f} < lora_fp32{gc} {lo[key]:.0f}")
    lora, full = by.get("lora_fp32_beta0"), by.get("full_fp32_beta0")
    if lora:
        share = lora["ckpt_weights_mb"] / lora["model_fp32_mb"]
        out.append(f"{'PASS' if share < 0.05 else 'FAIL'} LoRA weights checkpoint = {100 * share:.1f}% of the fp32 model "
                   f"({lora['ckpt_weights_mb']:.1f} / {lora['model_fp32_mb']:.1f} MB; target < 5%)")
        if full:
            share = lora["ckpt_mb"] / full["ckpt_mb"]
            out.append(f"{'PASS' if share < 0.05 else 'FAIL'} LoRA checkpoint = {100 * share:.1f}% of the full fine-tuning "
                       f"checkpoint, both with optimizer state ({lora['ckpt_mb']:.1f} / {full['ckpt_mb']:.1f} MB)")
    return out


def _exit_with_parent() -> None:
    """End this child if the parent driver dies (a killed driver must not leave a training process)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default="default", help="'default' (SmolLM2-135M-Instruct) or 'tiny' (script check)")
    parser.add_argument("--only", default=None, help="comma-separated configuration names (default: all)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per configuration")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per rollout")
    parser.add_argument("--gens", type=int, default=4, help="completions per prompt (G)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    parser.add_argument("--out", default="benchmarks/results/memory", help="writes <out>.json and <out>.md")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configs = configurations()
    if args.child:
        _exit_with_parent()
        print("RESULT " + json.dumps(run_child(args.child, configs[args.child], args)), flush=True)
        return
    names = args.only.split(",") if args.only else list(configs)
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise SystemExit(f"unknown configurations {unknown}; valid: {', '.join(configs)}")
    results = []
    forwarded = [f"--policy={args.policy}", f"--steps={args.steps}", f"--prompts={args.prompts}", f"--gens={args.gens}",
                 f"--max-new-tokens={args.max_new_tokens}", f"--threads={args.threads}"]
    for name in names:
        start = time.perf_counter()
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline"}
        try:
            proc = subprocess.run([sys.executable, __file__, f"--child={name}", *forwarded], capture_output=True,
                                  text=True, timeout=args.timeout, env=env)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            result = json.loads(lines[-1][7:]) if lines else {"name": name, "error": proc.stderr.strip().splitlines()[-1:]}
        except subprocess.TimeoutExpired:
            result = {"name": name, "error": f"timeout after {args.timeout} s"}
        if "error" in result:
            result["error"] = str(result["error"])
        results.append(result)
        print(f"{name}: {json.dumps(result)}  ({time.perf_counter() - start:.0f} s)", flush=True)
    table, checks = markdown(results), targets(results)
    print("\n" + table + "\n\n" + "\n".join(checks))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "child"}
    out.with_suffix(".json").write_text(json.dumps({"settings": settings, "results": results, "targets": checks}, indent=2))
    out.with_suffix(".md").write_text(f"Settings: {json.dumps(settings)}\n\n{table}\n\n" + "\n".join(f"- {c}" for c in checks) + "\n")


if __name__ == "__main__":
    main()
