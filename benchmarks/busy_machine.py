"""rftlab's step time on an idle machine and beside a competing CPU-bound process.

Every case is a short GRPO + LoRA run (bf16 autocast, the bundled SmolLM2-135M-Instruct, Arithmetic,
``--prompts`` x ``--generations`` completions of at most ``--tokens`` new tokens) in a fresh process, so the
OpenMP environment is read anew. A case names the torch threads ("auto" is rftlab's default:
``rftlab.callbacks.AdaptiveThreads``, which starts from torch's one thread per core; a number is
a fixed count, the callback switched off), the OpenMP wait policy (``default``: whatever the environment
holds, normally unset) and the competitor started beside it:

- ``none``: the machine to itself;
- ``python``: one busy single-threaded process (``while True: pass``);
- ``torch``: another torch process with torch's default threads (one per core), multiplying
  matrices without pause;
- ``same``: a second rftlab training run like the measured one, with the same thread setting
  (two runs started side by side on one machine).

Reported per case: the median seconds per optimizer step (step 1, the warm-up, excluded) and the
ratio to the idle machine at the same settings. Cases run in rounds (every case once per round)
so slow drifts of a shared machine spread over all of them.

    .venv/bin/python benchmarks/busy_machine.py --rounds 2 --out benchmarks/results/busy_machine
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

COMPETITORS = {
    "python": "while True:\n    pass\n",
    "torch": ("import torch\n"
              "a = torch.randn(512, 512)\n"
              "while True:\n"
              "    a = torch.tanh(a @ a)\n"),
}


def run_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """One training run: the step times and the thread counts each step ran with."""
    import lightning as L
    import torch

    from rftlab import GRPO, RolloutDataModule
    from rftlab.tasks import Arithmetic

    if cfg["threads"] != "auto":
        torch.set_num_threads(int(cfg["threads"]))
    L.seed_everything(0, verbose=False)
    module = GRPO(policy=dict(model=cfg.get("policy", "default"), lora_r=16, lora_alpha=32), lr=2e-4, beta=0.0,
                  log=dict(validate_at_start=False))
    dm = RolloutDataModule(task=Arithmetic(num_test=0), prompts_per_step=cfg["prompts"],
                           num_generations=cfg["generations"], max_new_tokens=cfg["tokens"], temperature=1.0,
                           seed=0)
    ends: list[float] = []
    threads: list[int] = []

    class Timer(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            ends.append(time.perf_counter())
            threads.append(torch.get_num_threads())

    trainer = L.Trainer(max_steps=cfg["steps"], accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, precision="bf16-mixed", callbacks=[Timer()])
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    steps = [b - a for a, b in zip([start] + ends, ends)]
    return {"step_s": steps, "median_step_s": statistics.median(steps[1:]), "threads_per_step": threads}


def spawn_competitor(kind: str, cfg: dict[str, Any], env: dict[str, str]) -> subprocess.Popen | None:
    """Start the competing process (None for an idle machine).

    Args:
        kind: "none", "python", "torch" or "same".
        cfg: the measured run's settings ("same" trains with them, for far more steps).
        env: the measured run's environment.
    """
    if kind == "none":
        return None
    if kind == "same":
        command = [sys.executable, __file__, "--worker", json.dumps({**cfg, "steps": 10_000})]
    else:
        command = [sys.executable, "-c", COMPETITORS[kind]]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    time.sleep(15.0 if kind == "same" else 2.0)  # let it load and reach its loop
    return proc


def run_case(case: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Run one case in a fresh process beside its competitor."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled",
           "PYTHONPATH": str(HERE.parent)}
    env.pop("OMP_NUM_THREADS", None)
    # A fixed count: the default callback that adapts it stays out of the way.
    env["RFTLAB_ADAPTIVE_THREADS"] = "1" if case["threads"] == "auto" else "0"
    if case["wait_policy"] != "default":
        env["OMP_WAIT_POLICY"] = case["wait_policy"]
    cfg = {"threads": case["threads"], "policy": args.policy, "steps": args.steps, "prompts": args.prompts,
           "generations": args.generations, "tokens": args.tokens}
    competitor = spawn_competitor(case["competitor"], cfg, env)
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True,
                              text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {**case, "error": f"timed out after {args.timeout} s"}
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {**case, "error": proc.stderr[-2000:]}
    return {**case, **json.loads(lines[-1][len("RESULT "):])}


def parse_cases(text: str) -> list[dict[str, Any]]:
    """``threads/wait_policy/competitor`` triples, comma-separated, e.g. ``2/default/python,auto/default/none``."""
    cases = []
    for item in text.split(","):
        threads, wait_policy, competitor = item.split("/")
        if competitor not in ("none", *COMPETITORS, "same"):
            raise ValueError(f"competitor must be one of none, {', '.join(COMPETITORS)}, same; got {competitor!r}")
        cases.append({"threads": threads, "wait_policy": wait_policy, "competitor": competitor})
    return cases


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median step time per case over the rounds, and its ratio to the same settings on an idle machine."""
    table: dict[tuple, dict[str, Any]] = {}
    for r in results:
        key = (r["threads"], r["wait_policy"], r["competitor"])
        row = table.setdefault(key, {"threads": r["threads"], "wait_policy": r["wait_policy"],
                                     "competitor": r["competitor"], "medians": [], "threads_used": set()})
        if "error" in r:
            row["error"] = r["error"][-200:]
            continue
        row["medians"].append(r["median_step_s"])
        row["threads_used"].update(r["threads_per_step"][1:])
    rows = []
    for key, row in table.items():
        row["median_step_s"] = statistics.median(row["medians"]) if row["medians"] else None
        row["threads_used"] = sorted(row["threads_used"])
        rows.append(row)
    fastest_idle = min((r["median_step_s"] for r in rows if r["competitor"] == "none" and r["median_step_s"]),
                       default=None)
    for row in rows:
        idle = table.get((row["threads"], row["wait_policy"], "none"))
        row["vs_same_idle"] = (row["median_step_s"] / idle["median_step_s"]
                               if idle and idle.get("median_step_s") and row["median_step_s"] else None)
        row["vs_fastest_idle"] = (row["median_step_s"] / fastest_idle
                                  if fastest_idle and row["median_step_s"] else None)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| threads | OpenMP wait policy | competitor | median step (s) | x same settings idle | "
             "x fastest idle | threads used |",
             "| --- | --- | --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        if r["median_step_s"] is None:
            lines.append(f"| {r['threads']} | {r['wait_policy']} | {r['competitor']} | error | | | |")
            continue
        ratios = " | ".join("" if r[k] is None else f"{r[k]:.2f}" for k in ("vs_same_idle", "vs_fastest_idle"))
        lines.append(f"| {r['threads']} | {r['wait_policy']} | {r['competitor']} | {r['median_step_s']:.2f} | "
                     f"{ratios} | {', '.join(map(str, r['threads_used']))} |")
    return "\n".join(lines)


DEFAULT_CASES = ",".join(f"{t}/{w}/{c}" for c in ("none", "python", "torch")
                         for t, w in (("2", "default"), ("1", "default"), ("2", "PASSIVE"), ("auto", "default")))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--cases", default=DEFAULT_CASES, help="threads/wait_policy/competitor triples")
    parser.add_argument("--rounds", type=int, default=2, help="every case once per round")
    parser.add_argument("--policy", default="default", help="'default' (the bundled model) or 'tiny' (a quick check)")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is not timed)")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per completion at most")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before a run is given up")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "busy_machine", help="results folder")
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return
    cases = parse_cases(args.cases)
    results = []
    for round_ in range(args.rounds):
        for case in cases:
            result = run_case(case, args)
            result["round"] = round_
            results.append(result)
            took = result.get("median_step_s")
            print(f"round {round_} {case}: " + (f"{took:.2f} s/step, threads {result['threads_per_step']}" if took
                                               else f"error {result.get('error', '')[-300:]}"), flush=True)
    rows = summarize(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "runs": results, "summary": rows}, indent=2))
    (args.out / "table.md").write_text(markdown(rows) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
