"""Shared fixtures: offline W&B, 2 threads, the tiny policy, a reward with variance."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests compare runs bit for bit; a thread count that follows the machine's load would not let them
# (tests/callbacks/test_callbacks_threads.py turns it back on).
os.environ.setdefault("RFTLAB_ADAPTIVE_THREADS", "0")
torch.set_num_threads(min(2, torch.get_num_threads()))
sys.path.insert(0, str(Path(__file__).parent))  # test helpers such as wandb_records


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Commands under test (compare, evaluate, demo) set torch's thread count; later tests keep theirs."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def length_parity(completions, **_):
    """A reward with variance on random text: 1.0 for an even number of characters."""
    return [float(len(c) % 2 == 0) for c in completions]


@pytest.fixture
def vary_reward():
    return {"parity": length_parity}


@pytest.fixture(scope="session")
def tokenizer():
    from rftlab.models import load_tokenizer

    return load_tokenizer("tiny")


@pytest.fixture
def tiny_grpo():
    """A factory of GRPO modules on the tiny random Llama (policy loaded); keywords are GRPO's.

    The group size is the DataModule's (``RolloutDataModule(num_generations=...)``), no longer the
    module's: tests that used this fixture's former ``num_generations=4`` give it to their DataModule.
    """
    from rftlab import GRPO

    def make(**kwargs):
        defaults = dict(policy="tiny", lr=1e-2)
        module = GRPO(**{**defaults, **kwargs})
        module.configure_model()
        return module

    return make
