"""The documentation site builds offline with ``mkdocs build --strict``: a broken link, a missing page
of the nav or a reference to an object that does not exist fails the suite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra (pip install -e '.[docs]'; make install has it)")
    pytest.importorskip("mkdocstrings")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    site = tmp_path / "site"
    assert (site / "index.html").is_file()
    reference = (site / "reference" / "algorithms" / "index.html").read_text()
    # The reference is generated from the docstrings: GRPO's documented arguments are on its page.
    assert "Group Relative Policy Optimization" in reference and "leave-one-out" in reference
    # The benchmark figures are published next to the pages that show them.
    assert any((site / "results").rglob("*.png"))
