"""Every Python code block of the README and the docs runs, on the tiny model, so none goes stale.

Each page's blocks run in order in one namespace (a later block may use an earlier one's names),
in a temporary folder that holds the repository's ``configs/``. Examples are written for the real
model and real budgets; here the model named "default" is the random tiny one (same tokenizer) and
every Trainer stops after 2 steps with one validation batch, so the whole set takes seconds.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
import pytest

from docs_examples import ROOT, blocks, pages, python_blocks

PAGES = [p for p in pages() if python_blocks(p)]


def _tiny_instead_of_default(monkeypatch: pytest.MonkeyPatch) -> None:
    import rftlab.models.build as build
    import rftlab.models.loading as loading

    def swap(original):
        def load(policy, *args, **kwargs):
            return original("tiny" if policy == "default" else policy, *args, **kwargs)
        return load

    monkeypatch.setattr(build, "load_causal_lm", swap(build.load_causal_lm))  # imported by name there
    monkeypatch.setattr(loading, "load_causal_lm", swap(loading.load_causal_lm))


def _short_trainer(monkeypatch: pytest.MonkeyPatch) -> None:
    original = L.Trainer.__init__

    def init(self, *args, **kwargs):
        steps = kwargs.get("max_steps", -1)
        kwargs["max_steps"] = 2 if steps is None or steps < 0 or steps > 2 else steps
        kwargs["limit_val_batches"] = 1
        kwargs.setdefault("enable_progress_bar", False)
        if isinstance(kwargs.get("val_check_interval"), int) and kwargs["val_check_interval"] > 2:
            kwargs["val_check_interval"] = 2
        original(self, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "__init__", init)


def _isolated_registries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Names an example registers are forgotten after its page (other tests list the registries)."""
    from rftlab.core.registry import Registry

    for module in [m for name, m in list(sys.modules.items()) if name.startswith("rftlab")]:
        for value in list(vars(module).values()):
            if isinstance(value, Registry):
                monkeypatch.setattr(value, "_entries", dict(value._entries))


def _forget_modules_under(folder: Path) -> None:
    """Modules an example wrote and imported (``my_variants.py``): the next page may write its own."""
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(folder)):
            del sys.modules[name]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.symlink(ROOT / "configs", tmp_path / "configs")
    monkeypatch.syspath_prepend(str(tmp_path))
    _tiny_instead_of_default(monkeypatch)
    _short_trainer(monkeypatch)
    _isolated_registries(monkeypatch)
    namespace: dict = {"__name__": "__docs_example__"}
    ran = 0
    try:
        for block in python_blocks(page):
            if block.skip_reason:
                continue
            try:
                exec(compile(block.code, f"{page.relative_to(ROOT)}:{block.line}", "exec"), namespace)
            except Exception as err:
                raise AssertionError(f"{page.relative_to(ROOT)}, block at line {block.line} failed: "
                                     f"{type(err).__name__}: {err}") from err
            ran += 1
    finally:
        _forget_modules_under(tmp_path)
        import wandb

        if wandb.run is not None:
            wandb.finish()
    assert ran, f"{page.relative_to(ROOT)}: every Python block is marked no-run"


def test_skipped_blocks_give_a_reason_and_fences_close():
    for page in pages():
        for block in blocks(page):  # raises on a fence that never closes
            assert block.skip_reason is None or len(block.skip_reason) > 10, f"{page}:{block.line}: say why"
