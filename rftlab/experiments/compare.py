"""Compare algorithm variants on one task: same prompts in the same order, same seeds, same budget.

    from rftlab.experiments import Budget, Variant, compare
    result = compare(
        [Variant("grpo", "rftlab.GRPO"), Variant("dr-grpo", "rftlab.GRPO", model={"scale": "none"})],
        model={"policy": "default", "lora": True, "lr": 2e-4},
        data={"task": Arithmetic(), "prompts_per_step": 4, "max_new_tokens": 32},
        seeds=[0, 1], budget=Budget(minutes=10), experiment="arithmetic",
    )

Each (variant, seed) run is a normal Lightning fit of the variant's class on a RolloutDataModule.
Every run is seeded the same way (``seed_everything``, the tiny policy's init, the DataModule's
prompt order and per-rollout sampling seeds), so two variants see the same prompts in the same order
and a run repeated with the same seed reproduces its rewards. Runs go one after another in this
process, or in ``processes`` worker processes.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch

from rftlab.callbacks import CompletionTable, PhaseTimer, RolloutHistograms, TrainClock, WandbMetrics, make_wandb_logger
from rftlab.callbacks.checkpointing import AtomicCheckpoints
from rftlab.core.plugins import import_plugins
from rftlab.experiments.evaluation import evaluate
from rftlab.experiments.report import RunResult, aggregate, markdown_table, plot_comparison, write_csv
from rftlab.experiments.tracking import RunRecorder, default_threads
from rftlab.experiments.variants import (
    Budget,
    Variant,
    check_variants,
    config_diff,
    instantiate,
    jsonable,
    merge_options,
)
from rftlab.rollout.datamodule import RolloutDataModule

LOGGERS = ("wandb", "csv", "tensorboard", "none")
PASS_AT_K_KEYS = ("num_samples", "k", "num_prompts", "temperature", "max_new_tokens")


@dataclass
class RunJob:
    """Everything one worker needs to train one (variant, seed) run; picklable for worker processes."""

    experiment: str
    variant: Variant
    seed: int
    model: dict[str, Any]
    data: dict[str, Any]
    budget: Budget
    eval_every: int | None
    trainer: dict[str, Any]
    logger: str
    project: str
    output_dir: str
    threads: int | None
    pass_at_k: dict[str, Any] | None
    dashboards: bool
    diff: dict[str, Any] = field(default_factory=dict)
    imports: list[str] = field(default_factory=list)

    @property
    def run_name(self) -> str:
        return f"{self.variant.name}-seed{self.seed}"

    def model_options(self) -> dict[str, Any]:
        options = merge_options(self.model, self.variant.model)
        policy = options.get("policy", "default")
        # The run's seed also seeds the random initialisation (the "tiny" model, value heads).
        policy = {"model": policy} if isinstance(policy, str) else dataclasses.asdict(policy) if dataclasses.is_dataclass(policy) else dict(policy)
        options["policy"] = {**policy, "seed": self.seed}
        log = options.get("log")
        if not self.dashboards and (log is None or isinstance(log, Mapping)):
            # The module would otherwise add the default sample table and W&B layout itself.
            options["log"] = {"default_callbacks": False, **(log or {})}
        return options

    def data_options(self) -> dict[str, Any]:
        return {**self.data, **self.variant.data, "seed": self.seed}

    def build(self) -> tuple[L.LightningModule, RolloutDataModule]:
        """The run's module and DataModule (constructors validate; no weights are loaded here)."""
        cls = self.variant.algorithm_class()
        try:
            module = cls(**instantiate(self.model_options()))
            datamodule = RolloutDataModule(**instantiate(self.data_options()))
        except (TypeError, ValueError) as err:
            raise type(err)(f"variant {self.variant.name!r} ({self.variant.algorithm_path}): {err}") from err
        return module, datamodule


@dataclass
class Comparison:
    """The outcome of ``compare``: every run, the per-variant table and where the files are.

    Attributes:
        experiment: the experiment name (W&B group).
        runs: one RunResult per (variant, seed), in run order.
        table: per-variant rows (``<metric>_mean`` / ``<metric>_std`` over seeds).
        markdown: the table in Markdown.
        output_dir: folder holding results.md, results.csv, runs.csv, comparison.png, runs/.
    """

    experiment: str
    runs: list[RunResult]
    table: list[dict[str, Any]]
    markdown: str
    output_dir: Path

    @property
    def figure(self) -> Path:
        return self.output_dir / "comparison.png"


