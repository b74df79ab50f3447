"""The low-precision sampling copy: merged adapter, refreshed weights, untouched policy, wired into sampling."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import fit_tiny

from rftlab import GRPO, RolloutDataModule
from rftlab.models.loading import tiny_llama
from rftlab.models.sampling_copy import SamplingCopy
from rftlab.tasks import Arithmetic
from tiny_models import lora_policy

IDS = torch.tensor([[5, 6, 7, 8, 9, 10]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()



def fresh_copy(policy, dtype=torch.bfloat16):
    """What a copy made now holds: PEFT's own merge of a deep copy, rounded."""
    return dict(copy.deepcopy(policy).merge_and_unload().to(dtype).named_parameters())


def test_copy_merges_the_adapter_and_follows_updates_without_touching_the_policy():
    policy = lora_policy()
    sampling = SamplingCopy(policy, "bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in sampling.model.parameters())
    assert not any("lora" in name for name, _ in sampling.model.named_parameters())
    torch.testing.assert_close(logits(sampling.model), logits(policy), atol=0.2, rtol=0)  # bf16 rounding

    with torch.no_grad():  # an "optimizer step" on the adapter
        for name, p in policy.named_parameters():
            if "lora_A" in name:
                p.add_(torch.randn_like(p))
    updated = {n: p.detach().clone() for n, p in policy.named_parameters()}
    expected = fresh_copy(policy)
    stale = [n for n, p in sampling.model.named_parameters() if not torch.equal(p, expected[n])]
    assert stale and all("q_proj" in n or "v_proj" in n for n in stale)
    sampling.refresh(policy)
    assert all(torch.equal(p, expected[n]) for n, p in sampling.model.named_parameters())
    assert all(torch.equal(updated[n], p) for n, p in policy.named_parameters()), "refresh wrote to the policy"


def deep_copied_parameters(monkeypatch, build):
    """The (dtype, requires_grad) of every parameter ``build()`` deep-copies as it is, and its result."""
    copied = []
    real = torch.nn.Parameter.__deepcopy__

    def spy(self, memo):
        copied.append((self.dtype, self.requires_grad))
        return real(self, memo)

    monkeypatch.setattr(torch.nn.Parameter, "__deepcopy__", spy)
    copy.deepcopy(torch.nn.Linear(2, 2))  # the spy sees a deep copy (a control)
    assert len(copied) == 2
    copied.clear()
    result = build()
    monkeypatch.undo()
    return copied, result


def test_copy_made_from_a_trained_adapter_equals_the_fp32_merge_and_never_copies_weights_in_fp32(monkeypatch):
    policy = lora_policy()
    with torch.no_grad():  # a trained (resumed) adapter: B != 0, so the merge changes weights
        for name, p in policy.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn_like(p))
    expected = fresh_copy(policy)  # PEFT's merge in float32 of a float32 deep copy, then rounded
    copied, sampling = deep_copied_parameters(monkeypatch, lambda: SamplingCopy(policy, "bfloat16"))
    assert copied == []  # every weight went straight to bf16: no float32 copy of the model
    params = dict(sampling.model.named_parameters())
    assert params.keys() == expected.keys()
    assert all(torch.equal(params[n], expected[n]) for n in expected)
    buffers, expected_buffers = dict(sampling.model.named_buffers()), dict(
        copy.deepcopy(policy).merge_and_unload().to(torch.bfloat16).named_buffers())
    assert buffers.keys() == expected_buffers.keys()
    assert all(torch.equal(buffers[n], expected_buffers[n]) for n in buffers)


def test_copy_of_a_full_policy_is_its_weights_rounded_and_keeps_tied_weights_tied(monkeypatch):
    policy = tiny_llama(100, seed=0)
    policy.config.tie_word_embeddings = True
    policy.tie_weights()
    copied, sampling = deep_copied_parameters(monkeypatch, lambda: SamplingCopy(policy, "float16"))
    assert copied == []
    expected = dict(copy.deepcopy(policy).to(torch.float16).named_parameters())
    params = dict(sampling.model.named_parameters())
    assert params.keys() == expected.keys() and all(torch.equal(params[n], expected[n]) for n in expected)
    assert sampling.model.lm_head.weight is sampling.model.model.embed_tokens.weight


def test_copy_of_a_fully_fine_tuned_policy_follows_every_weight():
    policy = tiny_llama(100, seed=0)
    sampling = SamplingCopy(policy, "float16")
    with torch.no_grad():
        policy.model.embed_tokens.weight.mul_(2.0)
        policy.model.layers[1].mlp.down_proj.weight.add_(0.5)
    sampling.refresh(policy)
    assert torch.equal(sampling.model.model.embed_tokens.weight, policy.model.embed_tokens.weight.to(torch.float16))
    down = sampling.model.model.layers[1].mlp.down_proj.weight
    assert torch.equal(down, policy.model.layers[1].mlp.down_proj.weight.to(torch.float16))


def test_invalid_sampling_dtype_is_refused_at_construction():
    with pytest.raises(ValueError, match="forward.sampling_dtype='int8'.*'bfloat16', 'float16'"):
        GRPO(policy="tiny", forward={"sampling_dtype": "int8"})
    with pytest.raises(ValueError, match="forward.sampling_dtype='bfloat16'.*policy.quantization='nf4'"):
        GRPO(policy={"model": "tiny", "lora": True, "quantization": "nf4"}, forward={"sampling_dtype": "bfloat16"})
    with pytest.raises(ValueError, match="sampling_dtype"):
        SamplingCopy(tiny_llama(100), "float32")


