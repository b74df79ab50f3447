"""Untrained accuracy of the bundled model on reasoning-gym tasks: which configs leave room to learn.

For each candidate task (name and options), greedy answers of SmolLM2-135M-Instruct to the first
--num-test held-out rows of ``rftlab.tasks.ReasoningGym``, scored by the dataset's own verifier.
A learning suite wants tasks where the untrained model is between 2% and 40%.

    .venv/bin/python benchmarks/gym_baseline.py --num-test 50 --out benchmarks/results/gym_baseline.json

Prints a Markdown table and writes --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rftlab import RFTModule
from rftlab.experiments import evaluate
from rftlab.tasks import ReasoningGym

#: (kind, name, options, extract): small configs of different kinds of problem; numeric answers are
#: read as the last number written, the others by the "flexible" extraction.
CANDIDATES = [
    ("arithmetic", "basic_arithmetic", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}, "last_number"),
    ("arithmetic", "basic_arithmetic", {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}, "last_number"),
    ("arithmetic", "chain_sum", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}, "last_number"),
    ("arithmetic", "products", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}, "last_number"),
    ("arithmetic", "gcd", {"min_numbers": 2, "max_numbers": 2, "min_value": 1, "max_value": 20}, "last_number"),
    ("arithmetic", "lcm", {"min_numbers": 2, "max_numbers": 2, "min_value": 1, "max_value": 10}, "last_number"),
    ("counting", "leg_counting", {"min_animals": 1, "max_animals": 2}, "last_number"),
    ("counting", "letter_counting", {"min_words": 1, "max_words": 3}, "last_number"),
    ("counting", "count_bits", {"max_n": 16}, "last_number"),
    ("counting", "aiw", {}, "last_number"),
    ("strings", "spell_backward", {"min_word_len": 3, "max_word_len": 4}, "flexible"),
    ("strings", "word_sequence_reversal", {"min_words": 2, "max_words": 3}, "flexible"),
    ("strings", "letter_jumble", {"min_word_len": 3, "max_word_len": 5, "min_words": 1, "max_words": 2,
                                  "min_corruption_level": 0.1, "max_corruption_level": 0.3}, "flexible"),
    ("strings", "word_sorting", {"min_words": 2, "max_words": 3}, "flexible"),
    ("logic", "syllogism", {}, "flexible"),
    ("logic", "ransom_note", {"max_note_length": 3, "max_magazine_length": 8}, "flexible"),
    ("logic", "isomorphic_strings", {"max_string_length": 4}, "flexible"),
    ("logic", "family_relationships", {"max_family_size": 4}, "flexible"),
    ("sequences", "number_sequence", {}, "last_number"),
    ("sequences", "number_sorting", {"min_numbers": 2, "max_numbers": 3}, "flexible"),
    ("sequences", "calendar_arithmetic", {"tasks": ["weekday_of_date"]}, "flexible"),
    ("sequences", "number_format", {"min_num_candidates": 2, "max_num_candidates": 2}, "last_number"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-test", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/gym_baseline.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    module = RFTModule(policy="default")
    module.configure_model()
    results = []
    for kind, name, options, extract in CANDIDATES:
        start = time.perf_counter()
        try:
            task = ReasoningGym(name, num_test=args.num_test, extract=extract, **options)
        except ValueError as err:  # an option this reasoning-gym version does not take: say so, go on
            results.append({"kind": kind, "name": name, "options": options, "extract": extract, "error": str(err)})
            print(f"{name}: {err}")
            continue
        result = evaluate(module, task, max_new_tokens=args.max_new_tokens, batch_size=50)
        results.append({"kind": kind, "name": name, "options": options, "extract": extract,
                        "accuracy": result.greedy_accuracy,
                        "seconds": round(time.perf_counter() - start, 1)})
        print(f"{kind:10s} {name:20s} {100 * result.greedy_accuracy:5.1f}%  ({time.perf_counter() - start:.0f} s)",
              flush=True)
    print("\n| kind | task | options | extraction | untrained greedy accuracy |\n| --- | --- | --- | --- | ---: |")
    for r in results:
        shown = f"{100 * r['accuracy']:.0f}%" if "accuracy" in r else "refused: " + r["error"][:60]
        print(f"| {r['kind']} | `{r['name']}` | {json.dumps(r['options'])} | {r['extract']} | {shown} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"settings": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
