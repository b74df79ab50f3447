"""``rftlab generate``: run a checkpoint (or any policy) on your prompts or a task's held-out split.

    rftlab generate --ckpt runs/demo/checkpoints/last.ckpt --prompts "[Calculate 12 + 30.]"
    rftlab generate --ckpt last.ckpt --task.class_path rftlab.tasks.Arithmetic --num_prompts 8
    rftlab generate --policy exported/ --prompts "[Hi]" --greedy false --num_samples 4 --temperature 0.8

Answers are sampled with rftlab's own sampler (``sample_completions``, the one training uses) from
the policy rebuilt exactly as trained (``load_checkpoint_policy``); task answers are checked with the
task's ``is_correct``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rftlab.models.hf import stop_token_ids
from rftlab.rollout.prompts import Prompt, PromptEncoder
from rftlab.rollout.sampler import SamplingParams, sample_completions


def generate_answers(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    params: SamplingParams,
    num_samples: int = 1,
    batch_size: int = 16,
    max_prompt_length: int = 512,
    seed: int = 0,
) -> list[list[str]]:
    """``num_samples`` answers per prompt (chat messages or plain text), decoded without special tokens.

    Args:
        model: HF causal LM (PEFT-wrapped or not).
        tokenizer: its tokenizer (with a pad token).
        prompts: chat message lists (the chat template is applied) or plain strings (used as is).
        params: sampling parameters (``greedy=True`` for one deterministic answer).
        num_samples: answers per prompt.
        batch_size: prompts per sampling call.
        max_prompt_length: longest prompt in tokens (longer ones keep their end).
        seed: seeds the sampled answers.
    """
    encoder = PromptEncoder(max_prompt_length)
    stops = stop_token_ids(model, tokenizer)
    answers: list[list[str]] = []
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        _, ids, mask = encoder.encode(list(prompts[start : start + batch_size]), tokenizer)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1_000_003 + b)
            completion_ids, completion_mask, _ = sample_completions(
                model, ids, mask, num_samples, params, eos_token_ids=stops, pad_token_id=tokenizer.pad_token_id)
        completion_ids = completion_ids.cpu().masked_fill(completion_mask.cpu() == 0, tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        answers.extend(texts[i : i + num_samples] for i in range(0, len(texts), num_samples))
    return answers


def generate_parser() -> Any:
    """The parser of ``rftlab generate``."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from rftlab.tasks.base import Task

    parser = ArgumentParser(prog="rftlab generate", description="Answers of a checkpoint or a policy to prompts, "
                            "or to a task's held-out split (checked by the task's verifier).", default_meta=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below")
    parser.add_argument("--ckpt", type=str | None, default=None, help="a Lightning .ckpt of any rftlab algorithm")
    parser.add_argument("--policy", type=str, default="default", help="without --ckpt: 'default', 'tiny', a folder or a hub id")
    parser.add_argument("--base", type=str | None, default=None, help="the checkpoint's base model, if it has moved")
    parser.add_argument("--prompts", type=list[str] | None, default=None, help="user messages (chat template applied)")
    parser.add_argument("--raw", type=bool, default=False, help="use --prompts as raw text, without the chat template")
    parser.add_argument("--task", type=Task | None, default=None, help="a task ({class_path, init_args}): answer its held-out rows")
    parser.add_argument("--num_prompts", type=int, default=8, help="held-out rows answered (from the first)")
    parser.add_argument("--greedy", type=bool, default=True, help="greedy decoding (else sampled)")
    parser.add_argument("--num_samples", type=int, default=1, help="answers per prompt when sampling")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="answer budget in tokens")
    parser.add_argument("--batch_size", type=int, default=16, help="prompts per sampling call")
    parser.add_argument("--seed", type=int, default=0, help="seeds the sampled answers")
    parser.add_argument("--threads", type=int | None, default=None, help="torch threads")
    parser.add_argument("--output", type=str | None, default=None, help="also write one JSON line per prompt here")
    return parser


def _load(ckpt: str | None, policy: str, base: str | None) -> tuple[nn.Module, Any]:
    from rftlab.models.export import load_checkpoint_policy
    from rftlab.models.loading import load_causal_lm, load_tokenizer

    if ckpt is not None:
        loaded = load_checkpoint_policy(ckpt, base=base)
        return loaded.model, loaded.tokenizer
    tokenizer = load_tokenizer(policy)
    return load_causal_lm(policy, vocab_size=len(tokenizer)).eval(), tokenizer


def generate_main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Entry point of ``rftlab generate``: prints each prompt's answers; returns them as records."""
    parser = generate_parser()
    init = parser.instantiate_classes(parser.parse_args(argv))
    if (init.prompts is None) == (init.task is None):
        parser.error("give exactly one of --prompts or --task")
    if init.num_samples < 1 or (init.greedy and init.num_samples != 1):
        parser.error(f"--num_samples={init.num_samples} is invalid: must be >= 1, and 1 with --greedy true")
    if init.threads:
        torch.set_num_threads(init.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    model, tokenizer = _load(init.ckpt, init.policy, init.base)
    if init.task is not None:
        rows = list(init.task.test_rows() or [])[: init.num_prompts]
        if not rows:
            parser.error(f"task {getattr(init.task, 'name', init.task)!r} has no held-out rows")
        prompts: list[Prompt] = [r["prompt"] for r in rows]
    else:
        rows = []
        prompts = list(init.prompts) if init.raw else [[{"role": "user", "content": p}] for p in init.prompts]
    params = SamplingParams(max_new_tokens=init.max_new_tokens, temperature=init.temperature, top_p=init.top_p,
                            greedy=init.greedy)
    answers = generate_answers(model, tokenizer, prompts, params, init.num_samples, init.batch_size, seed=init.seed)
    records = []
    for i, (prompt, texts) in enumerate(zip(prompts, answers)):
        record: dict[str, Any] = {"prompt": prompt, "answers": texts}
        if rows:
            record["correct"] = [bool(init.task.is_correct(t, rows[i])) for t in texts]
        records.append(record)
        print(f"--- prompt {i}: {prompt if isinstance(prompt, str) else prompt[-1]['content']}")
        for j, text in enumerate(texts):
            mark = f" [{'correct' if record['correct'][j] else 'wrong'}]" if rows else ""
            print(f"  answer {j}{mark}: {text}")
    if rows:
        flat = [c for r in records for c in r["correct"]]
        print(f"{sum(flat)}/{len(flat)} answers correct")
    if init.output:
        path = Path(init.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, default=str) + "\n" for r in records))
    return records
