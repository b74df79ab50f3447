"""benchmarks/vs_trl.py: the paired per-round ratios (pure arithmetic on result files; no run)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmark_scripts import load_benchmark

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "vs_trl.py"


def runs(*steps: float) -> list[dict]:
    return [{"median_step_s": s} for s in steps]


def test_paired_ratios_divide_each_round_by_its_partner():
    vs_trl = load_benchmark("vs_trl")
    assert vs_trl.paired_ratios(runs(1.0, 1.2, 0.9), runs(4.0, 4.0, 3.0)) == pytest.approx([0.25, 0.3, 0.3])
    with pytest.raises(ValueError, match="one run per side per round"):
        vs_trl.paired_ratios(runs(1.0), runs(4.0, 4.0))


def test_pooled_ratios_gather_rounds_across_files(tmp_path, capsys):
    vs_trl = load_benchmark("vs_trl")
    first = {"configs": {"lora-beta0": {"rftlab": {"runs": runs(1.0, 1.1)}, "trl": {"runs": runs(4.0, 5.0)}},
                         # a --no-trl run: no TRL side, so nothing to pool
                         "full-beta0": {"rftlab": {"runs": runs(2.0)}, "baseline": {"runs": runs(2.0)}}}}
    second = {"configs": {"lora-beta0": {"rftlab": {"runs": runs(1.3)}, "trl": {"runs": runs(5.0)}}}}
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, data in zip(paths, (first, second)):
        path.write_text(json.dumps(data))
    pooled = vs_trl.pooled_ratios(paths)
    assert set(pooled) == {"lora-beta0"}
    entry = pooled["lora-beta0"]
    assert entry["ratios"] == pytest.approx([0.25, 0.22, 0.26])
    assert (entry["rounds"], entry["median"], entry["low"], entry["high"]) == pytest.approx((3, 0.25, 0.22, 0.26))
    out = subprocess.run([sys.executable, str(SCRIPT), "--pool", *map(str, paths)],
                         capture_output=True, text=True, check=True).stdout
    assert "rounds   3" in out and "median 0.250" in out and "at or under 0.25: 2" in out
