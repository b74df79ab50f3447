"""The docstring examples of the reward modules are correct (each prints a hand-computable value)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["answers", "code", "expr", "graders", "math_answer", "shaping", "similarity", "structure"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"rftlab.rewards.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"rftlab.rewards.{name} has no runnable example"
    assert result.failed == 0
