"""Held-out evaluation of a policy on a task's test split: greedy accuracy and sampled pass@k.

Usable alone (``rftlab evaluate``, or ``evaluate(...)`` in Python) and at the end of each run of a
comparison. Answers are generated through the algorithm's own ``generate`` (the same sampler as
training) and verified with the task's ``is_correct``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from rftlab.algorithms.base import RFTModule
from rftlab.models.export import load_lightning_checkpoint
from rftlab.models.hf import evaluation_mode
from rftlab.models.migration import migrate_hparams
from rftlab.rollout.datamodule import RolloutDataModule
from rftlab.rollout.evaluation import score_answers
from rftlab.rollout.sampler import SamplingParams
from rftlab.tasks.base import Task


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: 1 - C(n-c, k) / C(n, k).

    Chen et al. 2021, "Evaluating Large Language Models Trained on Code", arXiv 2107.03374, eq. 1,
    computed as a product to stay exact for large n.

    Args:
        n: samples drawn for the problem (>= k).
        c: how many of them are correct (0 <= c <= n).
        k: attempts allowed (>= 1).
    """
    if not 1 <= k <= n:
        raise ValueError(f"k={k} is invalid: must be in [1, n={n}]")
    if not 0 <= c <= n:
        raise ValueError(f"c={c} is invalid: must be in [0, n={n}]")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


@dataclass
class EvaluationResult:
    """Scores of one policy on held-out prompts.

    Attributes:
        num_prompts: prompts evaluated.
        greedy_accuracy: fraction answered correctly by greedy decoding (None if not run).
        num_samples: sampled answers per prompt (0 if not run).
        pass_at_k: k -> mean unbiased pass@k over prompts, from the sampled answers.
        correct_counts: per prompt, how many sampled answers were correct.
        greedy_answers: per prompt, its question (the last user message), reference answer, greedy
            answer and whether the verifier accepted it: what the score is made of.
        seconds: wall time.
    """

    num_prompts: int
    greedy_accuracy: float | None = None
    num_samples: int = 0
    pass_at_k: dict[int, float] = field(default_factory=dict)
    correct_counts: list[int] = field(default_factory=list)
    greedy_answers: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def metrics(self) -> dict[str, float]:
        """Namespaced metrics: ``eval/greedy/accuracy``, ``eval/sampled/pass@<k>``."""
        out = {}
        if self.greedy_accuracy is not None:
            out["eval/greedy/accuracy"] = self.greedy_accuracy
        for k, value in sorted(self.pass_at_k.items()):
            out[f"eval/sampled/pass@{k}"] = value
        return out

    def __str__(self) -> str:
        parts = [f"{self.num_prompts} prompts"]
        if self.greedy_accuracy is not None:
            parts.append(f"greedy accuracy {100 * self.greedy_accuracy:.1f}%")
        for k, value in sorted(self.pass_at_k.items()):
            parts.append(f"pass@{k} {100 * value:.1f}% (n={self.num_samples}, sampled)")
        return ", ".join(parts)


