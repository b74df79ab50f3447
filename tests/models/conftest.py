"""Fixtures of the models tests.

``tiny_grpo`` overrides the one in ``tests/conftest.py``, which still passes ``num_generations`` to
GRPO (it moved to ``RolloutDataModule(num_generations=...)``); the tests here give their
DataModules ``num_generations=4``, the group size that fixture used. Drop this override once the
shared fixture takes the grouped options.
"""

from __future__ import annotations

import pytest


@pytest.fixture
def tiny_grpo():
    """A factory of GRPO modules on the tiny random Llama (policy loaded); keywords are GRPO's."""
    from rftlab import GRPO

    def make(**kwargs):
        module = GRPO(**{"policy": "tiny", "lr": 1e-2, **kwargs})
        module.configure_model()
        return module

    return make
