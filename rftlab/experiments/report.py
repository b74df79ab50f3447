"""Results of a comparison: per-run records, the per-variant table (Markdown + CSV) and the figure.

Numbers are aggregated over seeds as mean +- sample standard deviation; curves are drawn as the
seed mean with a band of +-1 standard deviation.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rftlab.experiments.tracking import GENERATED_TOTAL

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# Metrics drawn against step and against generated tokens: (key, panel title, y label, source).
PANELS = (
    ("reward/mean", "training reward", "mean reward (moving mean of {window} steps)", "steps"),
    ("val/accuracy", "held-out accuracy", "greedy accuracy (%)", "evals"),
    ("kl", "KL to the reference", "KL (masked token mean)", "steps"),
    ("entropy", "policy entropy", "entropy (nats / token)", "steps"),
)


@dataclass
class RunResult:
    """What one (variant, seed) run produced.

    Attributes:
        variant: the variant name.
        seed: the run's seed.
        algorithm: import path of the algorithm class.
        steps: one dict per optimizer step (``step``, ``train_seconds``, ``rollout/generated_tokens_total``,
            and every logged training metric).
        evals: one dict per held-out evaluation (``step``, ``train_seconds``, ``val/accuracy``, ...).
        train_seconds: training wall time, sampling included, evaluation excluded.
        wall_seconds: wall time of the whole run (model loading and evaluation included).
        generated_tokens: completion tokens sampled (dropped dynamic-sampling groups included).
        peak_memory_mb: peak memory of the run (CPU resident set or CUDA allocations), MiB.
        extra_evals: results of the closing ``evaluate`` (pass@k), metric name -> value.
        diff: the options this variant changes relative to the shared ones.
        run_dir: folder with this run's steps.csv, evals.csv and summary.json.
    """

    variant: str
    seed: int
    algorithm: str
    steps: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    wall_seconds: float = 0.0
    generated_tokens: float = 0.0
    peak_memory_mb: float = math.nan
    extra_evals: dict[str, float] = field(default_factory=dict)
    diff: dict[str, Any] = field(default_factory=dict)
    run_dir: str = ""

    def series(self, key: str, source: str = "steps", x: str = "step") -> tuple[np.ndarray, np.ndarray]:
        """(x, y) arrays of ``key`` over this run's steps or evals, where it was logged.

        Args:
            key: the metric, e.g. "reward/mean" or "val/accuracy".
            source: "steps" (per optimizer step) or "evals" (per held-out evaluation).
            x: the x key: "step", "train_seconds" or "rollout/generated_tokens_total".
        """
        rows = self.steps if source == "steps" else self.evals
        points = [(r[x], r[key]) for r in rows if key in r and x in r and _finite(r[key])]
        if not points:
            return np.empty(0), np.empty(0)
        xs, ys = zip(*points)
        return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)

    def last_mean(self, key: str, window: int) -> float:
        """Mean of ``key`` over the last ``window`` steps where it was logged (NaN if never).

        Args:
            key: the metric.
            window: how many of the last logged values to average.
        """
        _, ys = self.series(key)
        return float(ys[-window:].mean()) if len(ys) else math.nan

    def value_at_tokens(self, key: str, tokens: float, window: int) -> float:
        """Mean of ``key`` over the ``window`` steps ending where ``tokens`` generated tokens were reached.

        Args:
            key: the metric.
            tokens: the generated-token budget to read the metric at.
            window: steps averaged, ending at the last step within ``tokens``.
        """
        xs, ys = self.series(key, x=GENERATED_TOTAL)
        if not len(xs):
            return math.nan
        end = int(np.searchsorted(xs, tokens, side="right"))
        end = max(end, 1)
        return float(ys[max(0, end - window) : end].mean())

    def summary(self, window: int = 5) -> dict[str, Any]:
        """The run's row of numbers (what the table aggregates over seeds).

        Args:
            window: steps averaged for the final reward, KL and entropy.
        """
        accuracy = [e["val/accuracy"] for e in self.evals if "val/accuracy" in e]
        start = [e["val/accuracy"] for e in self.evals if e.get("step") == 0 and "val/accuracy" in e]
        out: dict[str, Any] = {
            "variant": self.variant,
            "seed": self.seed,
            "algorithm": self.algorithm,
            "steps": int(self.steps[-1]["step"]) if self.steps else 0,
            "final_reward": self.last_mean("reward/mean", window),
            "accuracy_start": start[0] if start else math.nan,
            "accuracy": accuracy[-1] if accuracy else math.nan,
            "kl": self.last_mean("kl", window),
            "entropy": self.last_mean("entropy", window),
            "train_minutes": self.train_seconds / 60,
            "wall_minutes": self.wall_seconds / 60,
            "generated_tokens": self.generated_tokens,
            "tokens_per_second": self.generated_tokens / self.train_seconds if self.train_seconds > 0 else math.nan,
            "peak_memory_mb": self.peak_memory_mb,
        }
        out.update(self.extra_evals)
        return out

    def save(self, folder: str | Path) -> None:
        """Write steps.csv, evals.csv and summary.json (with every field) to ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_csv(folder / "steps.csv", self.steps)
        write_csv(folder / "evals.csv", self.evals)
        data = {**asdict(self), "summary": self.summary()}
        (folder / "summary.json").write_text(json.dumps(_json_safe(data), indent=1))

    @classmethod
    def load(cls, folder: str | Path) -> "RunResult":
        """Read a run back from its summary.json."""
        data = json.loads((Path(folder) / "summary.json").read_text())
        data.pop("summary", None)
        return cls(**data)


