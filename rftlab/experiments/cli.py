"""``rftlab compare`` and ``rftlab evaluate``: command-line front ends of ``compare`` and ``evaluate``.

    rftlab compare --config configs/compare_arithmetic.yaml
    rftlab compare --config configs/compare_arithmetic.yaml --seeds [0] --budget.minutes 1 --only [grpo,dapo]
    rftlab evaluate --policy default --task.class_path rftlab.tasks.Arithmetic --num_samples 8 --k [1,8]
    rftlab evaluate --checkpoint runs/demo/checkpoints/last.ckpt

Every option can be set in the YAML given with ``--config`` and overridden on the command line
(jsonargparse, as for ``rftlab fit``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from jsonargparse import ActionConfigFile, ArgumentParser


def compare_parser() -> ArgumentParser:
    """The parser of ``rftlab compare`` (also used by the tests to parse shipped compare configs)."""
    parser = ArgumentParser(prog="rftlab compare", description="Train variants under the same budget and seeds; "
                            "write a Markdown/CSV table and a figure.", default_meta=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below")
    parser.add_argument("--imports", type=list[str], default=[],
                        help="modules or .py files to import first: your registered advantages, losses, classes")
    parser.add_argument("--experiment", type=str, default="compare", help="experiment name (W&B group, output folder)")
    parser.add_argument("--variants", type=list[dict[str, Any]], required=True,
                        help="list of {name, algorithm, model, data}: the algorithm's import path and the options it changes")
    parser.add_argument("--model", type=dict[str, Any], default={}, help="algorithm options shared by every variant")
    parser.add_argument("--data", type=dict[str, Any], default={},
                        help="RolloutDataModule options shared by every variant (task as {class_path, init_args})")
    parser.add_argument("--seeds", type=list[int], default=[0], help="one run per variant per seed")
    parser.add_argument("--budget", type=dict[str, Any], default={"steps": 20},
                        help="per run: {steps, tokens, minutes}; the first limit reached stops the run")
    parser.add_argument("--eval_every", type=int | None, default=10, help="steps between held-out evaluations")
    parser.add_argument("--trainer", type=dict[str, Any], default={}, help="extra lightning.Trainer options")
    parser.add_argument("--logger", type=str, default="wandb", help="wandb, csv, tensorboard or none")
    parser.add_argument("--project", type=str, default="rftlab", help="W&B project")
    parser.add_argument("--output_dir", type=str | None, default=None, help="default runs/compare/<experiment>")
    parser.add_argument("--processes", type=int, default=1, help="runs trained at once in worker processes")
    parser.add_argument("--threads", type=int | None, default=None, help="torch threads per run")
    parser.add_argument("--pass_at_k", type=dict[str, Any] | None, default=None,
                        help="closing sampled evaluation per run: {num_samples, k, num_prompts, temperature, max_new_tokens}")
    parser.add_argument("--dashboards", type=bool, default=True, help="sample tables, histograms and phase timing")
    parser.add_argument("--only", type=list[str] | None, default=None, help="run only these variant names")
    return parser


def compare_main(argv: list[str] | None = None) -> Any:
    """Entry point of ``rftlab compare``."""
    from rftlab.experiments.compare import compare

    cfg = compare_parser().parse_args(argv).as_dict()
    cfg.pop("config", None)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return compare(**cfg)


def evaluate_parser() -> ArgumentParser:
    """The parser of ``rftlab evaluate``."""
    from rftlab.tasks.base import Task

    parser = ArgumentParser(prog="rftlab evaluate", description="Held-out greedy accuracy and sampled pass@k of a "
                            "policy or a training checkpoint.", default_meta=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below")
    parser.add_argument("--policy", type=str, default="default", help="'default', 'tiny', a model folder or a hub id")
    parser.add_argument("--checkpoint", "--ckpt", type=str | None, default=None,
                        help="a Lightning .ckpt of any rftlab algorithm (overrides --policy); --ckpt as in export/generate")
    # Default None, not an Arithmetic instance: jsonargparse carries a default's init args over to a class
    # named with --task.class_path, so Countdown would receive Arithmetic's template.
    parser.add_argument("--task", type=Task | None, default=None,
                        help="the task whose held-out split is evaluated ({class_path, init_args}; default Arithmetic)")
    parser.add_argument("--num_prompts", type=int | None, default=None, help="first n held-out prompts (default: all)")
    parser.add_argument("--greedy", type=bool, default=True, help="greedy accuracy (one answer per prompt)")
    parser.add_argument("--num_samples", type=int, default=0, help="sampled answers per prompt for pass@k (0: none)")
    parser.add_argument("--k", type=list[int], default=[1], help="k values of pass@k")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="answer budget in tokens")
    parser.add_argument("--batch_size", type=int, default=32, help="prompts per generation call")
    parser.add_argument("--seed", type=int, default=0, help="seeds the sampled answers")
    parser.add_argument("--precision", type=Literal["32-true", "bf16-mixed"], default="32-true",
                        help="32-true, or bf16-mixed to answer under bf16 autocast as a bf16-mixed Trainer validates")
    parser.add_argument("--threads", type=int | None, default=None, help="torch threads")
    parser.add_argument("--show", type=int, default=0, help="print the first n greedy answers with their questions and verdicts")
    parser.add_argument("--output", type=str | None, default=None,
                        help="also write the metrics and every greedy answer (question, reference, answer, verdict) to this JSON file")
    return parser


def evaluate_main(argv: list[str] | None = None) -> Any:
    """Entry point of ``rftlab evaluate``: prints the scores and optionally writes them as JSON."""
    import torch

    from rftlab.experiments.evaluation import evaluate, load_policy

    parser = evaluate_parser()
    cfg = parser.parse_args(argv)
    init = parser.instantiate_classes(cfg)
    if init.threads:
        torch.set_num_threads(init.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    policy = load_policy(init.checkpoint) if init.checkpoint else init.policy
    if init.task is None:
        from rftlab.tasks import Arithmetic

        init.task = Arithmetic()
    result = evaluate(
        policy, init.task, num_prompts=init.num_prompts, greedy=init.greedy, num_samples=init.num_samples, k=init.k,
        temperature=init.temperature, top_p=init.top_p, max_new_tokens=init.max_new_tokens,
        batch_size=init.batch_size, seed=init.seed, precision=init.precision,
    )
    source = init.checkpoint or init.policy
    print(f"{source} on {getattr(init.task, 'name', init.task)}: {result}  ({result.seconds:.1f} s)")
    for shown in result.greedy_answers[: max(0, init.show)]:
        verdict = "right" if shown["correct"] else "wrong"
        print(f"\n[{verdict}] {shown['question']!r}\n  reference: {shown['reference']!r}\n  answer: {shown['answer']!r}")
    if init.output:
        path = Path(init.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"source": source, **result.metrics(), "num_prompts": result.num_prompts,
                                    "num_samples": result.num_samples, "greedy_answers": result.greedy_answers},
                                   indent=2, default=str))
    return result
