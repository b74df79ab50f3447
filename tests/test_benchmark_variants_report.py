"""benchmarks/variants_report.py: the seed-noise screen of a compare run."""

from __future__ import annotations

import csv

from benchmark_scripts import load_benchmark

report = load_benchmark("variants_report")


def test_verdict_hand_computed():
    # means 0.60 and 0.70, half-ranges 0.02 and 0.03: noise 0.05 < difference 0.10
    assert report.verdict([0.58, 0.62], [0.67, 0.73]) == "+0.100 vs noise 0.050: exceeds seed noise"
    # half-ranges 0.05 and 0.06: noise 0.11 > difference 0.10
    assert report.verdict([0.55, 0.65], [0.64, 0.76]) == "+0.100 vs noise 0.110: within noise"
    assert "one seed" in report.verdict([0.5], [0.6])


def test_report_reads_a_compare_folder(tmp_path, capsys, monkeypatch):
    runs = []
    for variant, accuracies, rewards in (("grpo", (0.60, 0.64), (0.5, 0.6)), ("rloo", (0.70, 0.72), (0.9, 1.0))):
        for seed, (accuracy, reward) in enumerate(zip(accuracies, rewards)):
            runs.append({"variant": variant, "seed": seed, "accuracy": accuracy, "steps": 3})
            folder = tmp_path / "runs" / f"{variant}-seed{seed}"
            folder.mkdir(parents=True)
            with open(folder / "steps.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, ["step", "reward/mean", "rollout_correction/abs_gap"])
                writer.writeheader()
                for step in range(3):  # the last 2 steps average to `reward`
                    writer.writerow({"step": step, "reward/mean": 0.0 if step == 0 else reward,
                                     "rollout_correction/abs_gap": 0.01 * (step + 1)})
    with open(tmp_path / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["variant", "seed", "accuracy", "steps"])
        writer.writeheader()
        writer.writerows(runs)
    monkeypatch.setattr("sys.argv", ["variants_report", str(tmp_path), "--last", "2", "--pair", "grpo:rloo"])
    report.main()
    out = capsys.readouterr().out
    # accuracy: +0.09 vs noise 0.02 + 0.01; reward: +0.40 vs noise 0.05 + 0.05
    assert "| rloo | 0.700 / 0.720 | 0.710 | +0.090 vs noise 0.030: exceeds seed noise |" in out
    assert "+0.400 vs noise 0.100: exceeds seed noise" in out
    assert "| 0 | 0.600 -> 0.700 | 0.500 -> 0.900 | 0.0200 / 0.0200 |" in out