# Columns of the table: (summary key, Markdown header, format of one number, scale).
COLUMNS = (
    ("steps", "steps", "{:.0f}", 1),
    ("final_reward", "final reward", "{:.3f}", 1),
    ("accuracy_start", "held-out acc. start (%)", "{:.1f}", 100),
    ("accuracy", "held-out acc. end (%)", "{:.1f}", 100),
    ("kl", "KL", "{:.4f}", 1),
    ("entropy", "entropy", "{:.3f}", 1),
    ("train_minutes", "train min", "{:.1f}", 1),
    ("generated_tokens", "generated tokens (k)", "{:.1f}", 1e-3),
    ("tokens_per_second", "gen. tokens/s", "{:.0f}", 1),
    ("peak_memory_mb", "peak memory (MiB)", "{:.0f}", 1),
)


def matched_tokens(runs: Sequence[RunResult]) -> float:
    """The token budget every run reached: the smallest total of generated tokens."""
    totals = [r.generated_tokens for r in runs if r.generated_tokens > 0]
    return min(totals) if totals else math.nan


def aggregate(runs: Sequence[RunResult], window: int = 5) -> list[dict[str, Any]]:
    """One row per variant (in first-seen order): ``<key>_mean`` and ``<key>_std`` over seeds.

    Args:
        runs: every (variant, seed) run.
        window: steps averaged for the final reward, KL and entropy.
    """
    tokens = matched_tokens(runs)
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        row = run.summary(window)
        row["reward_at_matched_tokens"] = run.value_at_tokens("reward/mean", tokens, window)
        by_variant.setdefault(run.variant, []).append(row)
    table = []
    for variant, rows in by_variant.items():
        out: dict[str, Any] = {"variant": variant, "algorithm": rows[0]["algorithm"],
                               "seeds": " ".join(str(r["seed"]) for r in rows), "matched_tokens": tokens}
        keys = [k for k in rows[0] if k not in ("variant", "seed", "algorithm")]
        for key in keys:
            values = np.array([float(r.get(key, math.nan)) for r in rows])
            finite = values[np.isfinite(values)]
            out[f"{key}_mean"] = float(finite.mean()) if len(finite) else math.nan
            out[f"{key}_std"] = float(finite.std(ddof=1)) if len(finite) > 1 else math.nan
        table.append(out)
    return table


def _cell(mean: float, std: float, fmt: str, scale: float) -> str:
    if not _finite(mean):
        return "n/a"
    text = fmt.format(mean * scale)
    return f"{text} ± {fmt.format(std * scale)}" if _finite(std) else text


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The per-variant table in Markdown (mean ± std over seeds; n/a where a metric was not logged).

    Args:
        rows: the output of ``aggregate``.
    """
    if not rows:
        return "(no runs)"
    extra = sorted({k[: -len("_mean")] for r in rows for k in r if k.startswith(("eval/",)) and k.endswith("_mean")})
    columns = list(COLUMNS) + [(k, k, "{:.1f}", 100) for k in extra]
    tokens = rows[0].get("matched_tokens", math.nan)
    if _finite(tokens):
        columns.insert(2, ("reward_at_matched_tokens", f"reward @ {tokens / 1000:.1f}k tokens", "{:.3f}", 1))
    header = ["variant", "seeds"] + [c[1] for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * len(columns)) + "|"]
    for row in rows:
        cells = [row["variant"], row["seeds"]]
        cells += [_cell(row.get(f"{key}_mean", math.nan), row.get(f"{key}_std", math.nan), fmt, scale)
                  for key, _, fmt, scale in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Rows of dicts to CSV; the columns are the union of keys, ``step``-like keys first.

    Args:
        path: the CSV file to write.
        rows: one dict per row.
    """
    path = Path(path)
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    first = [k for k in ("variant", "algorithm", "seeds", "seed", "step", "train_seconds", GENERATED_TOTAL) if k in keys]
    keys = first + sorted(k for k in keys if k not in first)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


