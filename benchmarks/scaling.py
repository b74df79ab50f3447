"""How GRPO's step time and memory grow with the group size G and the completion length.

Grid: G in (4, 8, 16) x max_new_tokens in (32, 64, 128), on SmolLM2-135M-Instruct (policy "default"),
LoRA, bf16-mixed (or --precision 32-true), 1 prompt per step, beta 0, 2 threads, AdamW.

Completions are fixed-length by default: the rollouts sample with ``SamplingParams.ignore_eos`` (EOS
no longer stops a completion; the distribution is unchanged), so every step generates exactly
G x max_new_tokens tokens and "cost vs generated tokens" compares like with like. --stop-at-eos
lets completions end at EOS instead; the actual token counts are then what the fit uses.

Each configuration runs in its own subprocess (so peak RSS is that configuration's alone) for
--steps optimizer steps and reports:
  median_step_s       median wall time of one optimizer step (rollout + update), steps after the first
  tokens_per_step     generated tokens per step (sum of the completion mask), median
  s_per_token         median_step_s / tokens_per_step
  phases              median seconds of each logged timing/* phase (generate, reward, logprobs,
                      forward, backward, ...; logprobs is ~0 with one update per rollout)
  peak_rss_mb         the process's peak resident set (ru_maxrss, loading included)
  train_peak_rss_mb   the largest RSS sampled (every 10 ms) from the start of training on
and a least-squares fit of step seconds against generated tokens over all configurations
(slope = seconds per extra generated token, intercept, R^2): linear cost means R^2 close to 1.

    nice -n 10 .venv/bin/python benchmarks/scaling.py                               # the 9 configurations
    nice -n 10 .venv/bin/python benchmarks/scaling.py --groups 4,8 --lengths 32     # a sub-grid
    nice -n 10 .venv/bin/python benchmarks/scaling.py --policy tiny --steps 2       # a quick check of the script
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from rss import RssPeak, current_rss_bytes  # benchmarks/rss.py

PHASES = ("generate", "reward", "logprobs", "ref", "score", "forward", "backward", "train")
TABLE_PHASES = ("generate", "reward", "logprobs", "forward", "backward")


def configurations(groups: list[int], lengths: list[int]) -> dict[str, dict[str, int]]:
    """Name -> options for every group size x completion length, e.g. ``g8_t64``.

    Args:
        groups: group sizes G (completions per prompt, >= 2 for GRPO).
        lengths: completion budgets (max_new_tokens).
    """
    return {f"g{g}_t{t}": {"num_generations": g, "max_new_tokens": t} for g in groups for t in lengths}


def linear_fit(xs: list[float], ys: list[float]) -> dict[str, float | None]:
    """Ordinary least squares y = slope * x + intercept, with R^2 = 1 - SS_res / SS_tot.

    Values are None where undefined: fewer than two points or all x equal (no slope), all y equal
    (no R^2).

    Args:
        xs: the predictor (generated tokens per step).
        ys: the response (seconds per step).
    """
    n = len(xs)
    if n != len(ys):
        raise ValueError(f"xs and ys differ in length: {n} != {len(ys)}")
    if n < 2:
        return {"slope": None, "intercept": None, "r2": None, "n": n}
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return {"slope": None, "intercept": None, "r2": None, "n": n}
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    ss_res = sum((y - (slope * x + intercept)) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return {"slope": slope, "intercept": intercept, "r2": 1 - ss_res / ss_tot if ss_tot > 0 else None, "n": n}


def fit_results(results: list[dict[str, Any]]) -> dict[str, float | None]:
    """Step seconds vs generated tokens per step, over the configurations that ran."""
    ok = [r for r in results if "error" not in r]
    return linear_fit([float(r["tokens_per_step"]) for r in ok], [float(r["median_step_s"]) for r in ok])


# ---- one configuration (in a subprocess) ---------------------------------------------------------
def measured(values: list[float]) -> list[float]:
    """The values of the steps after the first (which pays one-off warm-up), when there are two or more."""
    return values[1:] if len(values) > 1 else values


def median_or_none(values: list[float]) -> float | None:
    """The median, or None for no values (a phase this configuration never logged)."""
    return statistics.median(values) if values else None


def run_child(name: str, options: dict[str, int], args: argparse.Namespace) -> dict[str, Any]:
    """Train one configuration for ``args.steps`` steps in this process and measure it.

    Args:
        name: configuration name (for the result).
        options: ``num_generations`` and ``max_new_tokens``.
        args: the script's options (policy, precision, steps, threads, ...).
    """
    import lightning as L
    import torch

    from rftlab import GRPO, RolloutDataModule
    from rftlab.tasks import Arithmetic

    fixed_length = not args.stop_at_eos

    class FixedLengthGRPO(GRPO):
        """GRPO whose rollouts ignore EOS when ``fixed_length``: every completion is max_new_tokens long."""

        def generate(self, prompt_ids: Any, prompt_mask: Any, num_generations: int, params: Any) -> Any:
            return super().generate(prompt_ids, prompt_mask, num_generations, replace(params, ignore_eos=fixed_length))

    class StepTimer(L.Callback):
        """Per optimizer step: wall time (rollout + update), generated tokens, and the logged timing/* phases."""

        def __init__(self, rss: RssPeak) -> None:
            self.rss, self.step_s, self.tokens, self.phases = rss, [], [], []
            self._last = self._update_start = 0.0

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.rss.reset()  # from here on: training only, the model already loaded
            self._last = time.perf_counter()

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            self._update_start = time.perf_counter()  # the rollout is built (Lightning fetched it): the update starts

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            now = time.perf_counter()
            self.step_s.append(now - self._last)
            self._last = now
            self.tokens.append(int(batch.completion_mask.sum()))  # one minibatch = the whole rollout here
            logged = trainer.callback_metrics  # this step's values: logged during training_step and backward
            row = {p: float(logged[f"timing/{p}"]) for p in PHASES if f"timing/{p}" in logged}
            # The module logs timing/train in its own hook, which runs after this one: measure it here.
            row["train"] = now - self._update_start
            self.phases.append(row)

    torch.set_num_threads(args.threads)
    L.seed_everything(0, verbose=False)
    rss = RssPeak()
    rss.start()
    module = FixedLengthGRPO(policy=args.policy, lora=args.lora, beta=0.0, lr=1e-5, log=dict(validate_at_start=False))
    module.configure_model()
    loaded_rss = current_rss_bytes()
    dm = RolloutDataModule(task=Arithmetic(num_test=0), prompts_per_step=1, num_generations=options["num_generations"],
                           max_new_tokens=options["max_new_tokens"], seed=0)
    timer = StepTimer(rss)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, precision=args.precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[timer])
    trainer.fit(module, datamodule=dm)
    rss.stop()
    step_s, tokens = measured(timer.step_s), measured(timer.tokens)
    median_step, median_tokens = statistics.median(step_s), statistics.median(tokens)
    phases = {p: median_or_none([row[p] for row in measured(timer.phases) if p in row]) for p in PHASES}
    return {
        "name": name, **options, "fixed_length": fixed_length, "steps": len(timer.step_s),
        "median_step_s": round(median_step, 4),
        "step_s": [round(s, 4) for s in timer.step_s],
        "tokens_per_step": median_tokens,
        "tokens": timer.tokens,
        "s_per_token": round(median_step / median_tokens, 6) if median_tokens else None,
        "phases": {p: round(v, 4) for p, v in phases.items() if v is not None},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # KiB on Linux
        "train_peak_rss_mb": round(rss.peak / 2**20, 1),
        "loaded_rss_mb": round(loaded_rss / 2**20, 1),
    }


def _exit_with_parent() -> None:
    """End this child if the driver dies (a killed driver must not leave a training process behind)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


# ---- the driver ----------------------------------------------------------------------------------
def markdown(results: list[dict[str, Any]], fit: dict[str, float | None]) -> str:
    """The results as a Markdown table (RSS in MiB, times in seconds), then the fit."""
    head = ["configuration", "G", "max new tokens", "tokens/step", "median step (s)", "ms/token",
            *[f"{p} (s)" for p in TABLE_PHASES], "peak RSS (MiB)", "train peak RSS (MiB)"]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | error: {str(r['error'])[:80]} |" + " |" * (len(head) - 2))
            continue
        phases = [f"{r['phases'][p]:.3f}" if p in r["phases"] else "" for p in TABLE_PHASES]
        per_token = f"{1000 * r['s_per_token']:.2f}" if r["s_per_token"] else ""
        cells = [r["name"], str(r["num_generations"]), str(r["max_new_tokens"]), f"{r['tokens_per_step']:g}",
                 f"{r['median_step_s']:.3f}", per_token, *phases,
                 f"{r['peak_rss_mb']:.0f}", f"{r['train_peak_rss_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if fit["slope"] is None:
        lines.append(f"\nFit of step seconds vs generated tokens: undefined over {fit['n']} configuration(s) "
                     "(it needs two or more distinct token counts).")
    else:
        r2 = f"{fit['r2']:.4f}" if fit["r2"] is not None else "undefined"
        lines.append(f"\nLeast-squares fit over {fit['n']} configurations: step seconds = {fit['slope'] * 1000:.3f} ms x "
                     f"generated tokens + {fit['intercept']:.3f} s (R^2 = {r2}).")
    return "\n".join(lines)


def int_list(text: str) -> list[int]:
    """Parse "4,8,16" into [4, 8, 16]."""
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The script's options (``argv`` None: the command line)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default="default", help="'default' (SmolLM2-135M-Instruct) or 'tiny' (script check)")
    parser.add_argument("--groups", type=int_list, default=[4, 8, 16], help="comma-separated group sizes G")
    parser.add_argument("--lengths", type=int_list, default=[32, 64, 128], help="comma-separated max_new_tokens")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per configuration (the first is not timed)")
    parser.add_argument("--precision", default="bf16-mixed", choices=["bf16-mixed", "32-true"])
    parser.add_argument("--lora", action=argparse.BooleanOptionalAction, default=True,
                        help="LoRA (default) or full fine-tuning")
    parser.add_argument("--stop-at-eos", action="store_true", help="let completions end at EOS (default: fixed length)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    parser.add_argument("--out", default="benchmarks/results/scaling", help="writes <out>.json and <out>.md")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    return args


def spawn(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter and return its result (or an error entry)."""
    forwarded = [f"--policy={args.policy}", f"--groups={','.join(map(str, args.groups))}",
                 f"--lengths={','.join(map(str, args.lengths))}", f"--steps={args.steps}",
                 f"--precision={args.precision}", "--lora" if args.lora else "--no-lora", f"--threads={args.threads}",
                 *(["--stop-at-eos"] if args.stop_at_eos else [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
           "WANDB_MODE": "offline"}
    try:
        proc = subprocess.run([sys.executable, __file__, f"--child={name}", *forwarded], capture_output=True, text=True,
                              timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"name": name, "error": f"timeout after {args.timeout} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if lines:
        return json.loads(lines[-1][len("RESULT "):])
    return {"name": name, "error": " ".join(proc.stderr.strip().splitlines()[-1:]) or f"exit code {proc.returncode}"}


def main(argv: list[str] | None = None) -> None:
    """Run every configuration in its own subprocess (or, with --child, one configuration here)."""
    args = parse_args(argv)
    configs = configurations(args.groups, args.lengths)
    if args.child:
        _exit_with_parent()
        print("RESULT " + json.dumps(run_child(args.child, configs[args.child], args)), flush=True)
        return
    results = []
    for name in configs:
        start = time.perf_counter()
        results.append(spawn(name, args))
        print(f"{name}: {json.dumps(results[-1])}  ({time.perf_counter() - start:.0f} s)", flush=True)
    fit = fit_results(results)
    table = markdown(results, fit)
    print("\n" + table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "child"}
    settings.update(prompts_per_step=1, beta=0.0, task="arithmetic")
    out.with_suffix(".json").write_text(json.dumps({"settings": settings, "results": results, "fit": fit}, indent=2) + "\n")
    out.with_suffix(".md").write_text(f"Settings: {json.dumps(settings)}\n\n{table}\n")


if __name__ == "__main__":
    main()
