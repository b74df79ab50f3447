"""Which differences between the variants of an ``rftlab compare`` run exceed seed noise.

Reads ``<dir>/runs.csv`` and each run's ``runs/<variant>-seed<s>/steps.csv`` (written by
``rftlab compare``) and prints, for every variant against a reference variant (GRPO by default):

- the held-out greedy accuracy at the end, per seed and its mean;
- the training reward averaged over the last ``--last`` optimizer steps (less noisy than the
  final step's), per seed and its mean;
- the verdict: a difference of the means "exceeds seed noise" when it is larger than the two
  variants' seed half-ranges added together (with 2 seeds, their intervals do not overlap);
  otherwise "within noise". With two seeds this is a coarse screen, not a significance test.

For the pairs named with ``--pair a:b`` (same seeds, one setting changed) it also prints the
per-seed differences and, from ``steps.csv``, the mean of the rollout-correction metrics.

    .venv/bin/python benchmarks/variants_report.py benchmarks/results/compare_variants \\
        --pair grpo-bf16-sampler:grpo-bf16-sampler-tis > benchmarks/results/compare_variants/noise.md
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
from pathlib import Path


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def column_mean(rows: list[dict[str, str]], key: str, last: int | None = None) -> float:
    """Mean of a steps.csv column over its non-empty cells (the last ``last`` of them if given)."""
    values = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    values = values[-last:] if last else values
    return statistics.fmean(values) if values else math.nan


def half_range(values: list[float]) -> float:
    return (max(values) - min(values)) / 2 if len(values) > 1 else math.nan


def verdict(a: list[float], b: list[float]) -> str:
    noise = half_range(a) + half_range(b)
    diff = statistics.fmean(b) - statistics.fmean(a)
    if math.isnan(noise):
        return f"{diff:+.3f} (one seed: no noise estimate)"
    word = "exceeds seed noise" if abs(diff) > noise else "within noise"
    return f"{diff:+.3f} vs noise {noise:.3f}: {word}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="the compare output folder (runs.csv, runs/)")
    parser.add_argument("--reference", default="grpo", help="the variant the others are compared with")
    parser.add_argument("--last", type=int, default=10, help="steps averaged for the training reward")
    parser.add_argument("--pair", action="append", default=[], help="a:b, two variants differing in one setting")
    args = parser.parse_args()

    runs = read_rows(args.folder / "runs.csv")
    variants: dict[str, dict[int, dict[str, float]]] = {}
    for run in runs:
        seed = int(run["seed"])
        steps = read_rows(args.folder / "runs" / f"{run['variant']}-seed{seed}" / "steps.csv")
        variants.setdefault(run["variant"], {})[seed] = {
            "accuracy": float(run["accuracy"]),
            "reward_last": column_mean(steps, "reward/mean", args.last),
            "steps": float(run["steps"]),
            "abs_gap": column_mean(steps, "rollout_correction/abs_gap"),
            "corrected_share": column_mean(steps, "rollout_correction/corrected_share"),
            "weight_mean": column_mean(steps, "rollout_correction/weight_mean"),
        }
    ref = variants[args.reference]
    print(f"Differences from `{args.reference}` (seeds: {', '.join(map(str, sorted(ref)))}; "
          f"noise = the two variants' seed half-ranges added).\n")
    print("| variant | end accuracy per seed | mean | vs reference | "
          f"reward (last {args.last} steps) per seed | mean | vs reference |")
    print("|---|---|---:|---|---|---:|---|")
    for name, seeds in variants.items():
        acc = [seeds[s]["accuracy"] for s in sorted(seeds)]
        rew = [seeds[s]["reward_last"] for s in sorted(seeds)]
        ref_acc = [ref[s]["accuracy"] for s in sorted(ref)]
        ref_rew = [ref[s]["reward_last"] for s in sorted(ref)]
        same = name == args.reference
        print(f"| {name} | {' / '.join(f'{a:.3f}' for a in acc)} | {statistics.fmean(acc):.3f} | "
              f"{'-' if same else verdict(ref_acc, acc)} | {' / '.join(f'{r:.3f}' for r in rew)} | "
              f"{statistics.fmean(rew):.3f} | {'-' if same else verdict(ref_rew, rew)} |")
    for pair in args.pair:
        a, b = pair.split(":")
        print(f"\nPaired `{a}` -> `{b}` (same seed, same prompts):\n")
        print("| seed | end accuracy | reward (last steps) | mean abs gap (nats/token) | corrected share | weight mean |")
        print("|---:|---|---|---|---|---|")
        for seed in sorted(set(variants[a]) & set(variants[b])):
            x, y = variants[a][seed], variants[b][seed]
            print(f"| {seed} | {x['accuracy']:.3f} -> {y['accuracy']:.3f} | "
                  f"{x['reward_last']:.3f} -> {y['reward_last']:.3f} | {x['abs_gap']:.4f} / {y['abs_gap']:.4f} | "
                  f"{x['corrected_share']:.4f} / {y['corrected_share']:.4f} | "
                  f"{x['weight_mean']:.4f} / {y['weight_mean']:.4f} |")


if __name__ == "__main__":
    main()