# ---- the figure --------------------------------------------------------------------------------
def moving_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving mean (the first points average what exists so far).

    Args:
        values: (n,) series.
        window: points averaged (<= 1 returns ``values``).
    """
    if window <= 1 or len(values) == 0:
        return values
    csum = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(0, idx - window)
    return (csum[idx] - csum[lo]) / (idx - lo)


def band(curves: Sequence[tuple[np.ndarray, np.ndarray]], points: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and std over seeds on a common x grid (the range every seed covers), by linear interpolation.

    Args:
        curves: one (x, y) pair per seed, x increasing.
        points: grid size.
    """
    curves = [(x, y) for x, y in curves if len(x)]
    if not curves:
        return np.empty(0), np.empty(0), np.empty(0)
    if len(curves) == 1:
        x, y = curves[0]
        return x, y, np.zeros_like(y)
    lo = max(float(x[0]) for x, _ in curves)
    hi = min(float(x[-1]) for x, _ in curves)
    if hi <= lo:  # no overlap: fall back to the first seed rather than drawing nothing
        x, y = curves[0]
        return x, y, np.zeros_like(y)
    grid = np.linspace(lo, hi, points)
    stacked = np.stack([np.interp(grid, x, y) for x, y in curves])
    return grid, stacked.mean(0), stacked.std(0, ddof=1)


def seed_caption(seeds: Sequence[int]) -> str:
    """What the curves and bands of the comparison figure are, for these seeds.

    Args:
        seeds: the sorted seeds of the runs drawn.
    """
    if len(seeds) == 1:
        return f"one seed ({seeds[0]}): no band"
    return f"mean over seeds {list(seeds)}, band = ±1 std"


# Dash patterns cycled over variants, so that lines stay apart when colors are close or lines coincide.
LINE_STYLES = ("-", "--", "-.", ":")


def line_style(index: int) -> dict[str, Any]:
    """Dash pattern and width of the ``index``-th variant's line.

    Later variants are drawn on top, so they get thinner lines and another dash pattern: a line
    lying exactly on an earlier one leaves the earlier one showing around and between its dashes.

    Args:
        index: the variant's position in drawing order.
    """
    return {"ls": LINE_STYLES[index % len(LINE_STYLES)], "lw": max(1.0, 3.0 - 0.5 * index)}


def coinciding(lines: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, str]:
    """Variants whose line is the same as an earlier variant's (same x grid, ``np.allclose`` y),
    each mapped to the first such earlier variant.

    Args:
        lines: variant -> (x, y) of its line in one panel, in drawing order.
    """
    same: dict[str, str] = {}
    names = list(lines)
    for i, name in enumerate(names):
        x, y = lines[name]
        for other in names[:i]:
            ox, oy = lines[other]
            if x.shape == ox.shape and np.allclose(x, ox) and np.allclose(y, oy):
                same[name] = other
                break
    return same


def same_everywhere(panels: Sequence[dict[str, tuple[np.ndarray, np.ndarray]]]) -> dict[str, str]:
    """Variants whose line is the same as one earlier variant's in every panel that draws them.

    Args:
        panels: per panel, variant -> (x, y) of its line, in drawing order.
    """
    matches: dict[str, set[str | None]] = {}
    for lines in panels:
        same = coinciding(lines)
        for name in lines:
            matches.setdefault(name, set()).add(same.get(name))
    return {name: other for name, m in matches.items() if len(m) == 1 for other in m if other is not None}


def format_y_axis(ax: Axes, min_relative_span: float = 0.01) -> None:
    """Make the y tick labels readable: no offset, and a nearly flat panel widened around its data.

    Without widening, a panel whose values differ only in the 5th significant digit (entropy
    10.78985 .. 10.78991) gets ticks like "10.78988"; spreading such noise over the full height
    also makes a flat curve look like it moves.

    Args:
        ax: the panel, with everything drawn.
        min_relative_span: smallest y span shown, as a fraction of the largest |y limit|.
    """
    ax.ticklabel_format(axis="y", useOffset=False)  # no "+1.078e1" offsets: read values directly
    lo, hi = ax.get_ylim()
    span = min_relative_span * max(abs(lo), abs(hi))
    if hi - lo < span:
        middle = (lo + hi) / 2
        ax.set_ylim(middle - span / 2, middle + span / 2)