def spy_on_sampling(monkeypatch) -> list:
    """Record (model, dtype) of every model the algorithms sample with."""
    import rftlab.algorithms.base as base

    seen = []
    original = base.sample_completions

    def spy(model, *args, **kwargs):
        seen.append((model, next(model.parameters()).dtype))
        return original(model, *args, **kwargs)

    monkeypatch.setattr(base, "sample_completions", spy)
    return seen


def test_grpo_samples_from_the_copy_refreshed_after_each_update(tmp_path, vary_reward, monkeypatch):
    seen = spy_on_sampling(monkeypatch)
    refreshes = []
    monkeypatch.setattr(SamplingCopy, "refresh", lambda self, policy, real=SamplingCopy.refresh:
                        refreshes.append(1) or real(self, policy))
    # validate_at_start: the copy is first built under Lightning's inference mode (a validation
    # batch), and later refreshes must still be able to write to it.
    module = GRPO(policy="tiny", lora=True, lr=5e-2, log={"validate_at_start": True},
                  forward={"sampling_dtype": "bfloat16"})
    dm = RolloutDataModule(task=Arithmetic(num_test=2), rewards=vary_reward, prompts_per_step=2, num_generations=2,
                           max_new_tokens=4, val_batch_size=2)
    fit_tiny(module, dm, 3, tmp_path, val_check_interval=3, limit_val_batches=None, enable_checkpointing=True)
    # decoding calls: validation at start, 3 rollouts, validation after step 3
    assert len(seen) == 5 and all(dtype == torch.bfloat16 for _, dtype in seen)
    assert all(model is not module.policy for model, _ in seen)
    assert len(refreshes) == 3  # before the rollouts of steps 2 and 3 and the final validation
    # the last refresh (for the final validation) copied the final policy
    expected = fresh_copy(module.policy)
    assert all(torch.equal(p, expected[n]) for n, p in module.runtime._sampling_copy.model.named_parameters())
    assert not any("_sampling_copy" in key or key.startswith("sampling") for key in module.state_dict())


def test_a_critic_adapter_is_not_merged_into_the_sampling_copy():
    from rftlab import PPO
    from rftlab.algorithms.ppo import CRITIC_ADAPTER

    module = PPO(policy="tiny", lora=True, critic={"kind": "adapter"}, log={"validate_at_start": False},
                 forward={"sampling_dtype": "bfloat16"})
    module.configure_model()
    module.runtime.sampling_model(module.policy, None, "bfloat16")  # builds the copy
    with torch.no_grad():  # both adapters move away from zero, as after some training
        for name, p in module.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    module.runtime._sampling_copy.refresh(module.policy)
    layer = module.policy.get_base_model().model.layers[0].self_attn.q_proj
    assert CRITIC_ADAPTER in layer.lora_A
    policy_only = (layer.base_layer.weight + layer.get_delta_weight("default")).to(torch.bfloat16)
    both = (layer.base_layer.weight + layer.get_delta_weight("default")
            + layer.get_delta_weight(CRITIC_ADAPTER)).to(torch.bfloat16)
    copied = module.runtime._sampling_copy.model.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(copied, policy_only) and not torch.equal(copied, both)


@pytest.mark.parametrize("precision, expected", [("bf16-mixed", torch.bfloat16), ("32-true", torch.float32)])
def test_auto_samples_from_a_bf16_copy_only_in_a_bf16_run(tmp_path, vary_reward, monkeypatch, precision, expected):
    seen = spy_on_sampling(monkeypatch)
    module = GRPO(policy="tiny", lora=True, log={"validate_at_start": False})
    assert module.forward_options.sampling_dtype == "auto"
    dm = RolloutDataModule(task=Arithmetic(num_test=2), rewards=vary_reward, prompts_per_step=2, num_generations=2,
                           max_new_tokens=4, val_batch_size=2)
    fit_tiny(module, dm, 2, tmp_path, precision=precision)
    assert len(seen) == 2 and all(dtype == expected for _, dtype in seen)
    assert all((model is module.policy) == (expected == torch.float32) for model, _ in seen)


def test_auto_resolution():
    lora = GRPO(policy="tiny", lora=True)
    lora.configure_model()
    assert lora.sampling_dtype() is None  # no trainer, no autocast: float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lora.sampling_dtype() == "bfloat16"  # evaluate(precision="bf16-mixed")
    pinned = GRPO(policy="tiny", lora=True, forward={"sampling_dtype": None})
    pinned.configure_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert pinned.sampling_dtype() is None
    lora.sharded = True  # FSDP2: no process holds whole weights to copy
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lora.sampling_dtype() is None


def test_copy_of_a_policy_already_in_its_dtype_shares_no_storage_and_leaves_the_policy_alone():
    policy = lora_policy().to(torch.bfloat16)  # a bf16-true run: the weights are in the copy's dtype
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)  # a non-zero adapter: merging it into shared storage would change the policy
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    sampling = SamplingCopy(policy, "bfloat16")
    policy_storage = {p.untyped_storage().data_ptr() for p in policy.parameters()}
    assert not any(p.untyped_storage().data_ptr() in policy_storage for p in sampling.model.parameters())
    assert all(torch.equal(before[n], p) for n, p in policy.named_parameters())
    expected = fresh_copy(policy)
    assert all(torch.equal(p, expected[n]) for n, p in sampling.model.named_parameters())
