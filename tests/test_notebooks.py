"""The notebooks execute from top to bottom on the tiny model, stored without outputs, so they never rot."""

from __future__ import annotations

import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_the_three_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_compare_variants.ipynb", "03_custom_reward.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path):
    book = nbformat.read(path, as_version=4)
    nbformat.validate(book)
    code = [c for c in book.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path):
    book = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    # Runs in a temporary folder: the notebooks write their runs relative to the working directory.
    NotebookClient(book, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert time.perf_counter() - start < 180, "notebooks must stay quick enough for the test suite"
    produced = {p.name for p in tmp_path.rglob("*")}
    expected = {"01_quickstart": {"reward.png", "metrics.csv", "samples.jsonl"},
                "02_compare_variants": {"comparison.png", "results.md", "results.csv"},
                "03_custom_reward": {"capitals.jsonl"}}[path.stem]
    assert expected <= produced, expected - produced
    if path.stem == "03_custom_reward":
        last = book.cells[-1].outputs
        assert any("eval/sampled/pass@4" in str(o.get("data", {})) for o in last), last
