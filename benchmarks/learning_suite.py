"""A learning suite: one fixed recipe on eight reasoning-gym tasks, held-out accuracy before and after.

Each task is a ``rftlab.tasks.ReasoningGym`` config where the untrained SmolLM2-135M-Instruct is
between 2% and 40% greedy accuracy (``benchmarks/gym_baseline.py``). Every task gets the same
recipe, the same seed and the same step budget; nothing is tuned per task.

    .venv/bin/python benchmarks/learning_suite.py --recipe readme --out benchmarks/out/suite/readme
    .venv/bin/python benchmarks/learning_suite.py --report benchmarks/out/suite/readme benchmarks/out/suite/sparse

Two processes can share the suite (``--tasks`` picks some, pin each with ``taskset -c N --threads 1``);
``--report DIR...`` then writes the table (Markdown, JSON) and the figure from their result files.
Per task, ``<out>/<task>.json`` holds the evaluations and per-step reward, entropy and the share of
groups whose completions all scored alike (no learning signal).

``--engine trl`` trains with TRL's GRPOTrainer instead, at the same recipe, from a benchmark-only
venv (``benchmarks/.venv-trl``, as ``vs_trl.py`` sets up, plus ``reasoning-gym==0.1.25 lightning
jsonargparse gguf matplotlib``); rftlab's evaluator scores both sides' held-out accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from rftlab import DAPO, GRPO, RolloutDataModule
from rftlab.callbacks import TrainClock
from rftlab.experiments.tracking import RunRecorder
from rftlab.experiments.variants import Budget
from rftlab.tasks import Curriculum, ReasoningGym

#: (kind, name, options, extract): the suite. Numeric answers are read as the last number written,
#: the others by the "flexible" extraction (the <answer> tag, else a stated answer, else the last line).
SUITE = [
    ("arithmetic", "basic_arithmetic", {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}, "last_number"),
    ("arithmetic", "chain_sum", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}, "last_number"),
    ("arithmetic", "gcd", {"min_numbers": 2, "max_numbers": 2, "min_value": 1, "max_value": 20}, "last_number"),
    ("counting", "aiw", {}, "last_number"),
    ("strings", "letter_jumble", {"min_word_len": 3, "max_word_len": 5, "min_words": 1, "max_words": 2,
                                  "min_corruption_level": 0.1, "max_corruption_level": 0.3}, "flexible"),
    ("logic", "syllogism", {}, "flexible"),
    ("logic", "isomorphic_strings", {"max_string_length": 4}, "flexible"),
    ("sequences", "number_sequence", {}, "last_number"),
]

#: Named recipes: the same for every task. "readme" is the README's GRPO + LoRA settings as they were
#: when the suite was first measured, sampling from the LoRA policy under autocast (the default now
#: samples from the merged bf16 copy: the "copy" recipe). "sparse"
#: adds what is meant for sparse rewards: dynamic sampling (at most 2 generation rounds, so a step
#: costs at most twice the sampling), clip-higher (DAPO's eps_high 0.28) and an entropy floor
#: (Skywork-OR1's adaptive bonus, its coefficient moved by 0.002 a step up to 0.02 while the
#: entropy is below 0.5 nats, scaled from Skywork's 1e-4 steps to a 40-step run). "fast" is readme
#: with a 2.5x learning rate and temperature 0.7: in the readme runs the tasks that learned slowly
#: were still climbing at step 40, and at 0.7 more of the untrained model's groups hold both a right
#: and a wrong answer (``benchmarks/gym_signal.py``). "cool" is readme at temperature 0.7 only.
#: "floor" is readme with an entropy floor that acts before the collapse: the same adaptive bonus,
#: target 0.8 nats, moved by 0.02 a step up to 0.2 (on Arithmetic it kept the entropy at or above
#: 0.18 nats for 40 steps, where a target of 0.3 came too late to hold anything). "wide" is readme
#: with the same 32 completions per step spread as 2 prompts x 16: at the same sampling cost, a group
#: of 16 is more likely than a group of 8 to hold both a right and a wrong answer when few are right.
#: "group16" is readme with 4 prompts x 16 completions: twice the sampling per step, the prompts of
#: readme. "rank64" is readme with a LoRA rank of 64 (alpha 128, the same alpha / rank).
RECIPES: dict[str, dict[str, Any]] = {
    "readme": dict(algo="grpo", lr=2e-4, lora_r=16, prompts=4, gens=8, dynamic_sampling=False),
    "sparse": dict(algo="grpo", lr=2e-4, lora_r=16, prompts=4, gens=8, dynamic_sampling=True, max_gen_batches=2,
                   module=dict(clip=dict(eps_high=0.28),
                               loss=dict(entropy_target=0.5, entropy_coef=0.0, entropy_step=0.002, entropy_max_coef=0.02))),
    "fast": dict(algo="grpo", lr=5e-4, lora_r=16, prompts=4, gens=8, dynamic_sampling=False, temperature=0.7),
    "cool": dict(algo="grpo", lr=2e-4, lora_r=16, prompts=4, gens=8, dynamic_sampling=False, temperature=0.7),
    "floor": dict(algo="grpo", lr=2e-4, lora_r=16, prompts=4, gens=8, dynamic_sampling=False,
                  module=dict(loss=dict(entropy_target=0.8, entropy_coef=0.0, entropy_step=0.02, entropy_max_coef=0.2))),
    "wide": dict(algo="grpo", lr=2e-4, lora_r=16, prompts=2, gens=16, dynamic_sampling=False),
    "group16": dict(algo="grpo", lr=2e-4, lora_r=16, prompts=4, gens=16, dynamic_sampling=False),
    "rank64": dict(algo="grpo", lr=2e-4, lora_r=64, prompts=4, gens=8, dynamic_sampling=False),
    # readme, sampling from the bf16 copy (adapter merged) instead of the LoRA policy under autocast
    "copy": dict(algo="grpo", lr=2e-4, lora_r=16, prompts=4, gens=8, dynamic_sampling=False,
                 module=dict(forward=dict(sampling_dtype="bfloat16"))),
    # copy, with DAPO's soft overlong penalty alone (GRPO's loss and symmetric clip kept): a reply in
    # the last 16 of the 64 new tokens loses up to 1, a truncated one 1 (DAPO, arXiv 2503.14476, eq. 13).
    # In the copy runs the replies of aiw and letter_jumble grew to the 64-token limit, so their last
    # number or line was cut off; a group whose answers are all wrong still ranks them by length.
    "copy_overlong": dict(algo="dapo", lr=2e-4, lora_r=16, prompts=4, gens=8, dynamic_sampling=False,
                          module=dict(forward=dict(sampling_dtype="bfloat16"), loss=dict(agg="seq-mean-token-mean"),
                                      clip=dict(eps_low=0.2, eps_high=0.2), overlong=dict(buffer_len=16))),
    # copy, with dynamic sampling alone (DAPO, arXiv 2503.14476, section 3.2): groups whose 8 rewards
    # are all equal are dropped and more prompts sampled, up to 4 rounds (the DataModule's default), so
    # a step trains on up to 4 groups that hold both a right and a wrong answer. Before training, 6%
    # (letter_jumble) to 38% of the groups at temperature 1 hold both (benchmarks/gym_signal.py).
    "copy_ds": dict(algo="grpo", lr=2e-4, lora_r=16, prompts=4, gens=8, dynamic_sampling=True, max_gen_batches=4,
                    module=dict(forward=dict(sampling_dtype="bfloat16"))),
    # copy, with truncated importance sampling correcting for the copy's rounding
    "copy_tis": dict(algo="grpo", lr=2e-4, lora_r=16, prompts=4, gens=8, dynamic_sampling=False,
                     module=dict(forward=dict(sampling_dtype="bfloat16"), loss=dict(correction=dict(mode="token_truncate")))),
    # copy, with a KL penalty to the reference model (beta 0.04, the k3 estimator: DeepSeekMath's GRPO,
    # arXiv 2402.03300, eq. 3, and TRL's former default). In the copy runs basic_arithmetic peaked at
    # step 20 and fell below its start by step 40 while its replies shrank from 42 to 11 tokens and its
    # entropy from 2.5 to 0.35 nats: the penalty holds the policy near the model that still worked.
    "copy_kl": dict(algo="grpo", lr=2e-4, lora_r=16, prompts=4, gens=8, dynamic_sampling=False, beta=0.04,
                    module=dict(forward=dict(sampling_dtype="bfloat16"))),
    # copy at twice the learning rate: the lever of "fast" without its temperature change (in the copy
    # runs chain_sum and gcd gained most of their points in the first 20 steps, number_sequence in the last 20)
    "copy_lr4": dict(algo="grpo", lr=4e-4, lora_r=16, prompts=4, gens=8, dynamic_sampling=False,
                     module=dict(forward=dict(sampling_dtype="bfloat16"))),
    # copy with 8 prompts a step instead of 4 (twice the sampling and the update): a bigger batch, not
    # more completions per prompt (group16, wide). At 4 prompts and 50-85% flat groups a step learns
    # from one to two groups, so its gradient is mostly noise; twice the learning rate (copy_lr4) was
    # worse, which is what a noise-limited step predicts. DAPO trains on 512 prompts a step.
    "copy_p8": dict(algo="grpo", lr=2e-4, lora_r=16, prompts=8, gens=8, dynamic_sampling=False,
                    module=dict(forward=dict(sampling_dtype="bfloat16"))),
    # copy with a system message that asks for what the answer extraction reads (the final answer at
    # the end of the reply) instead of <answer> tags, which the untrained model never writes: its
    # example tag (<answer>7</answer>) is a number the model may copy, and a reward it never earns
    # is an instruction it cannot learn from.
    "copy_plain": dict(algo="grpo", lr=2e-4, lora_r=16, prompts=4, gens=8, dynamic_sampling=False,
                       system_prompt="You are a careful solver. Be brief. End your reply with the final answer.",
                       module=dict(forward=dict(sampling_dtype="bfloat16"))),
    # copy with two optimisation passes over each rollout (GRPO's inner iterations mu, DeepSeekMath,
    # arXiv 2402.03300, Algorithm 1; PPO's epochs): the same 40 rollouts and sampling, 80 optimizer
    # steps. The second pass starts from the updated policy, so the clipped ratio bounds how far it
    # moves, where twice the learning rate (copy_lr4) moved every token twice as far and was worse.
    "copy_mu2": dict(algo="grpo", lr=2e-4, lora_r=16, prompts=4, gens=8, dynamic_sampling=False, iterations=2,
                     module=dict(forward=dict(sampling_dtype="bfloat16"))),
    # copy as Dr. GRPO (arXiv 2503.20783, section 3.2): advantages centred on the group mean, not
    # divided by its std, and every completion's token losses summed over a constant (the longest
    # completion allowed) instead of averaged over its own length. GRPO's per-reply average lets a long
    # wrong reply lose less per token than a short one; in the copy and copy_mu2 runs the replies of
    # the three tasks that never learn grew to the 64-token limit, where the last number is cut off.
    "copy_dr": dict(algo="grpo", lr=2e-4, lora_r=16, prompts=4, gens=8, dynamic_sampling=False,
                    module=dict(forward=dict(sampling_dtype="bfloat16"), advantage="dr_grpo",
                                loss=dict(agg="seq-mean-token-sum-norm"))),
}

#: The easy stage of the "curriculum" recipe, one per suite task, by one rule rather than tuning:
#: every count range (terms, digits, numbers, words, letters, string length, sequence terms and
#: complexity) at its lowest value, every value range halved; aiw asks about siblings only, with at
#: most 4 people, and syllogism uses "all" statements only (reasoning-gym's curriculum level 0 of each).
EASY: dict[str, dict[str, Any]] = {
    "basic_arithmetic": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
    "chain_sum": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
    "gcd": {"min_numbers": 2, "max_numbers": 2, "min_value": 1, "max_value": 10},
    "aiw": {"task_type_weights": [1.0, 0.0, 0.0], "max_entities": 4},
    "letter_jumble": {"min_word_len": 3, "max_word_len": 3, "min_words": 1, "max_words": 1,
                      "min_corruption_level": 0.1, "max_corruption_level": 0.1},
    "syllogism": {"allow_no": False, "allow_some": False, "allow_some_not": False},
    "isomorphic_strings": {"min_string_length": 2, "max_string_length": 2},
    "number_sequence": {"min_terms": 4, "max_terms": 4, "min_value": -50, "max_value": 50, "max_complexity": 1},
}
# copy, with the first half of the run's prompts from the task's easy configuration (EASY)
RECIPES["curriculum"] = dict(RECIPES["copy"], curriculum=0.5)

# Every recipe but the copy ones samples from the LoRA policy under autocast, as all of them did when
# first measured (the default sampling_dtype="auto" later moved bf16 runs to the merged copy).
for _name, _recipe in RECIPES.items():
    if not _name.startswith("copy") and "curriculum" not in _recipe:
        _recipe.setdefault("module", {}).setdefault("forward", {}).setdefault("sampling_dtype", None)


def make_task(name: str, options: dict[str, Any], extract: str, num_test: int, seed: int,
              system_prompt: str | None = None) -> ReasoningGym:
    """A suite task; ``system_prompt`` None keeps the task's default system message."""
    prompt = {} if system_prompt is None else {"system_prompt": system_prompt}
    return ReasoningGym(name, num_test=num_test, seed=seed, extract=extract, **prompt, **options)


