"""benchmarks/scaling.py: the grid, the least-squares fit, and a tiny run of the script end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark

PATH = Path(__file__).parents[1] / "benchmarks" / "scaling.py"


@pytest.fixture(scope="module")
def scaling():
    return load_benchmark("scaling")


def test_the_default_grid_is_the_issue_grid(scaling):
    args = scaling.parse_args([])
    configs = scaling.configurations(args.groups, args.lengths)
    assert list(configs) == [f"g{g}_t{t}" for g in (4, 8, 16) for t in (32, 64, 128)]
    assert configs["g16_t64"] == {"num_generations": 16, "max_new_tokens": 64}
    assert (args.policy, args.precision, args.steps, args.threads, args.lora) == ("default", "bf16-mixed", 4, 2, True)


def test_linear_fit_on_a_hand_computed_case(scaling):
    # x = 1, 2, 3; y = 2, 4, 5: mean x 2, mean y 11/3, Sxy = 3, Sxx = 2 -> slope 1.5, intercept 11/3 - 3 = 2/3.
    # Predictions 13/6, 22/6, 31/6: SS_res = 1/36 + 4/36 + 1/36 = 1/6; SS_tot = 14/3 -> R^2 = 1 - 1/28.
    fit = scaling.linear_fit([1.0, 2.0, 3.0], [2.0, 4.0, 5.0])
    assert fit["slope"] == pytest.approx(1.5)
    assert fit["intercept"] == pytest.approx(2 / 3)
    assert fit["r2"] == pytest.approx(27 / 28)
    assert fit["n"] == 3


def test_linear_fit_exact_line_and_degenerate_cases(scaling):
    fit = scaling.linear_fit([128.0, 256.0, 512.0], [1.0 + 0.01 * 128, 1.0 + 0.01 * 256, 1.0 + 0.01 * 512])
    assert fit["slope"] == pytest.approx(0.01) and fit["intercept"] == pytest.approx(1.0) and fit["r2"] == pytest.approx(1.0)
    assert scaling.linear_fit([5.0], [1.0])["slope"] is None  # one point: no line
    assert scaling.linear_fit([5.0, 5.0], [1.0, 2.0])["slope"] is None  # all x equal: no slope
    flat = scaling.linear_fit([1.0, 2.0], [3.0, 3.0])
    assert flat["slope"] == 0.0 and flat["r2"] is None  # all y equal: R^2 undefined
    with pytest.raises(ValueError, match="differ in length"):
        scaling.linear_fit([1.0, 2.0], [1.0])


def test_a_failed_configuration_is_reported_not_fitted(scaling):
    ok = {"name": "g4_t32", "num_generations": 4, "max_new_tokens": 32, "tokens_per_step": 128, "median_step_s": 2.0,
          "s_per_token": 2.0 / 128, "phases": {"generate": 1.5}, "peak_rss_mb": 900.0, "train_peak_rss_mb": 950.0}
    results = [ok, {"name": "g16_t128", "error": "timeout after 1800 s"}]
    fit = scaling.fit_results(results)
    assert fit["n"] == 1 and fit["slope"] is None
    table = scaling.markdown(results, fit)
    assert "| g16_t128 | error: timeout after 1800 s |" in table
    assert "| g4_t32 | 4 | 32 | 128 | 2.000 | 15.62 | 1.500 |" in table


def test_tiny_run_writes_the_json_and_the_table(tmp_path):
    out = tmp_path / "scaling"
    proc = subprocess.run([sys.executable, str(PATH), "--policy=tiny", "--steps=2", "--groups=2", "--lengths=3,6",
                           f"--out={out}"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["settings"]["policy"] == "tiny" and data["settings"]["precision"] == "bf16-mixed"
    results = data["results"]
    assert [r["name"] for r in results] == ["g2_t3", "g2_t6"], results
    for r in results:
        assert "error" not in r, r
        assert r["fixed_length"] and r["steps"] == 2
        assert r["tokens"] == [2 * r["max_new_tokens"]] * 2  # EOS ignored: exactly G x max_new_tokens per step
        assert r["tokens_per_step"] == 2 * r["max_new_tokens"]
        assert r["median_step_s"] > 0 and r["median_step_s"] == pytest.approx(r["step_s"][1], abs=1e-4)
        # median_step_s is rounded to 4 decimals and s_per_token to 6, each from the unrounded median
        tolerance = 5e-5 / r["tokens_per_step"] + 5e-7
        assert r["s_per_token"] == pytest.approx(r["median_step_s"] / r["tokens_per_step"], abs=tolerance)
        assert {"generate", "reward", "logprobs", "forward", "backward", "train"} <= set(r["phases"])
        assert r["peak_rss_mb"] + 1 >= r["train_peak_rss_mb"] > 0  # ru_maxrss is the true peak; the sampler sees less
    fit = data["fit"]
    assert fit["n"] == 2
    # Two points: the line passes through both.
    (x1, y1), (x2, y2) = [(r["tokens_per_step"], r["median_step_s"]) for r in results]
    assert fit["slope"] == pytest.approx((y2 - y1) / (x2 - x1))
    assert fit["intercept"] == pytest.approx(y1 - fit["slope"] * x1)
    table = out.with_suffix(".md").read_text()
    assert "| configuration | G | max new tokens | tokens/step | median step (s) |" in table
    assert "Least-squares fit over 2 configurations" in table
