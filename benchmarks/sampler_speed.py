"""Sampling speed: rftlab's decode loop vs transformers' generate, same model, same prompts.

Alternates the two backends (A/B) several times in one process and reports the median seconds
per rollout and generated tokens per second (real completion tokens only).

    .venv/bin/python benchmarks/sampler_speed.py --repeats 5 --precision bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from rftlab import GRPO, RolloutDataModule
from rftlab.rollout.sampler import SamplingParams, sample_completions
from rftlab.tasks import Arithmetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--gens", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/sampler_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    module = GRPO(policy="default", lora=True)
    module.configure_model()
    dm = RolloutDataModule(task=Arithmetic(), prompts_per_step=args.prompts, num_generations=args.gens).attach(module)
    tok = module.tokenizer
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()
    results: dict[str, list[dict[str, float]]] = {"hf": [], "rftlab": []}
    for repeat in range(args.repeats + 1):  # the first round warms up both and is not counted
        rows = dm.next_prompt_rows(args.prompts)
        _, ids, mask = dm.encoder.encode([r["prompt"] for r in rows], tok)
        for backend in ("hf", "rftlab") if repeat % 2 == 0 else ("rftlab", "hf"):
            params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0, backend=backend)
            torch.manual_seed(repeat)
            start = time.perf_counter()
            with autocast:
                out_ids, out_mask, truncated = sample_completions(
                    module.policy, ids, mask, args.gens, params, [tok.eos_token_id], tok.pad_token_id
                )
            seconds = time.perf_counter() - start
            if repeat:
                results[backend].append({"seconds": seconds, "tokens": int(out_mask.sum()), "longest": out_ids.shape[1]})
    summary = {}
    for backend, runs in results.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        tokens_per_s = statistics.median(r["tokens"] / r["seconds"] for r in runs)
        summary[backend] = {"median_seconds": round(seconds, 3), "median_tokens_per_s": round(tokens_per_s, 1)}
    summary["speedup_rftlab_vs_hf"] = round(summary["hf"]["median_seconds"] / summary["rftlab"]["median_seconds"], 2)
    summary["settings"] = vars(args)
    print(json.dumps(summary, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"summary": summary, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
