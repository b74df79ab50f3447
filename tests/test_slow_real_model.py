"""The bundled SmolLM2-135M-Instruct: loads offline, answers, and one GRPO+LoRA step trains it."""

from __future__ import annotations

import pytest
import torch

from rftlab import GRPO, RolloutDataModule
from rftlab.tasks import Arithmetic

pytestmark = pytest.mark.slow


def test_real_model_grpo_step_gives_lora_gradients_and_changes_weights():
    module = GRPO(policy="default", lora=True, lr=2e-4)
    module.configure_model()
    assert module.tokenizer.eos_token == "<|im_end|>" and module.tokenizer.pad_token_id is not None
    dm = RolloutDataModule(task=Arithmetic(), prompts_per_step=2, num_generations=4, max_new_tokens=16, temperature=1.0,
                           rewards={"len": lambda completions, **_: [float(len(c) % 3) for c in completions]})
    dm.attach(module)
    rollout = dm.build_rollout()
    assert len(rollout) == 8 and all(isinstance(c, str) for c in rollout.completions)
    assert rollout.prompts[0].startswith("<|im_start|>system")
    lora = {n: p for n, p in module.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in lora.items()}
    loss, metrics = module.compute_loss(rollout)
    loss.backward()
    grads = [p.grad for p in lora.values()]
    assert all(g is not None for g in grads), "LoRA parameters got no gradient"
    if rollout.seq_advantages.abs().sum() > 0:
        assert sum(float(g.abs().sum()) for g in grads) > 0, "LoRA gradients are all zero"
        torch.optim.SGD(lora.values(), lr=1.0).step()
        assert any(not torch.equal(before[n], p) for n, p in lora.items())
    assert torch.isfinite(metrics["entropy"]) and metrics["entropy"] > 0
