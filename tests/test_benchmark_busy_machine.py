"""benchmarks/busy_machine.py: cases parsed, summarized, and run end to end on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from benchmark_scripts import BENCHMARKS, load_benchmark

busy = load_benchmark("busy_machine")


def test_cases_are_parsed_and_an_unknown_competitor_is_refused():
    assert busy.parse_cases("2/default/none,auto/PASSIVE/python") == [
        {"threads": "2", "wait_policy": "default", "competitor": "none"},
        {"threads": "auto", "wait_policy": "PASSIVE", "competitor": "python"}]
    with pytest.raises(ValueError, match="competitor"):
        busy.parse_cases("2/default/java")


def test_summary_takes_medians_over_rounds_and_ratios_to_the_idle_machine():
    runs = [
        {"threads": "2", "wait_policy": "default", "competitor": "none", "median_step_s": 2.0, "threads_per_step": [2, 2]},
        {"threads": "2", "wait_policy": "default", "competitor": "none", "median_step_s": 4.0, "threads_per_step": [2, 2]},
        {"threads": "2", "wait_policy": "default", "competitor": "python", "median_step_s": 9.0, "threads_per_step": [2, 2]},
        {"threads": "auto", "wait_policy": "default", "competitor": "python", "median_step_s": 4.5,
         "threads_per_step": [2, 1, 1]},
        {"threads": "1", "wait_policy": "default", "competitor": "torch", "error": "boom"},
    ]
    rows = {(r["threads"], r["competitor"]): r for r in busy.summarize(runs)}
    assert rows[("2", "none")]["median_step_s"] == 3.0
    assert rows[("2", "python")]["vs_same_idle"] == 3.0
    assert rows[("auto", "python")]["vs_same_idle"] is None  # no idle run of that case
    assert rows[("auto", "python")]["vs_fastest_idle"] == 1.5
    assert rows[("auto", "python")]["threads_used"] == [1]  # the first step is not counted
    assert rows[("1", "torch")]["median_step_s"] is None and "boom" in rows[("1", "torch")]["error"]
    assert "| auto | default | python | 4.50 |" in busy.markdown(list(rows.values()))


def test_runs_beside_a_competitor_on_the_tiny_model(tmp_path):
    subprocess.run([sys.executable, str(BENCHMARKS / "busy_machine.py"), "--policy", "tiny", "--cases",
                    "auto/default/none,1/default/python", "--rounds", "1", "--steps", "3", "--tokens", "4",
                    "--out", str(tmp_path)], check=True, cwd=Path(BENCHMARKS).parent, timeout=600, capture_output=True)
    report = json.loads((tmp_path / "results.json").read_text())
    assert [(r["threads"], r["competitor"]) for r in report["runs"]] == [("auto", "none"), ("1", "python")]
    assert all(len(r["step_s"]) == 3 and r["median_step_s"] > 0 for r in report["runs"])
    assert report["runs"][1]["threads_per_step"] == [1, 1, 1]
    assert (tmp_path / "table.md").read_text().startswith("| threads |")
