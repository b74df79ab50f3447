"""benchmarks/overlay_curves.py: reads learning_curve.py's evals.csv, writes the figure and the table."""

from __future__ import annotations

from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def overlay():
    return load_benchmark("overlay_curves")


def write_run(path: Path, rows: list[tuple[int, float, float]]) -> Path:
    path.mkdir()
    lines = ["step,train_seconds,val/accuracy"] + [f"{s},{t},{a}" for s, t, a in rows]
    (path / "evals.csv").write_text("\n".join(lines) + "\n")
    return path


def test_table_and_figure(overlay, tmp_path, capsys):
    a = write_run(tmp_path / "a", [(0, 0.0, 0.25), (10, 90.0, 0.5)])
    b = write_run(tmp_path / "b", [(0, 0.0, 0.25), (10, 120.0, 0.125)])
    assert overlay.read_evals(a) == [(0, 0.0, 25.0), (10, 1.5, 50.0)]
    out = tmp_path / "fig" / "curves.png"
    overlay.main([f"GRPO={a}", f"Segment RFT, lam=1={b}", "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "| GRPO | 25% (0.0), 50% (1.5) |" in table
    assert "| Segment RFT, lam=1 | 25% (0.0), 12% (2.0) |" in table


def test_a_run_without_a_label_is_refused(overlay, tmp_path):
    with pytest.raises(SystemExit):
        overlay.main([str(tmp_path), "--out", str(tmp_path / "x.png")])


def test_the_entropy_panel_and_columns(overlay, tmp_path, capsys):
    run = write_run(tmp_path / "a", [(0, 0.0, 0.25), (2, 60.0, 0.5)])
    (run / "steps.csv").write_text("step,entropy,reward/mean\n1,1.5,0\n2,0.25,1\n3,0.5,1\n")
    assert overlay.read_entropy(run) == [(1, 1.5), (2, 0.25), (3, 0.5)]
    out = tmp_path / "curves.png"
    overlay.main([f"floor={run}", "--out", str(out), "--entropy"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| floor | 25% (0.0), 50% (1.0) | 0.25 (2) | 0.50 |" in capsys.readouterr().out
