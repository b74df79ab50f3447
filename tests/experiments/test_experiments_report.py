"""Results table, CSV, budget-matched numbers and the figure, on hand-made runs (no training)."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from rftlab.experiments import RunResult, aggregate, markdown_table, plot_comparison, write_results
from rftlab.experiments.report import band, moving_mean

TOK = "rollout/generated_tokens_total"


def make_run(variant, seed, rewards, tokens_per_step=100.0, acc=(0.1, 0.3), kl=None, train_seconds=60.0):
    steps = []
    for i, r in enumerate(rewards, start=1):
        row = {"step": float(i), "train_seconds": 10.0 * i, TOK: tokens_per_step * i, "reward/mean": r, "entropy": 1.0 - 0.1 * i}
        if kl is not None:
            row["kl"] = kl * i
        steps.append(row)
    evals = [{"step": 0.0, TOK: 0.0, "val/accuracy": acc[0]}, {"step": float(len(rewards)), TOK: tokens_per_step * len(rewards), "val/accuracy": acc[1]}]
    return RunResult(variant=variant, seed=seed, algorithm="rftlab.GRPO", steps=steps, evals=evals,
                     train_seconds=train_seconds, generated_tokens=tokens_per_step * len(rewards), peak_memory_mb=500.0 + seed)


RUNS = [
    make_run("grpo", 0, [0.0, 0.2, 0.4, 0.6], acc=(0.1, 0.3), kl=0.01),
    make_run("grpo", 1, [0.0, 0.2, 0.6, 0.8], acc=(0.1, 0.5), kl=0.01),
    # dynamic sampling: twice the tokens per step
    make_run("dapo", 0, [0.5, 0.5, 0.5, 0.5], tokens_per_step=200.0, acc=(0.1, 0.2)),
]


def test_aggregate_is_mean_and_sample_std_over_seeds():
    rows = {r["variant"]: r for r in aggregate(RUNS, window=2)}
    grpo = rows["grpo"]
    # final reward = mean of the last 2 steps: seed 0 -> 0.5, seed 1 -> 0.7
    assert grpo["final_reward_mean"] == pytest.approx(0.6)
    assert grpo["final_reward_std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert grpo["accuracy_mean"] == pytest.approx(0.4) and grpo["accuracy_start_mean"] == pytest.approx(0.1)
    assert grpo["kl_mean"] == pytest.approx(0.035)  # mean of 0.03, 0.04
    assert grpo["tokens_per_second_mean"] == pytest.approx(400 / 60)
    assert grpo["seeds"] == "0 1"
    dapo = rows["dapo"]
    assert math.isnan(dapo["kl_mean"]), "KL never logged -> NaN, not 0"
    assert math.isnan(dapo["final_reward_std"]), "one seed has no std"
    # Budget-matched: every run reached 400 tokens (grpo's total); dapo got there at step 2.
    assert grpo["matched_tokens"] == 400
    assert dapo["reward_at_matched_tokens_mean"] == pytest.approx(0.5)
    assert grpo["reward_at_matched_tokens_mean"] == pytest.approx(0.6)


def test_markdown_table_formats_mean_std_and_missing_values():
    text = markdown_table(aggregate(RUNS, window=2))
    lines = text.splitlines()
    assert lines[0].startswith("| variant | seeds | steps | final reward | reward @ 0.4k tokens |")
    grpo = next(line for line in lines if line.startswith("| grpo |"))
    assert "0.600 ± 0.141" in grpo and "40.0 ± 14.1" in grpo  # reward, accuracy (%)
    dapo = next(line for line in lines if line.startswith("| dapo |"))
    assert "| n/a |" in dapo  # KL
    assert markdown_table([]) == "(no runs)"


def test_write_results_files_and_reload(tmp_path):
    for run in RUNS:
        run.save(tmp_path / "runs" / f"{run.variant}-seed{run.seed}")
    loaded = [RunResult.load(tmp_path / "runs" / f"{r.variant}-seed{r.seed}") for r in RUNS]
    assert loaded[1].steps == RUNS[1].steps and loaded[1].peak_memory_mb == 501.0
    result = write_results(loaded, tmp_path, experiment="unit")
    assert (tmp_path / "results.md").read_text().startswith("# unit\n")
    with (tmp_path / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["grpo", "dapo"]
    with (tmp_path / "runs.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 3
    assert result.figure.read_bytes()[:4] == b"\x89PNG"


def test_moving_mean_and_band():
    np.testing.assert_allclose(moving_mean(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1.0, 2.0, 4.0, 6.0])
    x1, y1 = np.array([0.0, 10.0]), np.array([0.0, 10.0])
    x2, y2 = np.array([0.0, 8.0]), np.array([2.0, 10.0])
    grid, mean, std = band([(x1, y1), (x2, y2)], points=5)
    np.testing.assert_allclose(grid, [0, 2, 4, 6, 8])  # the range both seeds cover
    # seed 1 is y = x, seed 2 is y = x + 2: mean x + 1, sample std sqrt(2)
    np.testing.assert_allclose(mean, [1.0, 3.0, 5.0, 7.0, 9.0])
    np.testing.assert_allclose(std, [math.sqrt(2)] * 5)


def test_figure_is_drawn(tmp_path):
    path = plot_comparison(RUNS, tmp_path / "fig.png", title="unit")
    from matplotlib.image import imread

    image = imread(path)
    assert image.shape[0] >= 800 and image.shape[1] >= 1800
    assert image[..., :3].std() > 0.05, "the figure is not blank"


def test_seed_caption_says_there_is_no_band_for_one_seed():
    from rftlab.experiments.report import seed_caption

    assert seed_caption([3]) == "one seed (3): no band"
    assert seed_caption([0, 1]) == "mean over seeds [0, 1], band = ±1 std"


def _texts(ax):
    return " ".join(t.get_text() for t in ax.texts)


def _y_tick_labels(fig, ax):
    fig.canvas.draw()
    return [t.get_text() for t in ax.get_yticklabels() if t.get_text()]


def test_line_style_differs_beyond_color_and_later_lines_are_thinner():
    from rftlab.experiments.report import line_style

    styles = [line_style(i) for i in range(4)]
    assert len({s["ls"] for s in styles}) == 4, "the first four variants differ in dash pattern, not only color"
    widths = [s["lw"] for s in styles]
    assert widths == sorted(widths, reverse=True) and widths[0] > widths[-1]
    assert all(line_style(i)["lw"] > 0 for i in range(20))


def test_coinciding_maps_a_line_to_the_first_earlier_identical_one():
    from rftlab.experiments.report import coinciding, same_everywhere

    x = np.arange(4.0)
    lines = {"a": (x, x), "b": (x, x + 1), "c": (x, x.copy()), "d": (x, x + 1 + 1e-12), "e": (x[:3], x[:3])}
    assert coinciding(lines) == {"c": "a", "d": "b"}, "a different grid is a different line"
    step_panel = {"a": (x, x), "b": (x, x.copy()), "c": (x, x.copy())}
    eval_panel = {"a": (x, x), "b": (x, x + 1), "c": (x, x.copy())}
    only_c = {"a": (x, x), "c": (x, x.copy())}
    # b differs from a in one panel: not the same everywhere; c is the same wherever it is drawn.
    assert same_everywhere([step_panel, eval_panel, only_c, {}]) == {"c": "a"}


def test_identical_variants_stay_visible_and_are_labelled(tmp_path):
    from matplotlib import pyplot as plt

    from rftlab.experiments.report import draw_comparison

    runs = [make_run("grpo", 0, [0.0, 0.2, 0.4], kl=0.01), make_run("grpo-noop", 0, [0.0, 0.2, 0.4], kl=0.01)]
    fig = draw_comparison(runs)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["grpo", "grpo-noop (same as grpo)"]
    for ax in fig.axes:
        first, second = ax.get_lines()
        np.testing.assert_allclose(first.get_ydata(), second.get_ydata())
        assert first.get_linestyle() != second.get_linestyle(), "the later line must not hide the earlier one"
        assert second.get_linewidth() < first.get_linewidth()
        assert "grpo-noop = grpo" not in _texts(ax), "already said once in the legend"
    plt.close(fig)
    path = plot_comparison(runs, tmp_path / "same.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_lines_that_coincide_in_some_panels_are_noted_there():
    from matplotlib import pyplot as plt

    from rftlab.experiments.report import draw_comparison

    # Same training curves, different held-out accuracy (e.g. a variant that only changes evaluation).
    runs = [make_run("a", 0, [0.0, 0.2, 0.4], kl=0.01, acc=(0.1, 0.3)),
            make_run("b", 0, [0.0, 0.2, 0.4], kl=0.01, acc=(0.1, 0.6))]
    fig = draw_comparison(runs)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["a", "b"]
    reward, accuracy, kl, entropy = fig.axes[:4]
    for ax in (reward, kl, entropy):
        assert "b = a" in _texts(ax)
    assert "b = a" not in _texts(accuracy)
    plt.close(fig)


def test_nearly_flat_panel_has_short_y_tick_labels():
    from matplotlib import pyplot as plt

    from rftlab.experiments.report import draw_comparison

    runs = [make_run("grpo", 0, [0.0, 0.2, 0.4, 0.6], kl=0.01), make_run("grpo", 1, [0.1, 0.2, 0.3, 0.6], kl=0.01)]
    for run in runs:
        for i, row in enumerate(run.steps):
            row["entropy"] = 10.78985 + 0.00002 * i + 0.00001 * run.seed
    fig = draw_comparison(runs)
    for ax in (fig.axes[3], fig.axes[7]):  # entropy vs step, entropy vs tokens
        labels = _y_tick_labels(fig, ax)
        assert labels and all(len(label.partition(".")[2]) <= 4 for label in labels), labels
        lo, hi = ax.get_ylim()
        assert lo <= 10.78985 and hi >= 10.78993, "the data stays inside the axes"
    plt.close(fig)


def test_format_y_axis_widens_only_spans_too_small_to_read():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from rftlab.experiments.report import format_y_axis

    fig = Figure()
    FigureCanvasAgg(fig)
    flat, varied, zero = fig.subplots(1, 3)
    flat.plot([0, 1, 2], [10.78985, 10.78988, 10.78991])
    varied.plot([0, 1, 2], [0.2, 0.5, 0.9])
    zero.plot([0, 1, 2], [0.0, 0.0, 0.0])
    before = varied.get_ylim()
    for ax in (flat, varied, zero):
        format_y_axis(ax)
    lo, hi = flat.get_ylim()
    assert hi - lo >= 0.01 * 10.78991 and lo < 10.78985 and hi > 10.78991
    assert (lo + hi) / 2 == pytest.approx(10.78988)
    assert varied.get_ylim() == before, "a readable span is left alone"
    for ax in (flat, varied, zero):
        labels = _y_tick_labels(fig, ax)
        assert labels and all(len(label.partition(".")[2]) <= 4 for label in labels), labels
