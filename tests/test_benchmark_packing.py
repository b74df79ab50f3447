"""benchmarks/packing.py: shapes, batches, and both layouts timed on the tiny model."""

from __future__ import annotations

import pytest
import torch
from benchmark_scripts import load_benchmark

from rftlab import GRPO


@pytest.fixture(scope="module")
def packing():
    return load_benchmark("packing")


def test_parse_shape(packing):
    assert packing.parse_shape("8x32") == (8, 32, False)
    assert packing.parse_shape("16x128f") == (16, 128, True)
    assert all(packing.parse_shape(s) for s in packing.SHAPES)


@pytest.mark.parametrize("full", [False, True])
def test_make_batch(packing, full):
    prompt_ids, prompt_mask, completion_ids, completion_mask = packing.make_batch(6, 12, full, prompt_tokens=5)
    assert prompt_ids.shape == (6, 5) and (prompt_ids == prompt_ids[0]).all() and prompt_mask.all()
    lengths = completion_mask.sum(-1)
    assert completion_ids.shape == (6, 12) and (lengths[:2] == 12).all()  # a third run to the limit
    assert ((lengths >= 4) & (lengths <= 12)).all()
    assert (lengths == 12).all() == full


def test_both_layouts_run_and_are_timed(packing):
    module = GRPO(policy="tiny", lora=False, log={"validate_at_start": False})
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    times = packing.time_layouts(module, packing.make_batch(4, 8, False, prompt_tokens=5), repeats=2)
    assert {k: len(v) for k, v in times.items()} == {"never": 2, "always": 2}
    assert all(t > 0 for v in times.values() for t in v)
    # gradients are dropped between passes, nothing steps the weights
    assert all(torch.equal(p, before[n]) for n, p in module.policy.named_parameters())