def make_training_task(name: str, options: dict[str, Any], extract: str, recipe: dict[str, Any],
                       args: argparse.Namespace) -> ReasoningGym | Curriculum:
    """The task a recipe trains on: the suite's, or with ``curriculum`` (a share of the run's prompts)
    a two-stage curriculum whose first stage is the task's ``EASY`` configuration."""
    task = make_task(name, options, extract, args.num_test, args.seed, recipe.get("system_prompt"))
    share = recipe.get("curriculum")
    if not share:
        return task
    easy = make_task(name, EASY[name], extract, 0, args.seed, recipe.get("system_prompt"))
    return Curriculum([easy, task], stage_prompts=[max(1, round(share * args.steps * recipe["prompts"]))])


def build_module(recipe: dict[str, Any], policy: str, seed: int) -> GRPO:
    """The recipe's algorithm (GRPO, or DAPO with ``algo="dapo"``) with its module options."""
    common = dict(policy=dict(model=policy, lora_r=recipe["lora_r"], lora_alpha=2 * recipe["lora_r"], seed=seed),
                  lora=True, lr=recipe["lr"], beta=recipe.get("beta", 0.0), **recipe.get("module", {}))
    return DAPO(**common) if recipe["algo"] == "dapo" else GRPO(**common)


def run_task(kind: str, name: str, options: dict[str, Any], extract: str, recipe: dict[str, Any],
             args: argparse.Namespace) -> dict[str, Any]:
    """Train one task with the recipe; held-out greedy accuracy before, midway and after.

    ``args.steps`` counts rollouts: a recipe with ``iterations`` > 1 takes that many optimizer steps on each.
    """
    L.seed_everything(args.seed, workers=True)
    iterations = recipe.get("iterations", 1)
    updates = args.steps * iterations
    model = build_module(recipe, args.policy, args.seed)
    dm = RolloutDataModule(
        task=make_training_task(name, options, extract, recipe, args), prompts_per_step=recipe["prompts"],
        num_generations=recipe["gens"], max_new_tokens=args.max_new_tokens, temperature=recipe.get("temperature", 1.0),
        dynamic_sampling=recipe["dynamic_sampling"], max_gen_batches=recipe.get("max_gen_batches", 4),
        num_iterations=iterations, val_batch_size=args.num_test, seed=args.seed,
    )
    clock = TrainClock()
    rec = RunRecorder(clock, Budget(steps=updates))
    trainer = L.Trainer(max_steps=updates, accelerator="cpu", devices=1, precision=args.precision, logger=False,
                        enable_checkpointing=False, callbacks=[clock, rec], val_check_interval=max(1, updates // 2),
                        check_val_every_n_epoch=None, num_sanity_val_steps=0, enable_progress_bar=False)
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    if not rec.evals or rec.evals[-1]["step"] != trainer.global_step:
        trainer.validate(model, datamodule=dm, verbose=False)
    keep = ("step", "train_seconds", "reward/mean", "entropy", "frac_reward_zero_std", "dynamic_sampling/gen_batches",
            "completions/mean_length", "entropy/coef")
    return {
        "kind": kind, "name": name, "options": options, "extract": extract, "recipe": recipe,
        "majority_share": majority_share(dm.task),
        "steps": trainer.global_step, "rollouts": trainer.global_step // iterations, "train_minutes": round(clock.train_seconds / 60, 2),
        "wall_minutes": round((time.perf_counter() - start) / 60, 2),
        "accuracy_before": rec.evals[0]["val/accuracy"], "accuracy_after": rec.evals[-1]["val/accuracy"],
        "evals": [{k: e[k] for k in ("step", "train_seconds", "val/accuracy")} for e in rec.evals],
        "steps_log": [{k: r[k] for k in keep if k in r} for r in rec.steps],
    }


HERE = Path(__file__).resolve().parent
TRL_PYTHON = HERE / ".venv-trl" / "bin" / "python"


def run_task_trl(kind: str, name: str, options: dict[str, Any], extract: str, recipe: dict[str, Any],
                 args: argparse.Namespace) -> dict[str, Any]:
    """The same task and recipe through TRL's GRPOTrainer (in its own venv, see ``trl_worker``); both
    held-out accuracies are measured here with rftlab's ``evaluate`` (greedy, the same verifier)."""
    import subprocess

    from rftlab.experiments import evaluate

    task = make_task(name, options, extract, args.num_test, args.seed, recipe.get("system_prompt"))

    def accuracy(policy: str) -> float:
        # the same precision as the rftlab side's validation (greedy answers can flip under bf16)
        return evaluate(policy, task, max_new_tokens=args.max_new_tokens, batch_size=50,
                        precision=args.precision).greedy_accuracy

    before = accuracy(args.policy)
    work = Path(args.trl_models) / name  # the trained model is kept, to be evaluated again if need be
    work.mkdir(parents=True, exist_ok=True)
    cfg = {"kind": kind, "name": name, "options": options, "extract": extract, "recipe": recipe, "steps": args.steps,
           "num_test": args.num_test, "seed": args.seed, "max_new_tokens": args.max_new_tokens,
           "policy": str(resolve_policy(args.policy)), "precision": args.precision, "threads": args.threads,
           "workdir": str(work)}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
           "WANDB_MODE": "disabled", "PYTHONPATH": str(HERE.parent)}
    start = time.perf_counter()
    proc = subprocess.run([str(TRL_PYTHON), __file__, "--trl-worker", json.dumps(cfg)], capture_output=True,
                          text=True, env=env, cwd=HERE.parent)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"TRL worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    trained = json.loads(lines[-1][len("RESULT "):])
    wall = time.perf_counter() - start
    after = accuracy(str(work / "model"))
    return {
        "kind": kind, "name": name, "options": options, "extract": extract, "recipe": recipe, "engine": "trl",
        "majority_share": majority_share(task), "steps": trained["steps"],
        "train_minutes": round(trained["train_seconds"] / 60, 2), "wall_minutes": round(wall / 60, 2),
        "accuracy_before": before, "accuracy_after": after,
        "evals": [{"step": 0, "val/accuracy": before}, {"step": trained["steps"], "val/accuracy": after}],
        "steps_log": trained["steps_log"], "trl_version": trained["trl_version"],
    }


