"""The byte count of benchmarks/sharded_training.py: what one process holds, hand-computed."""

from __future__ import annotations

import torch
from benchmark_scripts import load_benchmark


def test_held_bytes_counts_parameters_gradients_and_adam_state_once():
    held_bytes = load_benchmark("sharded_training").held_bytes
    module = torch.nn.Module()
    module.policy = torch.nn.Linear(4, 3)  # 15 float32 weights: 60 bytes
    module.ref_policy = torch.nn.Linear(4, 3)  # registered: counted once, with the policy's
    optimizer = torch.optim.Adam(module.policy.parameters())
    module.policy(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    # parameters 60 + 60; gradients 60 (the reference has none); Adam's two moments 2 x 60 (its
    # step counter is a 0-d tensor and not counted)
    assert held_bytes(module, optimizer) == {"parameters": 120, "gradients": 60, "optimizer": 120}
    hidden = torch.nn.Linear(4, 3)
    object.__setattr__(module, "ref_policy", hidden)  # a reference kept off the device: not a submodule
    module._modules.pop("ref_policy")
    assert held_bytes(module, optimizer)["parameters"] == 120
