"""benchmarks/sampler_speed.py end to end on the tiny model: a worker per engine, rounds alternated."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmark_scripts import BENCHMARKS


def test_rftlab_engines_are_timed_side_by_side(tmp_path):
    out = tmp_path / "speed.json"
    subprocess.run([sys.executable, str(BENCHMARKS / "sampler_speed.py"), "--policy", "tiny", "--engines", "rftlab-lora",
                    "rftlab-copy", "rftlab-static", "--gens", "3", "--lengths", "4", "6", "--repeats", "2", "--out",
                    str(out)], check=True, cwd=Path(BENCHMARKS).parent, timeout=600, capture_output=True)
    report = json.loads(out.read_text())
    assert set(report["summary"]) == {"rftlab-lora", "rftlab-copy", "rftlab-static"}
    for engine, by_length in report["runs"].items():
        for length, rounds in by_length.items():
            # fixed lengths: every round generates gens x length tokens, after one uncounted warm-up
            assert [r["tokens"] for r in rounds] == [3 * int(length)] * 2, (engine, length)
            assert all(r["seconds"] > 0 for r in rounds)
        assert all(v["tokens_per_s"] > 0 and 0 < v["fraction_of_bandwidth_ceiling"] for v in report["summary"][engine].values())
    assert set(report["summary"]["rftlab-static"]) == {"3x4", "3x6"}