def is_plain_grpo(recipe: dict[str, Any]) -> bool:
    """Whether TRL's GRPOTrainer can run ``recipe`` as it is: GRPO, no dynamic sampling, no module options.

    ``sampling_dtype=None`` (sampling from the policy itself) is allowed: TRL samples that way too.
    """
    module = {k: v for k, v in (recipe.get("module") or {}).items() if k != "forward"}
    forward = (recipe.get("module") or {}).get("forward") or {}
    own_sampling = forward == {"sampling_dtype": None} or not forward
    return (recipe["algo"] == "grpo" and not recipe["dynamic_sampling"] and not module and own_sampling
            and not recipe.get("curriculum") and recipe.get("iterations", 1) == 1)


def check_trl_side(recipe: dict[str, Any], name: str) -> None:
    """Refuse, before any work, what the TRL side cannot run: a recipe beyond plain GRPO, or no TRL venv."""
    if not is_plain_grpo(recipe):
        raise SystemExit(f"--engine trl runs plain GRPO recipes only (no dynamic sampling or module options); "
                         f"--recipe {name} is not one: use one of "
                         f"{', '.join(k for k, r in RECIPES.items() if is_plain_grpo(r))}")
    if not TRL_PYTHON.exists():
        raise SystemExit(f"--engine trl needs TRL in its own venv at {TRL_PYTHON}: see benchmarks/vs_trl.py, and add "
                         "reasoning-gym==0.1.25 lightning jsonargparse gguf matplotlib to it")


