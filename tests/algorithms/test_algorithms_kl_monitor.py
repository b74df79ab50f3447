"""kl.log_every: KL(policy || reference) logged at beta 0, without touching the loss."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import fit_tiny

from rftlab import GRPO, PPO, RolloutDataModule
from rftlab.core import masked_mean, selective_log_softmax
from rftlab.models import adapter_disabled, completion_logits
from rftlab.tasks import Arithmetic


def rollout_of(module, vary_reward):
    dm = RolloutDataModule(task=Arithmetic(num_test=0), rewards=vary_reward, prompts_per_step=2, num_generations=4,
                           max_new_tokens=5)
    return dm.attach(module).build_rollout()


def hand_kl(module, rollout):
    """The k3 estimate from two plain forwards, adapter on and off (a slow reference path)."""
    args = (rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask)
    with torch.no_grad():
        policy = selective_log_softmax(completion_logits(module.policy, *args, share_prompt=False), rollout.completion_ids)
        with adapter_disabled(module.policy):
            ref = selective_log_softmax(completion_logits(module.policy, *args, share_prompt=False), rollout.completion_ids)
    d = ref - policy
    return float(masked_mean(torch.exp(d) - d - 1, rollout.completion_mask))


def test_kl_monitor_matches_a_hand_computation_and_leaves_the_loss_alone(tiny_grpo, vary_reward):
    module = tiny_grpo(lora=True, beta=0.0, kl={"log_every": 1})
    fresh = rollout_of(module, vary_reward)
    assert fresh.metrics["kl"] == pytest.approx(0.0, abs=1e-7)  # lora_B = 0: policy == reference
    with torch.no_grad():
        for name, p in module.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    rollout = rollout_of(module, vary_reward)
    kl = rollout.metrics["kl"]
    assert kl > 1e-4 and kl == pytest.approx(hand_kl(module, rollout), rel=1e-4)
    assert rollout.ref_logp is None  # the loss has no KL term at beta 0
    _, metrics = module.compute_loss(rollout)
    assert "kl" not in metrics and "loss/kl" not in metrics


def test_kl_is_logged_every_n_steps(tmp_path, vary_reward):
    seen: dict[int, set[str]] = {}

    class Keys(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen[trainer.global_step - 1] = set(batch.metrics)

    module = PPO(policy="tiny", lora=True, critic={"kind": "adapter"}, lr=1e-2, log={"validate_at_start": False},
                 kl={"log_every": 2})
    dm = RolloutDataModule(task=Arithmetic(num_test=0), rewards=vary_reward, prompts_per_step=2, num_generations=2,
                           max_new_tokens=4)
    fit_tiny(module, dm, 3, tmp_path, callbacks=[Keys()])
    assert [step for step in sorted(seen) if "kl" in seen[step]] == [0, 2]
    assert all("timing/kl_monitor" in seen[step] for step in (0, 2))


@pytest.mark.parametrize("kwargs, message", [
    (dict(lora=True, kl={"log_every": 0}), r"kl\.log_every=0 is invalid: must be 'auto', an integer >= 1 or None"),
    (dict(lora=False, beta=0.0, kl={"log_every": 5}), r"kl\.log_every=5 is invalid.*lora=True or beta > 0"),
])
def test_bad_kl_monitor_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GRPO(policy="tiny", **kwargs)