def compare(
    variants: Sequence[Variant | Mapping[str, Any]],
    model: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
    seeds: Sequence[int] = (0,),
    budget: Budget | Mapping[str, Any] | int = 20,
    experiment: str = "compare",
    output_dir: str | Path | None = None,
    eval_every: int | None = 10,
    trainer: Mapping[str, Any] | None = None,
    logger: str = "wandb",
    project: str = "rftlab",
    processes: int = 1,
    threads: int | None = None,
    pass_at_k: Mapping[str, Any] | None = None,
    dashboards: bool = True,
    only: Sequence[str] | None = None,
    verbose: bool = True,
    imports: Sequence[str] = (),
) -> Comparison:
    """Train every variant under every seed with the same budget, then write the table and figure.

    Args:
        variants: the arms: ``Variant`` objects or mappings {name, algorithm, model, data}.
        model: algorithm options shared by every variant (policy, lora, lr, option groups, ...); a
            variant's options merge into them group by group.
        data: ``RolloutDataModule`` options shared by every variant; ``task`` is a Task object or a
            {class_path, init_args} spec (so are rewards).
        seeds: one run per variant per seed; the seed is the model's and the DataModule's ``seed``.
        budget: per run: a ``Budget`` (steps / generated tokens / training minutes) or a step count.
        experiment: name of the experiment: W&B group, figure title, default output folder.
        output_dir: where results go (default ``runs/compare/<experiment>``).
        eval_every: optimizer steps between held-out evaluations (None: only at start and end).
        trainer: extra ``lightning.Trainer`` options (precision, accelerator, ...).
        logger: "wandb" (offline unless logged in), "csv", "tensorboard" or "none".
        project: W&B project.
        processes: runs trained at the same time in worker processes (1: one after another here).
        threads: torch threads per run (default: the cores divided by ``processes``).
        pass_at_k: after each run, also evaluate sampled pass@k: {num_samples, k, num_prompts,
            temperature, max_new_tokens} (None skips it; greedy accuracy is always measured), at
            bf16 autocast when the trainer's precision is "bf16-mixed".
        dashboards: add the sample table, histograms and phase timing callbacks to each run.
        only: run only the variants with these names (the others are not even imported).
        verbose: print progress and the final table.
        imports: modules or ``.py`` files holding your registered plug-ins (advantages, losses,
            classes), imported here and in every worker process before a run is built.
    """
    import_plugins(imports)
    if only is not None:
        names = [v.name if isinstance(v, Variant) else dict(v).get("name") for v in variants]
        if any(n not in names for n in only):
            raise ValueError(f"only={list(only)!r} is invalid: each must be one of the variant names {names}")
        variants = [v for v, n in zip(variants, names) if n in only]
    specs = [Variant.from_spec(v) for v in variants]
    check_variants(specs)
    model, data = dict(model or {}), dict(data or {})
    _check_options(specs, model, data, seeds, logger, processes, eval_every, pass_at_k)
    budget = Budget.from_spec(budget)
    out = Path(output_dir) if output_dir is not None else Path("runs") / "compare" / experiment
    jobs = [
        RunJob(experiment=experiment, variant=v, seed=int(s), model=model, data=data, budget=budget,
               eval_every=eval_every, trainer=dict(trainer or {}), logger=logger, project=project,
               output_dir=str(out), threads=threads or default_threads(processes),
               pass_at_k=dict(pass_at_k) if pass_at_k else None, dashboards=dashboards,
               diff=config_diff(v, model, data), imports=list(imports))
        for v in specs for s in seeds
    ]
    for job in jobs:  # every configuration error surfaces now, before hours of training
        job.build()
    if verbose:
        print(f"[rftlab compare] {experiment}: {len(jobs)} runs ({len(specs)} variants x {len(seeds)} seeds), "
              f"budget {budget.describe()} each, {processes} at a time -> {out}", flush=True)
    runs = _run_all(jobs, processes, verbose)
    return write_results(runs, out, experiment, verbose=verbose)


