"""benchmarks/gym_signal.py: the share of groups with a learning signal, and a run on the tiny model."""

from __future__ import annotations

import json

import pytest

from benchmark_scripts import load_benchmark

pytest.importorskip("reasoning_gym")


def test_a_group_carries_signal_only_with_a_right_and_a_wrong_answer():
    signal = load_benchmark("gym_signal")
    # groups of 4: all wrong, one right, three right, all right -> two of the four carry signal
    assert signal.informative_share([0, 1, 3, 4], gens=4) == 0.5
    assert signal.informative_share([0, 0], gens=8) == 0.0


def test_the_script_writes_one_row_per_task_and_temperature(tmp_path, capsys):
    signal = load_benchmark("gym_signal")
    out = tmp_path / "signal.json"
    signal.main(["--policy", "tiny", "--threads", "1", "--tasks", "chain_sum,syllogism", "--temperatures", "1.0", "0.5",
                 "--num-prompts", "2", "--gens", "3", "--max-new-tokens", "4", "--out", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert [(r["name"], r["temperature"]) for r in rows] == [("chain_sum", 1.0), ("chain_sum", 0.5),
                                                            ("syllogism", 1.0), ("syllogism", 0.5)]
    for r in rows:
        assert len(r["correct_counts"]) == 2 and all(0 <= c <= 3 for c in r["correct_counts"])
        assert r["sampled_accuracy"] == sum(r["correct_counts"]) / 6
    assert "| `syllogism` |" in capsys.readouterr().out