def evaluate(
    policy: RFTModule | str,
    task: Task,
    num_prompts: int | None = None,
    greedy: bool = True,
    num_samples: int = 0,
    k: Sequence[int] = (1,),
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    batch_size: int = 32,
    max_prompt_length: int = 512,
    seed: int = 0,
    tools: Sequence[Any] | None = None,
    environment: Any = None,
    max_turns: int = 4,
    precision: Literal["32-true", "bf16-mixed"] = "32-true",
) -> EvaluationResult:
    """Greedy accuracy and/or sampled pass@k of ``policy`` on ``task``'s held-out split.

    Args:
        policy: a trained module (any ``RFTModule``), or a policy name/path ("default", "tiny", a folder).
        task: the task; its ``test_rows`` are evaluated, verified by its ``is_correct``.
        num_prompts: evaluate only the first n held-out prompts (default: all).
        greedy: run greedy decoding (one deterministic answer per prompt).
        num_samples: sampled answers per prompt for pass@k (0 skips sampling).
        k: the k values of pass@k (each <= num_samples).
        temperature: sampling temperature (> 0).
        top_p: nucleus sampling mass in (0, 1].
        max_new_tokens: answer budget in tokens.
        batch_size: prompts per generation call.
        max_prompt_length: longest prompt in tokens (longer ones keep their end).
        seed: seeds the sampled answers (the evaluation is reproducible).
        tools: tools the policy may call: answers are then multi-turn episodes (as in training with
            ``RolloutDataModule(tools=...)``), and ``max_new_tokens`` is an episode's budget.
        environment: an environment (or a factory of one per episode) answering the turns.
        max_turns: model turns per episode (with ``tools`` or ``environment``).
        precision: "32-true" (full precision) or "bf16-mixed" (bf16 autocast, as a ``Trainer`` with
            that precision validates): greedy answers can differ between the two by several points.
    """
    ks = sorted(set(int(x) for x in k))
    if precision not in ("32-true", "bf16-mixed"):
        raise ValueError(f"precision={precision!r} is invalid: must be '32-true' or 'bf16-mixed'")
    if num_samples < 0:
        raise ValueError(f"num_samples={num_samples} is invalid: must be >= 0 (0 skips sampling)")
    if not greedy and num_samples == 0:
        raise ValueError("nothing to evaluate: greedy=False and num_samples=0; set greedy=True or num_samples >= 1")
    if num_samples and (not ks or ks[0] < 1 or ks[-1] > num_samples):
        raise ValueError(f"k={list(k)} is invalid: each k must be in [1, num_samples={num_samples}]")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid: must be >= 1")
    if num_prompts is not None and num_prompts < 1:
        raise ValueError(f"num_prompts={num_prompts} is invalid: must be >= 1 or None")
    rows = list(task.test_rows() or [])[:num_prompts]
    if not rows:
        raise ValueError(f"task {getattr(task, 'name', task)!r} has no held-out rows to evaluate")
    module = policy if isinstance(policy, RFTModule) else RFTModule(policy=policy)
    module.configure_model()
    dm = RolloutDataModule(task=task, max_new_tokens=max_new_tokens, max_prompt_length=max_prompt_length,
                           temperature=temperature, top_p=top_p, dynamic_sampling=False, tools=tools,
                           environment=environment, max_turns=max_turns).attach(module)
    start = time.perf_counter()
    result = EvaluationResult(num_prompts=len(rows), num_samples=num_samples)
    # bf16 autocast on the module's device, as Lightning's "bf16-mixed" precision plugin does in validation
    device = next(module.parameters()).device.type
    with evaluation_mode(module), torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        if greedy:
            params = SamplingParams(max_new_tokens=max_new_tokens, greedy=True)
            batches = [score_answers(dm, module, rows[i : i + batch_size], params) for i in range(0, len(rows), batch_size)]
            result.greedy_accuracy = float(torch.cat([b.correct for b in batches]).mean())
            answers = [(a, bool(c)) for b in batches for a, c in zip(b.completions, b.correct.tolist())]
            result.greedy_answers = [{"question": question_of(row), "reference": row.get("answer"), "answer": a,
                                      "correct": c} for row, (a, c) in zip(rows, answers)]
        if num_samples:
            result.correct_counts = _sampled_correct_counts(dm, module, rows, num_samples, batch_size, seed)
            result.pass_at_k = {kk: sum(pass_at_k(num_samples, c, kk) for c in result.correct_counts) / len(rows)
                                for kk in ks}
    result.seconds = time.perf_counter() - start
    return result


def question_of(row: dict[str, Any]) -> str:
    """A held-out row's question: its prompt text, or the last user message of a chat prompt."""
    prompt = row.get("prompt", "")
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    return str(users[-1]) if users else str(prompt)


def _sampled_correct_counts(dm: RolloutDataModule, module: RFTModule, rows: list[dict[str, Any]],
                            num_samples: int, batch_size: int, seed: int) -> list[int]:
    """Per prompt, how many of ``num_samples`` sampled answers the task accepts."""
    counts = []
    # Batches hold whole prompts' groups; fewer prompts per call when many samples each.
    per_call = max(1, batch_size // num_samples)
    for b, i in enumerate(range(0, len(rows), per_call)):
        chunk = rows[i : i + per_call]
        _, ids, mask = dm.encode_prompts(chunk, module.tokenizer)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1_000_003 + b)
            sampled = dm.sample(module, chunk, ids, mask, num_samples, dm.sampling)
        # Per answer, the row's columns (and an episode's turns, messages, env_reward) for the verifier.
        columns = sampled.reward_columns([row for row in chunk for _ in range(num_samples)])
        for j, row in enumerate(chunk):
            answers = range(j * num_samples, (j + 1) * num_samples)
            counts.append(sum(bool(dm.task.is_correct(sampled.texts[a], {**columns[a], "prompt": row["prompt"]}))
                              for a in answers))
    return counts


def load_policy(checkpoint: str | Path, map_location: str = "cpu") -> RFTModule:
    """An ``RFTModule`` holding the policy of a Lightning checkpoint written by any rftlab algorithm.

    The algorithm's own extra modules (critics, heads) are not needed to generate and are skipped;
    the checkpoint must hold every trainable policy weight (full weights or the LoRA adapter).

    Args:
        checkpoint: a ``.ckpt`` file saved by ``Trainer.fit`` (e.g. ModelCheckpoint), or a sharded
            checkpoint folder (``ModelParallelStrategy``).
        map_location: device to load tensors onto.
    """
    path = Path(checkpoint)
    data = load_lightning_checkpoint(path, map_location)  # a .ckpt file or a sharded checkpoint folder
    hparams = migrate_hparams(dict(data.get("hyper_parameters", {})))
    # The policy alone: what generating needs (the algorithm's KL and critic options do not matter).
    module = RFTModule(**{k: v for k, v in hparams.items() if k in ("policy", "lora", "forward")})
    module.configure_model()
    state = data["state_dict"]
    own = module.state_dict()
    policy_state = {k: v for k, v in state.items() if k in own}
    missing = sorted(n for n, p in module.named_parameters() if p.requires_grad and n not in policy_state)
    if missing:
        raise KeyError(f"checkpoint {str(path)!r} lacks trainable policy weights {missing[:5]}")
    module.load_state_dict(policy_state, strict=False)
    return module
