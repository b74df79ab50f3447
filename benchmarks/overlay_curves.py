"""Overlay the held-out accuracy curves of several `learning_curve.py` runs in one figure.

    .venv/bin/python benchmarks/overlay_curves.py --out curves.png \
        "GRPO=benchmarks/out/grpo_wp" "SegmentRFT=benchmarks/out/segment_rft_wp"

Each argument is LABEL=RUN_DIR, where RUN_DIR holds the run's evals.csv (step, train_seconds,
val/accuracy). Prints a Markdown table of the accuracy at every evaluation.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def read_evals(run_dir: Path) -> list[tuple[int, float, float]]:
    """(step, training minutes, accuracy in %) of every evaluation in ``run_dir/evals.csv``.

    Args:
        run_dir: a `learning_curve.py --out` directory.
    """
    with (run_dir / "evals.csv").open() as f:
        return [(int(float(r["step"])), float(r["train_seconds"]) / 60, 100 * float(r["val/accuracy"]))
                for r in csv.DictReader(f)]


def markdown(curves: dict[str, list[tuple[int, float, float]]]) -> str:
    """One row per run: the accuracy (and training minutes) at each evaluation.

    Args:
        curves: label -> ``read_evals`` output.
    """
    lines = ["| run | evaluations: accuracy (training minutes) |", "| --- | --- |"]
    for label, evals in curves.items():
        lines.append(f"| {label} | " + ", ".join(f"{acc:.0f}% ({minutes:.1f})" for _, minutes, acc in evals) + " |")
    return "\n".join(lines)


def plot(curves: dict[str, list[tuple[int, float, float]]], out: Path, title: str) -> None:
    """Accuracy against training minutes, one line per run.

    Args:
        curves: label -> ``read_evals`` output.
        out: the PNG to write.
        title: the figure's title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, evals in curves.items():
        ax.plot([m for _, m, _ in evals], [a for _, _, a in evals], marker="o", label=label)
    ax.set_xlabel("training minutes (evaluation excluded)")
    ax.set_ylabel("held-out greedy accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="LABEL=RUN_DIR")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--title", default="held-out accuracy")
    args = parser.parse_args(argv)
    curves = {}
    for item in args.runs:
        label, sep, path = item.rpartition("=")  # labels may hold "=" (e.g. "td_lambda=1"), paths rarely do
        if not sep or not label or not path:
            parser.error(f"run {item!r} is invalid: expected LABEL=RUN_DIR")
        curves[label] = read_evals(Path(path))
    plot(curves, Path(args.out), args.title)
    print(markdown(curves))


if __name__ == "__main__":
    main()
