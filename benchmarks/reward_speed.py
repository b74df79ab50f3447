"""Reward speed on this machine: sandboxed code execution, and pure-Python rewards vs a training step.

1. ``--code-runs`` (100) code-execution rewards, each a completion with 3 unit tests run in the
   sandbox (namespaces, unprivileged uid, limits): wall time for the batch. Target: under 10 s.
2. Pure-Python rewards on one GRPO step's batch (``--batch``, default 4 prompts x 8 generations =
   32 completions, as configs/grpo_arithmetic.yaml): median time of ``RewardSet.score`` over
   ``--repeats`` calls, as a share of a training step of ``--step-seconds`` (default 10 s, the low
   end of a real-model GRPO step here, so the share is an upper bound). Target: under 5%.

    .venv/bin/python benchmarks/reward_speed.py                  # writes benchmarks/out/reward_speed.json
    .venv/bin/python benchmarks/reward_speed.py --step-seconds 11.5 --code-runs 200

No model is loaded: it runs in well under a minute and may run beside other work (the figures are
then pessimistic).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

from rftlab.rewards import (
    CodeExecution,
    JsonSchema,
    LengthPenalty,
    MathAnswer,
    NumericAnswer,
    RepetitionPenalty,
    RewardSet,
    TagFormat,
    from_openai_grader,
)
from rftlab.tasks import Countdown, JsonExtraction, Wordle
from rftlab.tasks.json_extraction import SCHEMA

CODE = "```python\ndef add(a, b):\n    return a + b\n```"
TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 5"]


def bench_code(runs: int, workers: int | None) -> dict:
    reward = CodeExecution(timeout=5.0, workers=workers)
    reward([CODE], tests=[TESTS])  # first run: interpreter probe, page cache
    start = time.perf_counter()
    scores = reward([CODE] * runs, tests=[TESTS] * runs)
    seconds = time.perf_counter() - start
    first = reward.last_results[0]
    assert all(abs(s - 2 / 3) < 1e-9 for s in scores), "every run passes 2 of 3 tests"
    return {
        "runs": runs, "seconds": round(seconds, 3), "per_run_ms": round(1000 * seconds / runs, 1),
        "workers": reward.workers, "target_seconds": 10.0, "under_target": seconds < 10.0,
        "network_isolated": first.network_isolated, "filesystem_isolated": first.filesystem_isolated,
        "pid_isolated": first.pid_isolated, "unprivileged_uid": first.uid is not None,
    }


def _completions(n: int, rng: random.Random) -> list[str]:
    # About 32 tokens each, like the real config's max_new_tokens, with the tags and numbers that
    # the rewards look for (so no reward takes an early exit).
    out = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        out.append(f"<think>{a} plus {b} is {a + b}, so the sum is {a + b}.</think>\n<answer>{a} + {b}</answer> "
                   f"Answer: {a + b}. <guess>crane</guess> {{\"name\": \"Ann\", \"age\": {a}, \"city\": \"Oslo\", "
                   f"\"occupation\": \"nurse\"}}")
    return out


def bench_pure_python(batch: int, repeats: int, step_seconds: float) -> dict:
    rng = random.Random(0)
    completions = _completions(batch, rng)
    countdown, wordle, extraction = Countdown(num_test=4), Wordle(num_test=4), JsonExtraction(num_test=4)
    rows = []
    for i in range(batch):
        row = {"answer": str(rng.randint(20, 198))}
        for task in (countdown, wordle):
            row.update({k: v for k, v in task.train_rows()[i].items() if k != "prompt"})
        row["json_answer"] = extraction.train_rows()[i]["answer"]
        rows.append(row)
    suites = {
        "numeric+format (arithmetic)": {"correct": NumericAnswer(), "format": TagFormat()},
        "countdown (safe evaluator + format)": dict(countdown.reward_functions()),
        "wordle (4 rewards)": dict(wordle.reward_functions()),
        "json schema (jsonschema)": {"fields": JsonSchema(SCHEMA, answer_key="json_answer")},
        "shaping (length + repetition)": {"length": LengthPenalty(64), "repetition": RepetitionPenalty()},
        "openai graders (string_check + rouge_l)": {
            "exact": from_openai_grader({"type": "string_check", "input": "{{sample.output_text}}",
                                         "reference": "{{item.answer}}", "operation": "like"}),
            "rouge": from_openai_grader({"type": "text_similarity", "input": "{{sample.output_text}}",
                                         "reference": "{{item.answer}}", "evaluation_metric": "rouge_l"})},
        "math-verify (sympy)": {"math": MathAnswer()},
    }
    results = {}
    for name, functions in suites.items():
        rewards = RewardSet(functions, on_error="zero")
        prompts = ["p"] * batch
        rewards.score(completions, prompts, rows)  # warm caches (regex compilation, sympy imports)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            rewards.score(completions, prompts, rows)
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        results[name] = {"median_ms": round(1000 * median, 2),
                         "share_of_step_percent": round(100 * median / step_seconds, 3),
                         "under_5_percent": median / step_seconds < 0.05}
    return {"batch": batch, "repeats": repeats, "step_seconds": step_seconds, "suites": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--code-runs", type=int, default=100)
    parser.add_argument("--workers", type=int, default=None, help="concurrent sandboxes (default: 2 x cores)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--step-seconds", type=float, default=10.0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "reward_speed.json"))
    args = parser.parse_args()
    report = {"cores": os.cpu_count(), "code_execution": bench_code(args.code_runs, args.workers),
              "pure_python": bench_pure_python(args.batch, args.repeats, args.step_seconds)}
    code = report["code_execution"]
    print(f"code execution: {code['runs']} rewards in {code['seconds']:.2f} s ({code['per_run_ms']} ms each, "
          f"{code['workers']} workers) - target < 10 s: {'PASS' if code['under_target'] else 'FAIL'}")
    print(f"  isolation: network={code['network_isolated']} filesystem={code['filesystem_isolated']} "
          f"pid={code['pid_isolated']} unprivileged uid={code['unprivileged_uid']}")
    print(f"pure-Python rewards, {args.batch} completions vs a {args.step_seconds:.1f} s step:")
    for name, r in report["pure_python"]["suites"].items():
        print(f"  {name:42s} {r['median_ms']:8.2f} ms  {r['share_of_step_percent']:7.3f}% of a step")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
