"""``make test-fast`` keeps its promise: it selects only tests that train no model."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _fast_selection() -> tuple[list[Path], list[Path]]:
    makefile = (ROOT / "Makefile").read_text()
    paths = re.search(r"^FAST_TESTS := (.+)$", makefile, re.M).group(1).split()
    target = makefile[makefile.index("test-fast:"):].split("\n\n")[0]
    deselected = re.findall(r"--deselect (\S+)", target)
    return [ROOT / p for p in paths], [ROOT / p for p in deselected]


def test_test_fast_selects_no_test_that_trains():
    paths, deselected = _fast_selection()
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("test_*.py")))]
    assert len(files) > 20, "the fast set covers the math, rewards and tasks"
    training = [f for f in files if f not in deselected and re.search(r"fit_tiny|Trainer\(|\.fit\(", f.read_text())]
    assert not training, f"train a model, so they belong to `make test` only: {training}"
