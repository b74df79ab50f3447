"""rftlab's GRPO vs TRL's GRPOTrainer at the same settings, plus the raw-model floor.

Every measurement runs in its own subprocess (so peak RSS is per run), alternating rftlab and TRL
(A/B, B/A, ...) for ``--repeats`` rounds in one go, on 2 CPU threads. TRL lives in its own venv
(never an rftlab dependency; lightning, jsonargparse and gguf because the TRL worker reads its
prompts and reward through rftlab's own task):

    python3 -m venv benchmarks/.venv-trl
    benchmarks/.venv-trl/bin/pip install torch==2.13.0 && benchmarks/.venv-trl/bin/pip install "trl[peft]==1.16.0" lightning jsonargparse gguf
    .venv/bin/python benchmarks/vs_trl.py --repeats 3 --steps 6

Against an earlier commit of rftlab instead (or as well): check it out beside this one and name it,
e.g. ``git worktree add /tmp/rftlab-old <commit>`` then ``--baseline /tmp/rftlab-old`` (with
``--no-trl`` for the two rftlab sides only); both sides alternate in the same run.

Settings shared by both sides: SmolLM2-135M-Instruct (the bundled GGUF saved once as an HF
folder), the same Arithmetic prompts, 1 prompt x 8 completions per optimizer step, 32 new tokens,
temperature 1 (no top-k/top-p), fp32 (or --precision bf16 for both), gradient checkpointing off
(TRL 1.16 turns it on by default: we turn it off), AdamW, LoRA r16/alpha 32 on q/k/v/o or full
fine-tuning, beta 0 or 0.04. Reported: median seconds per optimizer step over steps 2..N, generated
tokens per second, peak RSS, and the ratios rftlab / TRL and rftlab / floor. rftlab runs with its
``forward`` group's defaults: ``share_prompt`` (each prompt encoded once per group in the training
forward), ``packing`` (each group as one row of real tokens where that is estimated cheaper),
``onednn_kernels`` (fp32 linear layers on oneDNN instead of torch's BLAS), ``cache_weight_casts``
(bf16: frozen weights cast once, not at every call), inverse-CDF sampling and
``sampling_dtype="auto"`` (a bf16 run samples from a bf16 copy of the weights, adapter merged,
through the static-cache loop; an fp32 run from the policy itself);
``--sampling-copy`` adds a third side, rftlab always sampling from the bf16 copy
(``forward.sampling_dtype="bfloat16"``), alternated with the other two.
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
from typing import Any

HERE = Path(__file__).resolve().parent
TRL_PYTHON = HERE / ".venv-trl" / "bin" / "python"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB on Linux


def prompt_rows(n: int) -> list[dict[str, Any]]:
    """The first n prompts of rftlab's Arithmetic stream (seed 0), used by both sides."""
    from rftlab.tasks import Arithmetic

    task = Arithmetic(num_test=0)
    return [task.train_rows()[i] for i in range(n)]


def correct_reward(completions: list, answer: list, **_: Any) -> list[float]:
    from rftlab.rewards import NumericAnswer

    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return NumericAnswer()(texts, answer=answer)