def write_results(runs: Sequence[RunResult], output_dir: str | Path, experiment: str = "compare",
                  window: int = 5, verbose: bool = False) -> Comparison:
    """Write results.md, results.csv, runs.csv and comparison.png for finished runs.

    Args:
        runs: the runs (e.g. ``RunResult.load`` of each ``runs/<name>`` folder to redo a report).
        output_dir: the experiment folder.
        experiment: title of the figure and the Markdown file.
        window: steps averaged for "final" training metrics (reward, KL, entropy).
        verbose: print the table and the paths.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = aggregate(runs, window)
    markdown = markdown_table(table)
    seeds = sorted({r.seed for r in runs})
    notes = (
        f"# {experiment}\n\n{markdown}\n\n"
        f"Mean ± std over seeds {seeds}. Final reward, KL and entropy: mean of the last {window} steps. "
        "Held-out accuracy: greedy, at the first and the last step. Train min: training wall time "
        "(sampling included, evaluation excluded). Generated tokens count every sampled completion "
        "token, including groups dropped by dynamic sampling; gen. tokens/s = generated tokens / train "
        "time. Reward @ k tokens: the training reward when every run had generated as many tokens as "
        "the run that generated fewest (the budget-matched comparison).\n"
    )
    (out / "results.md").write_text(notes)
    write_csv(out / "results.csv", table)
    write_csv(out / "runs.csv", [{**r.summary(window), "run_dir": r.run_dir} for r in runs])
    figure = plot_comparison(runs, out / "comparison.png", title=f"rftlab compare: {experiment}", window=window)
    if verbose:
        print("\n" + markdown + "\n", flush=True)
        print(f"table: {out / 'results.md'}  csv: {out / 'results.csv'}  figure: {figure}", flush=True)
    return Comparison(experiment=experiment, runs=list(runs), table=table, markdown=markdown, output_dir=out)


def _check_options(specs: Sequence[Variant], model: dict, data: dict, seeds: Sequence[int], logger: str,
                   processes: int, eval_every: int | None, pass_at_k: Mapping[str, Any] | None) -> None:
    if logger not in LOGGERS:
        raise ValueError(f"logger={logger!r} is invalid: must be one of {', '.join(LOGGERS)}")
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise ValueError(f"seeds={list(seeds)!r} is invalid: must be a non-empty list of integers")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds={list(seeds)!r} is invalid: seeds must be unique")
    if not isinstance(processes, int) or processes < 1:
        raise ValueError(f"processes={processes!r} is invalid: must be an integer >= 1")
    if eval_every is not None and (not isinstance(eval_every, int) or eval_every < 1):
        raise ValueError(f"eval_every={eval_every!r} is invalid: must be an integer >= 1 or None")
    for where, options in [("model", model), ("data", data)] + [(f"variant {v.name!r} {k}", getattr(v, k)) for v in specs for k in ("model", "data")]:
        policy = options.get("policy") if where.endswith("model") else None
        policy_seed = isinstance(policy, Mapping) and "seed" in policy or getattr(policy, "seed", 0) != 0
        if "seed" in options or policy_seed:
            key = "policy.seed" if policy_seed else "seed"
            raise ValueError(f"{where}: {key!r} is set by compare's seeds={list(seeds)}; remove it from the options")
    if "task" not in data and not any("task" in v.data for v in specs):
        raise ValueError("data: 'task' is required (a Task object or a {class_path, init_args} spec)")
    if pass_at_k is not None:
        unknown = sorted(set(pass_at_k) - set(PASS_AT_K_KEYS))
        if unknown:
            raise ValueError(f"pass_at_k: unknown key(s) {unknown}; allowed keys: {', '.join(PASS_AT_K_KEYS)}")
        if int(pass_at_k.get("num_samples", 0)) < 1:
            raise ValueError(f"pass_at_k num_samples={pass_at_k.get('num_samples')!r} is invalid: must be >= 1")


def _run_all(jobs: Sequence[RunJob], processes: int, verbose: bool) -> list[RunResult]:
    if processes == 1 or len(jobs) == 1:
        return [_run_logged(job, verbose) for job in jobs]
    # "spawn": a fresh interpreter per worker; forking a process that already holds torch threads and
    # a W&B service is unsafe. Jobs (classes, tasks, reward functions) must therefore be importable.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=processes, mp_context=context) as pool:
        futures = [pool.submit(_run_logged, job, verbose) for job in jobs]
        return [f.result() for f in futures]


def _run_logged(job: RunJob, verbose: bool) -> RunResult:
    if verbose:
        print(f"[rftlab compare] start {job.run_name} ({job.variant.algorithm_path})", flush=True)
    result = run_one(job)
    if verbose:
        summary = result.summary()
        print(f"[rftlab compare] done  {job.run_name}: {summary['steps']} steps, {summary['train_minutes']:.1f} train min, "
              f"reward {summary['final_reward']:.3f}, held-out accuracy {100 * summary['accuracy']:.1f}%", flush=True)
    return result


def run_one(job: RunJob) -> RunResult:
    """Train one (variant, seed) run and return what it recorded (also saved under ``runs/<name>``)."""
    start = time.perf_counter()
    import_plugins(job.imports)  # a spawned worker starts without the user's registrations
    if job.threads:
        torch.set_num_threads(job.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    L.seed_everything(job.seed, workers=True, verbose=False)
    module, datamodule = job.build()
    run_dir = Path(job.output_dir) / "runs" / job.run_name
    clock = TrainClock()
    recorder = RunRecorder(clock, job.budget)
    # Checkpointing is off unless the config's trainer options turn it on; any checkpoint written is atomic.
    callbacks: list[L.Callback] = [clock, recorder, AtomicCheckpoints()]
    if job.dashboards:
        callbacks += [WandbMetrics(), CompletionTable(every_n_steps=10), RolloutHistograms(every_n_steps=10), PhaseTimer()]
    logger = _make_logger(job, run_dir)
    trainer = L.Trainer(**_trainer_options(job, callbacks, logger, run_dir))
    try:
        with warnings.catch_warnings():
            # A run stopped by a minutes/tokens budget never finishes an "epoch"; that is expected.
            warnings.filterwarnings("ignore", message=".*(smaller than the logging interval|does not have many workers).*")
            trainer.fit(module, datamodule=datamodule)
            if recorder.last_eval_step != trainer.global_step and trainer.limit_val_batches != 0:
                trainer.validate(module, datamodule=datamodule, verbose=False)
        extra: dict[str, float] = {}
        if job.pass_at_k:
            extra = _closing_evaluation(job, module, datamodule, trainer)
    finally:
        if job.logger == "wandb":
            import wandb

            wandb.finish()  # the next run must get its own W&B run, not reuse this one
    result = RunResult(
        variant=job.variant.name, seed=job.seed, algorithm=job.variant.algorithm_path, steps=recorder.steps,
        evals=recorder.evals, train_seconds=clock.train_seconds, wall_seconds=time.perf_counter() - start,
        generated_tokens=recorder.generated_tokens, peak_memory_mb=recorder.peak_memory_mb,
        extra_evals=extra, diff=job.diff, run_dir=str(run_dir),
    )
    result.save(run_dir)
    return result


def _closing_evaluation(job: RunJob, module: L.LightningModule, datamodule: RolloutDataModule, trainer: L.Trainer) -> dict[str, float]:
    options = dict(job.pass_at_k or {})
    ks = options.pop("k", [1])
    # at the precision the run validated with, so its pass@k and its greedy accuracy are comparable
    precision = "bf16-mixed" if str(trainer.precision) == "bf16-mixed" else "32-true"
    result = evaluate(module, datamodule.task, greedy=False, k=ks if isinstance(ks, Sequence) else [ks],
                      seed=job.seed, precision=precision,
                      max_new_tokens=options.pop("max_new_tokens", datamodule.sampling.max_new_tokens), **options)
    metrics = result.metrics()
    for lg in trainer.loggers:
        lg.log_metrics(metrics, step=trainer.global_step)
    return metrics


def _make_logger(job: RunJob, run_dir: Path) -> Any:
    if job.logger == "none":
        return False
    if job.logger == "wandb":
        config = {
            "experiment": job.experiment, "variant": job.variant.name, "seed": job.seed,
            "algorithm": job.variant.algorithm_path, "budget": jsonable(vars(job.budget)),
            "model_options": jsonable(job.model_options()), "data_options": jsonable(job.data_options()),
            # What this variant changes, as flat keys: W&B's run table can show them side by side.
            "variant_diff": job.diff,
        }
        return make_wandb_logger(project=job.project, save_dir=job.output_dir, name=job.variant.name,
                                 group=job.experiment, job_type=job.variant.name, tags=[f"seed{job.seed}"], config=config)
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    cls = CSVLogger if job.logger == "csv" else TensorBoardLogger
    return cls(save_dir=str(Path(job.output_dir) / job.logger), name=job.variant.name, version=f"seed{job.seed}")


def _trainer_options(job: RunJob, callbacks: list[L.Callback], logger: Any, run_dir: Path) -> dict[str, Any]:
    budget = job.budget
    options: dict[str, Any] = {
        "accelerator": "cpu" if not torch.cuda.is_available() else "auto",
        "devices": 1,
        "max_steps": budget.steps if budget.steps is not None else -1,
        # Minutes/tokens budgets stop the fit through RunRecorder; epochs must never end it first.
        "max_epochs": -1,
        "val_check_interval": job.eval_every or 10**9,
        "check_val_every_n_epoch": None,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(run_dir),
    }
    extra = instantiate(job.trainer)  # YAML may give callbacks/plugins as {class_path, init_args}
    options.update(extra)
    options["callbacks"] = callbacks + list(extra.get("callbacks") or [])
    options["logger"] = logger
    return options