def _panel_lines(runs: Sequence[RunResult], variants: Sequence[str], key: str, source: str, x_key: str,
                 x_scale: float, window: int) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Variant -> (x, seed mean, seed std) of one panel; variants that never logged ``key`` are left out.

    Args:
        runs: every (variant, seed) run.
        variants: the variants, in drawing order.
        key: the metric drawn.
        source: "steps" or "evals".
        x_key: the x key of ``RunResult.series``.
        x_scale: factor applied to x.
        window: moving-mean window of the reward curves.
    """
    out = {}
    for variant in variants:
        curves = []
        for run in (r for r in runs if r.variant == variant):
            xs, ys = run.series(key, source, x=x_key)
            if key == "reward/mean":
                ys = moving_mean(ys, window)
            curves.append((xs * x_scale, ys * (100 if key == "val/accuracy" else 1)))
        grid, mean, std = band(curves)
        if len(grid):
            out[variant] = (grid, mean, std)
    return out


def draw_comparison(runs: Sequence[RunResult], title: str = "", window: int = 5) -> Figure:
    """The comparison figure: reward, held-out accuracy, KL and entropy, one line per variant
    (mean over seeds, band +-1 std); top row against optimizer steps, bottom row against generated
    tokens (the budget-matched view: variants that sample more pay for it on the x axis).

    A variant whose line is the same as an earlier one's in every panel says so in the legend;
    where lines coincide in some panels only, those panels say so.

    Args:
        runs: every (variant, seed) run.
        title: first line of the figure title.
        window: moving-mean window of the reward curves.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    variants = list(dict.fromkeys(r.variant for r in runs))
    colors = plt.get_cmap("tab10")
    rows = (("step", "optimizer step", 1.0), (GENERATED_TOTAL, "generated tokens (thousands)", 1e-3))
    panels = {(row, col): _panel_lines(runs, variants, key, source, x_key, x_scale, window)
              for row, (x_key, _, x_scale) in enumerate(rows) for col, (key, _, _, source) in enumerate(PANELS)}
    everywhere = same_everywhere([{v: (x, y) for v, (x, y, _) in lines.items()} for lines in panels.values()])
    labels = {v: f"{v} (same as {everywhere[v]})" if v in everywhere else v for v in variants}
    fig, axes = plt.subplots(2, len(PANELS), figsize=(5.2 * len(PANELS), 9), squeeze=False)
    for (row, col), lines in panels.items():
        key, panel_title, y_label, source = PANELS[col]
        ax = axes[row][col]
        for i, variant in enumerate(variants):
            if variant not in lines:
                continue
            grid, mean, std = lines[variant]
            color = colors(i % 10)
            marker = "o" if source == "evals" and len(grid) < 30 else None
            ax.plot(grid, mean, color=color, marker=marker, ms=4, label=labels[variant], **line_style(i))
            ax.fill_between(grid, mean - std, mean + std, color=color, alpha=0.18, lw=0)
        ax.set_title(f"{panel_title} vs {'step' if row == 0 else 'generated tokens'}", fontsize=12)
        ax.set_xlabel(rows[row][1], fontsize=11)
        ax.set_ylabel(y_label.format(window=window), fontsize=11)
        ax.grid(alpha=0.3)
        if row == 0:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if lines:
            format_y_axis(ax)
        if key == "val/accuracy" and lines:
            ax.set_ylim(0, max(5.0, ax.get_ylim()[1]))
        same = {v: other for v, other in coinciding({v: (x, y) for v, (x, y, _) in lines.items()}).items()
                if v not in everywhere}
        if same:
            ax.text(0.02, 0.98, "lines coincide: " + ", ".join(f"{v} = {other}" for v, other in same.items()),
                    transform=ax.transAxes, ha="left", va="top", fontsize=9, color="0.3",
                    bbox={"facecolor": "white", "alpha": 0.8, "linewidth": 0})
        if not lines:
            ax.text(0.5, 0.5, f"'{key}' was not logged\nby any variant", ha="center", va="center",
                    transform=ax.transAxes, fontsize=11, color="0.4")
    handles, legend_labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in legend_labels:
                handles.append(h)
                legend_labels.append(lab)
    fig.suptitle((title + "\n" if title else "") + seed_caption(sorted({r.seed for r in runs})), fontsize=14)
    # Below the panels, in as many rows as it needs: a long legend above them covered the title.
    ncol = max(1, min(len(legend_labels), 5))
    legend_rows = -(-len(legend_labels) // ncol)
    fig.legend(handles, legend_labels, loc="lower center", ncol=ncol, fontsize=11, frameon=False,
               bbox_to_anchor=(0.5, 0.0))
    fig.tight_layout(rect=(0, 0.035 * legend_rows + 0.01, 1, 0.94))
    return fig


def plot_comparison(runs: Sequence[RunResult], path: str | Path, title: str = "", window: int = 5) -> Path:
    """Write the comparison figure (see ``draw_comparison``) to a PNG.

    Args:
        runs: every (variant, seed) run.
        path: the PNG to write.
        title: first line of the figure title.
        window: moving-mean window of the reward curves.
    """
    import matplotlib.pyplot as plt

    fig = draw_comparison(runs, title=title, window=window)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