# ---- workers (run in subprocesses) -------------------------------------------------------------
def run_rftlab(cfg: dict[str, Any]) -> dict[str, Any]:
    import lightning as L
    import torch

    from rftlab import GRPO, RolloutDataModule
    from rftlab.tasks import RowsTask

    torch.set_num_threads(cfg["threads"])
    L.seed_everything(cfg["seed"], verbose=False)
    rows = prompt_rows(cfg["steps"] + 2)
    task = RowsTask(rows, rewards={"correct": correct_reward})
    module = GRPO(policy=dict(model=cfg["model"], lora_r=16, lora_alpha=32, lora_target_modules=LORA_TARGETS),
                  lora=cfg["lora"], beta=cfg["beta"], lr=cfg["lr"], log=dict(validate_at_start=False),
                  optim=dict(max_grad_norm=1.0),
                  forward=dict(share_prompt=cfg.get("share_prompt", True), sampling_dtype=cfg.get("sampling_dtype", "auto")))
    dm = RolloutDataModule(task=task, prompts_per_step=1, num_generations=8, max_new_tokens=32, temperature=1.0,
                           seed=cfg["seed"])
    ends: list[float] = []
    tokens: list[int] = []
    generate: list[float] = []

    class Timer(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            ends.append(time.perf_counter())
            tokens.append(int(batch.completion_mask.sum()))
            generate.append(float(batch.metrics["timing/generate"]))

    trainer = L.Trainer(max_steps=cfg["steps"], accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        precision="bf16-mixed" if cfg["precision"] == "bf16" else "32-true", callbacks=[Timer()])
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    return {**_summary([start] + ends, tokens), "median_generate_s": statistics.median(generate[1:] or generate)}


def run_trl(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(cfg["threads"])
    rows = prompt_rows(cfg["steps"] + 2)
    data = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    args = GRPOConfig(
        output_dir=cfg["workdir"], per_device_train_batch_size=8, num_generations=8, max_completion_length=32,
        temperature=1.0, top_p=1.0, top_k=0, beta=cfg["beta"], learning_rate=cfg["lr"], max_steps=cfg["steps"],
        logging_steps=1, report_to=[], save_strategy="no", gradient_checkpointing=False, use_cpu=True,
        bf16=cfg["precision"] == "bf16", seed=cfg["seed"], max_grad_norm=1.0, dataloader_num_workers=0,
        disable_tqdm=True,
    )
    peft_config = LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS, task_type="CAUSAL_LM") if cfg["lora"] else None
    ends: list[float] = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    trainer = GRPOTrainer(model=cfg["model"], reward_funcs=correct_reward, args=args, train_dataset=data,
                          peft_config=peft_config, callbacks=[Timer()])
    tokens: list[int] = []
    original = trainer._generate_and_score_completions

    def counting(*a: Any, **k: Any) -> Any:
        out = original(*a, **k)
        tokens.append(int(out["completion_mask"].sum()))
        return out

    trainer._generate_and_score_completions = counting
    start = time.perf_counter()
    trainer.train()
    return _summary([start] + ends, tokens)


def run_floor(cfg: dict[str, Any]) -> dict[str, Any]:
    """The raw cost: HF generate of the same batch + one forward and backward, no framework."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(cfg["threads"])
    tok = AutoTokenizer.from_pretrained(cfg["model"])
    model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32)
    if cfg["lora"]:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg["precision"] == "bf16")
    gen_s, train_s, tokens = [], [], []
    for i, row in enumerate(prompt_rows(cfg["steps"])):
        text = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        enc = tok([text] * 8, return_tensors="pt")
        torch.manual_seed(i)
        model.eval()
        t0 = time.perf_counter()
        with torch.no_grad(), autocast:
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=32,
                                 pad_token_id=tok.pad_token_id)
        t1 = time.perf_counter()
        model.train()
        with autocast:
            logits = model(input_ids=out, attention_mask=torch.ones_like(out)).logits
        logits.float().log_softmax(-1).mean().backward()
        t2 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        if i:  # the first iteration warms up
            gen_s.append(t1 - t0)
            train_s.append(t2 - t1)
            tokens.append(int((out[:, enc.input_ids.shape[1]:] != tok.pad_token_id).sum()))
    gen, train = statistics.median(gen_s), statistics.median(train_s)
    return {"median_step_s": gen + train, "median_generate_s": gen, "median_fwd_bwd_s": train,
            "tokens_per_s": sum(tokens) / sum(gen_s), "peak_rss_gib": peak_rss_gib()}


def _summary(times: list[float], tokens: list[int]) -> dict[str, Any]:
    steps = [b - a for a, b in zip(times, times[1:])]
    timed = steps[1:] if len(steps) > 1 else steps  # step 1 includes one-off warm-up
    return {
        "median_step_s": statistics.median(timed),
        "step_s": steps,
        "tokens_per_s": sum(tokens[1:]) / sum(timed) if len(tokens) > 1 else None,
        "peak_rss_gib": peak_rss_gib(),
    }


def paired_ratios(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> list[float]:
    """Step-time ratio of each round's two runs (they ran back to back, so share the machine's state).

    The spread of these says how much of a difference is noise, which the ratio of the two sides'
    medians hides.

    Args:
        ours: one side's runs, in round order (each with "median_step_s").
        theirs: the other side's runs, in the same order.
    """
    if len(ours) != len(theirs):
        raise ValueError(f"paired_ratios needs one run per side per round: got {len(ours)} and {len(theirs)}")
    return [a["median_step_s"] / b["median_step_s"] for a, b in zip(ours, theirs)]


def pooled_ratios(paths: list[Path], side: str = "rftlab", other: str = "trl") -> dict[str, dict[str, Any]]:
    """Every round's paired ratio ``side``/``other`` from several result files, per config.

    Args:
        paths: result files written by this script.
        side: the numerator side ("rftlab", "rftlab+copy" or "baseline").
        other: the denominator side ("trl" or "baseline").
    """
    pooled: dict[str, dict[str, Any]] = {}
    for path in paths:
        for name, row in json.loads(Path(path).read_text())["configs"].items():
            if side in row and other in row and "runs" in row[other]:
                pooled.setdefault(name, {"ratios": []})["ratios"] += paired_ratios(row[side]["runs"], row[other]["runs"])
    for entry in pooled.values():
        ratios = sorted(entry["ratios"])
        entry.update(rounds=len(ratios), median=statistics.median(ratios), low=ratios[0], high=ratios[-1])
    return pooled


WORKERS = {"rftlab": run_rftlab, "rftlab+copy": run_rftlab, "trl": run_trl, "floor": run_floor}


# ---- orchestration ---------------------------------------------------------------------------
def spawn(side: str, cfg: dict[str, Any], baseline: Path | None = None) -> dict[str, Any]:
    """Run one measurement in a fresh process; side "baseline" runs rftlab from another checkout.

    Args:
        side: "rftlab", "rftlab+copy", "trl", "floor" or "baseline".
        cfg: the run's settings.
        baseline: the other checkout's root (its own benchmarks/vs_trl.py and rftlab are used).
    """
    python = str(TRL_PYTHON) if side == "trl" else sys.executable
    if side == "rftlab+copy":  # rftlab sampling from a bf16 copy of the weights
        cfg = {**cfg, "sampling_dtype": "bfloat16"}
    root, script, worker = HERE.parent, __file__, side
    if side == "baseline":  # the same measurement with another commit's code (its own worker)
        root, script, worker = baseline, str(baseline / "benchmarks" / "vs_trl.py"), "rftlab"
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg["threads"]), "TOKENIZERS_PARALLELISM": "false",
           "WANDB_MODE": "disabled", "PYTHONPATH": str(root)}
    proc = subprocess.run([python, script, "--worker", worker, "--cfg", json.dumps(cfg)],
                          capture_output=True, text=True, env=env, cwd=root)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{side} worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--configs", default="lora-beta0,lora-beta0.04,full-beta0,full-beta0.04")
    parser.add_argument("--out", default="benchmarks/results/vs_trl.json")
    parser.add_argument("--sampling-copy", action="store_true",
                        help="also run rftlab with forward.sampling_dtype='bfloat16' (a third side, alternated with the others)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="root of another rftlab checkout (e.g. a git worktree of an earlier commit): its rftlab "
                             "runs as one more side, alternated with the others, and rftlab/baseline ratios are reported")
    parser.add_argument("--no-trl", action="store_true",
                        help="skip TRL and the floor (with --baseline: a side-by-side of two rftlab commits only)")
    parser.add_argument("--pool", nargs="+", type=Path,
                        help="only print every round's paired rftlab/TRL ratio pooled from these result files, per config")
    parser.add_argument("--goal", type=float, default=0.25, help="with --pool: count the rounds at or under this ratio")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--cfg", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(WORKERS[args.worker](json.loads(args.cfg))), flush=True)
        return
    if args.pool:
        for name, entry in pooled_ratios(args.pool).items():
            at_or_under = sum(r <= args.goal for r in entry["ratios"])
            print(f"{name:18s} rounds {entry['rounds']:3d}  median {entry['median']:.3f}  range {entry['low']:.3f}-"
                  f"{entry['high']:.3f}  at or under {args.goal}: {at_or_under}")
        return
    if not args.no_trl and not TRL_PYTHON.exists():
        raise SystemExit(f"TRL venv missing at {TRL_PYTHON}: see this file's docstring to create it")
    from rftlab.models.loading import default_model_dir

    model_dir = str(default_model_dir())
    results: dict[str, Any] = {"settings": {**vars(args), "baseline": str(args.baseline)}, "configs": {}}
    if args.baseline is not None:
        results["settings"]["baseline_commit"] = _commit(args.baseline)
    results["settings"]["commit"] = _commit(HERE.parent)
    for name in args.configs.split(","):
        kind, beta = name.split("-beta")
        cfg = {"model": model_dir, "lora": kind == "lora", "beta": float(beta), "steps": args.steps,
               "threads": args.threads, "precision": args.precision, "seed": 0,
               "lr": 2e-4 if kind == "lora" else 1e-5, "workdir": f"/tmp/vs_trl_{name}"}
        sides = ("rftlab",) + (() if args.no_trl else ("trl",)) + (("rftlab+copy",) if args.sampling_copy else ()) \
            + (("baseline",) if args.baseline is not None else ())
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
        for repeat in range(args.repeats):
            for side in sides if repeat % 2 == 0 else sides[::-1]:
                runs[side].append(spawn(side, cfg, args.baseline))
                print(name, side, repeat, f"{runs[side][-1]['median_step_s']:.2f} s/step", flush=True)
        row = {side: {"median_step_s": statistics.median(r["median_step_s"] for r in rs),
                      "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                      "peak_rss_gib": statistics.median(r["peak_rss_gib"] for r in rs), "runs": rs,
                      **({"median_generate_s": statistics.median(r["median_generate_s"] for r in rs)}
                         if "median_generate_s" in rs[0] else {})}
               for side, rs in runs.items()}
        if "baseline" in row:
            row["ratio_rftlab_vs_baseline"] = row["rftlab"]["median_step_s"] / row["baseline"]["median_step_s"]
            # per repeat (the two sides ran next to each other): how much of the difference is noise
            row["ratios_by_repeat"] = paired_ratios(runs["rftlab"], runs["baseline"])
        if args.no_trl:
            results["configs"][name] = row
            print(name, json.dumps({k: v for k, v in row.items() if k.startswith("ratio")}), flush=True)
            continue
        floor = spawn("floor", cfg)
        row["floor"] = floor
        row["ratio_rftlab_vs_trl"] = row["rftlab"]["median_step_s"] / row["trl"]["median_step_s"]
        row["ratios_vs_trl_by_repeat"] = paired_ratios(runs["rftlab"], runs["trl"])
        row["ratio_rftlab_vs_floor"] = row["rftlab"]["median_step_s"] / floor["median_step_s"]
        if "baseline" in row:
            row["ratio_baseline_vs_trl"] = row["baseline"]["median_step_s"] / row["trl"]["median_step_s"]
        if "rftlab+copy" in row:
            row["ratio_rftlab_copy_vs_trl"] = row["rftlab+copy"]["median_step_s"] / row["trl"]["median_step_s"]
            row["ratio_rftlab_copy_vs_floor"] = row["rftlab+copy"]["median_step_s"] / floor["median_step_s"]
        results["configs"][name] = row
        print(json.dumps({k: v for k, v in row.items() if k not in ("rftlab", "trl", "floor", "baseline")}), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    if args.no_trl:
        print(f"{'config':18s} {'rftlab s/step':>14s} {'baseline s/step':>16s} {'ratio':>6s} {'GiB':>6s} {'base GiB':>8s}")
        for name, row in results["configs"].items():
            if "baseline" in row:
                print(f"{name:18s} {row['rftlab']['median_step_s']:14.2f} {row['baseline']['median_step_s']:16.2f} "
                      f"{row['ratio_rftlab_vs_baseline']:6.3f} {row['rftlab']['peak_rss_gib']:6.2f} "
                      f"{row['baseline']['peak_rss_gib']:8.2f}")
        return
    print(f"{'config':18s} {'rftlab s/step':>14s} {'TRL s/step':>11s} {'ratio':>6s} {'floor':>6s} {'x floor':>7s} "
          f"{'rftlab GiB':>10s} {'TRL GiB':>8s}")
    for name, row in results["configs"].items():
        print(f"{name:18s} {row['rftlab']['median_step_s']:14.2f} {row['trl']['median_step_s']:11.2f} "
              f"{row['ratio_rftlab_vs_trl']:6.2f} {row['floor']['median_step_s']:6.2f} {row['ratio_rftlab_vs_floor']:7.2f} "
              f"{row['rftlab']['peak_rss_gib']:10.2f} {row['trl']['peak_rss_gib']:8.2f}")
        if "rftlab+copy" in row:
            copy = row["rftlab+copy"]
            print(f"{name + ' +copy':18s} {copy['median_step_s']:14.2f} {row['trl']['median_step_s']:11.2f} "
                  f"{row['ratio_rftlab_copy_vs_trl']:6.2f} {row['floor']['median_step_s']:6.2f} "
                  f"{row['ratio_rftlab_copy_vs_floor']:7.2f} {copy['peak_rss_gib']:10.2f} {row['trl']['peak_rss_gib']:8.2f}")


def _commit(root: Path) -> str:
    proc = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() or "unknown"


if __name__ == "__main__":
    main()
