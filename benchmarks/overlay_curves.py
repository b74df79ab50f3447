"""Overlay the held-out accuracy curves of several `learning_curve.py` runs in one figure.

    .venv/bin/python benchmarks/overlay_curves.py --out curves.png \
        "GRPO=benchmarks/out/grpo_wp" "SegmentRFT=benchmarks/out/segment_rft_wp"

Each argument is LABEL=RUN_DIR, where RUN_DIR holds the run's evals.csv (step, train_seconds,
val/accuracy). Prints a Markdown table of the accuracy at every evaluation. ``--entropy`` adds a
second panel, the policy entropy at every step from each run's steps.csv, and its lowest value to
the table.
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


def read_entropy(run_dir: Path) -> list[tuple[int, float]]:
    """(step, policy entropy in nats per token) of every step in ``run_dir/steps.csv``.

    Args:
        run_dir: a `learning_curve.py --out` directory.
    """
    with (run_dir / "steps.csv").open() as f:
        return [(int(float(r["step"])), float(r["entropy"])) for r in csv.DictReader(f) if r.get("entropy")]


def markdown(curves: dict[str, list[tuple[int, float, float]]],
             entropy: dict[str, list[tuple[int, float]]] | None = None) -> str:
    """One row per run: the accuracy (and training minutes) at each evaluation.

    Args:
        curves: label -> ``read_evals`` output.
        entropy: label -> ``read_entropy`` output, for a column of the lowest and the last entropy.
    """
    extra = " | lowest entropy (step) | last entropy |" if entropy else " |"
    lines = ["| run | evaluations: accuracy (training minutes)" + extra,
             "| --- | ---" + (" | ---: | ---: |" if entropy else " |")]
    for label, evals in curves.items():
        row = f"| {label} | " + ", ".join(f"{acc:.0f}% ({minutes:.1f})" for _, minutes, acc in evals)
        if entropy:
            step, low = min(entropy[label], key=lambda x: x[1])
            row += f" | {low:.2f} ({step}) | {entropy[label][-1][1]:.2f}"
        lines.append(row + " |")
    return "\n".join(lines)


def plot(curves: dict[str, list[tuple[int, float, float]]], out: Path, title: str,
         entropy: dict[str, list[tuple[int, float]]] | None = None) -> None:
    """Accuracy against training minutes, one line per run; and entropy against steps if given.

    Args:
        curves: label -> ``read_evals`` output.
        out: the PNG to write.
        title: the figure's title.
        entropy: label -> ``read_entropy`` output (a second panel).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if entropy else 1, figsize=(13 if entropy else 8, 4.5), squeeze=False)
    ax = axes[0][0]
    for label, evals in curves.items():
        ax.plot([m for _, m, _ in evals], [a for _, _, a in evals], marker="o", label=label)
    ax.set_xlabel("training minutes (evaluation excluded)")
    ax.set_ylabel("held-out greedy accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    if entropy:
        ent = axes[0][1]
        for label, points in entropy.items():
            ent.plot([s for s, _ in points], [e for _, e in points], label=label)
        ent.set_xlabel("step")
        ent.set_ylabel("policy entropy (nats/token)")
        ent.set_ylim(bottom=0)
        ent.grid(alpha=0.3)
        ent.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="LABEL=RUN_DIR")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--title", default="held-out accuracy")
    parser.add_argument("--entropy", action="store_true", help="add the per-step entropy (from steps.csv)")
    args = parser.parse_args(argv)
    curves, dirs = {}, {}
    for item in args.runs:
        label, sep, path = item.rpartition("=")  # labels may hold "=" (e.g. "td_lambda=1"), paths rarely do
        if not sep or not label or not path:
            parser.error(f"run {item!r} is invalid: expected LABEL=RUN_DIR")
        dirs[label] = Path(path)
        curves[label] = read_evals(dirs[label])
    entropy = {label: read_entropy(path) for label, path in dirs.items()} if args.entropy else None
    plot(curves, Path(args.out), args.title, entropy)
    print(markdown(curves, entropy))


if __name__ == "__main__":
    main()
