"""benchmarks/learning_curve.py end to end on the tiny model: one evaluation per step, the files it writes."""

from __future__ import annotations

import csv
import json

from benchmark_scripts import load_benchmark


def test_learning_curve_writes_one_evaluation_per_step(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    out = tmp_path / "curve"
    load_benchmark("learning_curve").main([
        "--policy", "tiny", "--max-steps", "3", "--minutes", "5", "--eval-every", "2", "--num-test", "4",
        "--prompts", "2", "--gens", "2", "--max-new-tokens", "4", "--precision", "32-true", "--threads", "1",
        "--out", str(out),
    ])
    evals = list(csv.DictReader((out / "evals.csv").open()))
    # at the start, at step 2 (eval_every), and once at the end (step 3: the closing evaluation)
    assert [int(float(e["step"])) for e in evals] == [0, 2, 3]
    steps = list(csv.DictReader((out / "steps.csv").open()))
    assert [int(float(s["step"])) for s in steps] == [1, 2, 3] and "reward/mean" in steps[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["generated_tokens"] == float(steps[-1]["rollout/generated_tokens_total"]) > 0
    assert (out / "curve.png").stat().st_size > 0
