"""forward.share_prompt (each prompt encoded once per group, through a shared cache or packed rows) changes no
loss, metric or gradient of any algorithm."""

from __future__ import annotations

import pytest
import torch

import rftlab.models.policy as policy_module
from rftlab import DAPO, GRPO, PPO, SegmentRFT, RolloutDataModule
from rftlab.tasks import Arithmetic, WordProblems

CASES = [
    (GRPO, dict(lora=True, beta=0.1)),         # reference = adapter disabled
    (GRPO, dict(lora=False, beta=0.1)),        # reference = a frozen copy
    (DAPO, dict(lora=True)),                   # the DataModule samples without dynamic sampling
    (PPO, dict(lora=True, critic={"kind": "adapter"})),  # the critic's own forward
    (PPO, dict(lora=True, critic={"kind": "shared"})),   # value head on the policy's hidden states
    (SegmentRFT, dict(lora=True)),
]


def build(cls, share_prompt, packing="never", **kwargs):
    module = cls(policy="tiny", lr=1e-2, log={"validate_at_start": False},
                 forward={"share_prompt": share_prompt, "packing": packing}, **kwargs)
    module.configure_model()
    return module


# The layout under test: the prompt's key/value cache shared by the group, or packed rows.
LAYOUTS = {"cache": ("_shared_prompt_forward", "never"), "packed": ("packed_states", "always")}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("cls, kwargs", CASES, ids=lambda c: getattr(c, "__name__", None) or str(c))
def test_share_prompt_gives_the_same_loss_metrics_and_gradients(cls, kwargs, layout, vary_reward, monkeypatch):
    calls = []
    function, packing = LAYOUTS[layout]
    original = getattr(policy_module, function)
    monkeypatch.setattr(policy_module, function, lambda *a, **k: calls.append(1) or original(*a, **k))
    shared, full = build(cls, True, packing, **kwargs), build(cls, False, **kwargs)
    full.load_state_dict(shared.state_dict())  # adapters and value heads start at random: make them equal
    task = WordProblems(num_test=0) if cls is SegmentRFT else Arithmetic(num_test=0)
    dm = RolloutDataModule(task=task, rewards=None if cls is SegmentRFT else vary_reward, prompts_per_step=2,
                           num_generations=3, max_new_tokens=6, dynamic_sampling=False, seed=0).attach(full)
    torch.manual_seed(1)
    raw = dm.build_rollout()  # scored by the module without sharing
    calls.clear()
    rescored = shared.score_rollout(raw.select(torch.arange(len(raw)), trim=False))
    for name in ("advantages", "ref_logp", "old_logp", "returns", "values"):
        a, b = getattr(rescored, name, None), getattr(raw, name, None)
        if a is not None or b is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    results = []
    for module in (shared, full):
        loss, metrics = module.compute_loss(raw)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        results.append((loss.detach(), {k: float(v) for k, v in metrics.items()}, grads))
    assert calls, f"the {layout} layout ran"
    (loss_s, metrics_s, grads_s), (loss_f, metrics_f, grads_f) = results
    torch.testing.assert_close(loss_s, loss_f, atol=1e-5, rtol=1e-4)
    assert metrics_s.keys() == metrics_f.keys()
    for key in metrics_s:
        assert metrics_s[key] == pytest.approx(metrics_f[key], abs=1e-4, rel=1e-3), key
    assert grads_s.keys() == grads_f.keys() and grads_s
    for name in grads_s:
        torch.testing.assert_close(grads_s[name], grads_f[name], atol=1e-5, rtol=1e-3, msg=lambda m: f"{name}: {m}")


def test_share_prompt_must_be_a_bool():
    with pytest.raises((TypeError, ValueError), match=r"forward\.share_prompt"):
        GRPO(policy="tiny", forward={"share_prompt": "yes"})


@pytest.mark.parametrize("value", ["sometimes", True, 512])
def test_packing_must_be_auto_always_or_never(value):
    with pytest.raises((TypeError, ValueError), match=r"forward\.packing"):
        GRPO(policy="tiny", forward={"packing": value})