def resolve_policy(policy: str) -> Path | str:
    """The folder of the named policy ("default": the bundled model's cached safetensors copy)."""
    if policy == "default":
        from rftlab.models.loading import default_model_dir

        return default_model_dir()
    return policy


def trl_worker(cfg: dict[str, Any]) -> None:
    """Train one suite task with TRL's GRPOTrainer at the recipe's settings; save the merged model.

    Matched to rftlab's GRPO defaults where TRL's differ: the original GRPO loss (``loss_type="grpo"``,
    rftlab's ``seq-mean-token-mean``), a constant learning rate, LoRA on all linear layers without
    dropout; 4 prompts x 8 completions per optimizer step, one update per batch (TRL's defaults).
    """
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(cfg["threads"])
    recipe = cfg["recipe"]
    task = make_task(cfg["name"], cfg["options"], cfg["extract"], cfg["num_test"], cfg["seed"], recipe.get("system_prompt"))
    rows = [task.train_rows()[i] for i in range(cfg["steps"] * recipe["prompts"])]
    data = Dataset.from_list([{"prompt": r["prompt"], "row": i} for i, r in enumerate(rows)])
    score = task.reward_functions()["correct"]

    def gym_score(completions: list, row: list, **_: Any) -> list[float]:
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        return score(texts, entry=[rows[i]["entry"] for i in row])

    args = GRPOConfig(
        output_dir=cfg["workdir"], per_device_train_batch_size=recipe["prompts"] * recipe["gens"],
        num_generations=recipe["gens"], max_completion_length=cfg["max_new_tokens"],
        temperature=recipe.get("temperature", 1.0), top_p=1.0, top_k=0, beta=recipe.get("beta", 0.0), learning_rate=recipe["lr"],
        lr_scheduler_type="constant", loss_type="grpo", max_steps=cfg["steps"], logging_steps=1, report_to=[],
        save_strategy="no", gradient_checkpointing=False, use_cpu=True, bf16=cfg["precision"].startswith("bf16"),
        seed=cfg["seed"], max_grad_norm=1.0, dataloader_num_workers=0, disable_tqdm=True,
    )
    lora = LoraConfig(r=recipe["lora_r"], lora_alpha=2 * recipe["lora_r"], lora_dropout=0.0,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    clock = {"train": 0.0}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock["start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            clock["train"] += time.perf_counter() - clock["start"]

    trainer = GRPOTrainer(model=cfg["policy"], reward_funcs=gym_score, args=args, train_dataset=data,
                          peft_config=lora, callbacks=[Clock()])
    trainer.train()
    merged = trainer.model.merge_and_unload()
    merged.save_pretrained(Path(cfg["workdir"]) / "model")
    trainer.processing_class.save_pretrained(Path(cfg["workdir"]) / "model")
    keys = {"reward": "reward/mean", "entropy": "entropy", "frac_reward_zero_std": "frac_reward_zero_std",
            "completions/mean_length": "completions/mean_length"}
    steps_log = [{"step": h["step"], **{ours: h[theirs] for theirs, ours in keys.items() if theirs in h}}
                 for h in trainer.state.log_history if "reward" in h]
    print("RESULT " + json.dumps({"steps": trainer.state.global_step, "train_seconds": clock["train"],
                                  "steps_log": steps_log, "trl_version": trl.__version__}), flush=True)


def majority_share(task: ReasoningGym) -> float:
    """The held-out accuracy of always giving the most common reference answer: what a policy that
    stops reading the question scores (66% on syllogism's Yes/No, for instance)."""
    answers = [row["answer"] for row in task.test_rows()]
    return max(answers.count(a) for a in set(answers)) / len(answers)


def gain(result: dict[str, Any]) -> float:
    """Points gained on the held-out split (rounded to 0.01 so that 29% - 19% counts as 10, not 9.99...)."""
    return round(100 * (result["accuracy_after"] - result["accuracy_before"]), 2)


def report(dirs: list[Path], out: Path) -> str:
    """One Markdown table (a column pair per recipe) and one figure from the result files in ``dirs``."""
    runs = {d.name: {json.loads(p.read_text())["name"]: json.loads(p.read_text()) for p in sorted(d.glob("*.json"))}
            for d in dirs}
    names = [name for _, name, _, _ in SUITE if any(name in r for r in runs.values())]
    for r in runs.values():  # results written before majority_share was recorded
        for v in r.values():
            if "majority_share" not in v:
                v["majority_share"] = majority_share(make_task(v["name"], v["options"], v["extract"],
                                                               v["settings"]["num_test"], v["settings"]["seed"]))
    head = "| task | kind | constant answer | untrained | " + " | ".join(f"{k}: after | {k}: gain" for k in runs) + " |"
    lines = [head, "| " + " | ".join(["---"] * 2 + ["---:"] * (2 + 2 * len(runs))) + " |"]
    for name in names:
        these = [r[name] for r in runs.values() if name in r]
        # runs of another seed (other questions) or another system message score otherwise before training
        constant, before = (" / ".join(dict.fromkeys(f"{100 * v[key]:.0f}%" for v in these))
                            for key in ("majority_share", "accuracy_before"))
        cells = [f"`{name}`", these[0]["kind"], constant, before]
        for r in runs.values():
            if name in r:
                cells += [f"{100 * r[name]['accuracy_after']:.0f}%", f"{gain(r[name]):+.0f}"]
            else:
                cells += ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    common = [n for n in names if all(n in r for r in runs.values())]  # means over the same tasks
    summary = ["", f"| recipe | tasks | gain >= +10 points | of which above the constant answer | "
               f"mean gain on the {len(common)} tasks all recipes ran (points) | mean minutes per task, same tasks |",
               "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for key, r in runs.items():
        gains = [gain(v) for v in r.values()]
        # accuracies are float32 fractions of the prompts: compare them as percentages to 0.01
        real = sum(gain(v) >= 10 and round(100 * v["accuracy_after"], 2) > round(100 * v["majority_share"], 2)
                   for v in r.values())
        mean_gain = sum(gain(r[n]) for n in common) / max(1, len(common))
        minutes = sum(r[n]["wall_minutes"] for n in common) / max(1, len(common))
        summary.append(f"| {key} | {len(r)} | {sum(g >= 10 for g in gains)} | {real} | {mean_gain:+.1f} | {minutes:.1f} |")
    text = "\n".join(lines + summary)
    out.mkdir(parents=True, exist_ok=True)
    (out / "suite.md").write_text(text + "\n")
    (out / "suite.json").write_text(json.dumps(runs, indent=1))
    plot(runs, names, out / "suite.png")
    return text


def plot(runs: dict[str, dict[str, Any]], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, ent) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / (1 + len(runs))
    xs = range(len(names))
    before = [100 * next(r[n] for r in runs.values() if n in r)["accuracy_before"] for n in names]
    bars.bar([x - 0.4 + width / 2 for x in xs], before, width, label="untrained", color="0.7")
    for i, (key, r) in enumerate(runs.items(), start=1):
        after = [100 * r[n]["accuracy_after"] if n in r else 0 for n in names]
        bars.bar([x - 0.4 + width / 2 + i * width for x in xs], after, width, label=f"after: {key}")
    bars.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
    bars.set_ylabel("held-out greedy accuracy (%)")
    bars.set_ylim(0, 100)
    bars.legend(fontsize=8)
    bars.grid(axis="y", alpha=0.3)
    common = [n for n in names if all(n in r for r in runs.values())]  # compare curves on the same tasks
    for key, r in runs.items():  # entropy per step: mean and lowest over the common tasks
        logs = [r[n]["steps_log"] for n in common if r[n]["steps_log"]]
        steps = min((len(s) for s in logs), default=0)
        values = [[s[i].get("entropy", float("nan")) for s in logs] for i in range(steps)]
        line, = ent.plot(range(1, steps + 1), [sum(v) / len(v) for v in values], label=f"{key}: mean")
        ent.plot(range(1, steps + 1), [min(v) for v in values], "--", color=line.get_color(), label=f"{key}: lowest task")
    ent.set_xlabel("step")
    ent.set_ylabel(f"policy entropy (nats/token), {len(common)} tasks")
    ent.set_ylim(bottom=0)
    ent.legend(fontsize=8)
    ent.grid(alpha=0.3)
    fig.suptitle("reasoning-gym learning suite: SmolLM2-135M-Instruct + LoRA, one recipe for every task")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="readme", choices=sorted(RECIPES))
    parser.add_argument("--tasks", default="", help="comma-separated task names of the suite (default: all)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--num-test", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policy", default="default", help='the policy ("default": SmolLM2-135M-Instruct; "tiny" for tests)')
    parser.add_argument("--precision", default="bf16-mixed", help="Lightning precision: bf16-mixed or 32-true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/out/suite")
    parser.add_argument("--engine", default="rftlab", choices=["rftlab", "trl"],
                        help="trl: the same recipe through TRL's GRPOTrainer (benchmarks/.venv-trl, see vs_trl.py)")
    parser.add_argument("--trl-models", default="benchmarks/out/suite/trl-models",
                        help="--engine trl: where the trained (merged) models are kept, one folder per task")
    parser.add_argument("--trl-worker", help=argparse.SUPPRESS)
    parser.add_argument("--report", nargs="+", type=Path, help="only write the table and figure from these result folders")
    parser.add_argument("--report-out", type=Path, default=Path("benchmarks/out/suite/report"))
    args = parser.parse_args(argv)
    if args.trl_worker:
        trl_worker(json.loads(args.trl_worker))
        return
    if args.report:
        print(report(args.report, args.report_out))
        return
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    chosen = set(filter(None, args.tasks.split(",")))
    unknown = chosen - {name for _, name, _, _ in SUITE}
    if unknown:
        raise SystemExit(f"--tasks: {sorted(unknown)} not in the suite ({', '.join(n for _, n, _, _ in SUITE)})")
    recipe = RECIPES[args.recipe]
    if args.engine == "trl":
        check_trl_side(recipe, args.recipe)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for kind, name, options, extract in SUITE:
        if chosen and name not in chosen:
            continue
        run = run_task_trl if args.engine == "trl" else run_task
        result = run(kind, name, options, extract, recipe, args)
        result["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                              if k not in ("report", "report_out")}
        (out / f"{name}.json").write_text(json.dumps(result, indent=1))
        print(f"{name:24s} {100 * result['accuracy_before']:5.1f}% -> {100 * result['accuracy_after']:5.1f}%"
              f"  ({result['wall_minutes']:.1f} min)", flush=True)


def fix_hash_seed() -> None:
    """Run this script again with ``PYTHONHASHSEED=0`` unless it is set so.

    Some reasoning-gym generators (isomorphic_strings) iterate over Python sets, so their rows depend
    on the string hash seed: fixed, every process and run sees the same questions.
    """
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})


if __name__ == "__main__":
    fix_hash_seed()
    main()
