"""How much learning signal the untrained model's samples carry, per suite task and temperature.

GRPO learns only from groups whose completions do not all score alike. For each task of
``benchmarks/learning_suite.py`` and each temperature, the bundled model samples ``--gens``
answers to each of the first ``--num-prompts`` held-out prompts; the script reports the mean
sampled accuracy and the share of prompts whose group has at least one right and one wrong answer
(full marks counted as right). That share, before any training, is what a temperature buys.

    taskset -c 0 .venv/bin/python benchmarks/gym_signal.py --threads 1 --out benchmarks/results/gym_signal.json

Prints a Markdown table and writes --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from rftlab import RFTModule
from rftlab.experiments import evaluate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learning_suite import SUITE, fix_hash_seed, make_task  # noqa: E402


def informative_share(counts: list[int], gens: int) -> float:
    """Share of groups with at least one right and one wrong answer out of ``gens``."""
    return sum(0 < c < gens for c in counts) / len(counts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.7, 0.5])
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--gens", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--tasks", default="", help="comma-separated task names (default: the whole suite)")
    parser.add_argument("--policy", default="default", help='the policy ("default": SmolLM2-135M-Instruct; "tiny" for tests)')
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/gym_signal.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    module = RFTModule(policy=args.policy)
    module.configure_model()
    wanted = set(filter(None, args.tasks.split(",")))
    results = []
    for kind, name, options, extract in SUITE:
        if wanted and name not in wanted:
            continue
        task = make_task(name, options, extract, num_test=args.num_prompts, seed=0)
        for temperature in args.temperatures:
            start = time.perf_counter()
            r = evaluate(module, task, greedy=False, num_samples=args.gens, k=[1], temperature=temperature,
                         max_new_tokens=args.max_new_tokens, batch_size=4 * args.gens, seed=0)
            row = {"kind": kind, "name": name, "temperature": temperature,
                   "sampled_accuracy": sum(r.correct_counts) / (args.gens * len(r.correct_counts)),
                   "informative_share": informative_share(r.correct_counts, args.gens),
                   "correct_counts": r.correct_counts, "seconds": round(time.perf_counter() - start, 1)}
            results.append(row)
            print(f"{name:20s} T={temperature:.1f} sampled {100 * row['sampled_accuracy']:5.1f}%  "
                  f"groups with signal {100 * row['informative_share']:5.1f}%  ({row['seconds']:.0f} s)", flush=True)
    temps = args.temperatures
    print("\n| task | " + " | ".join(f"T={t:g}: sampled acc. | T={t:g}: groups with signal" for t in temps) + " |")
    print("| --- | " + " | ".join(["---:"] * 2 * len(temps)) + " |")
    for name in dict.fromkeys(r["name"] for r in results):
        cells = []
        for t in temps:
            r = next(x for x in results if x["name"] == name and x["temperature"] == t)
            cells += [f"{100 * r['sampled_accuracy']:.0f}%", f"{100 * r['informative_share']:.0f}%"]
        print(f"| `{name}` | " + " | ".join(cells) + " |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    fix_hash_seed()  # isomorphic_strings' rows depend on the hash seed
    main()
