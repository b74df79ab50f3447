"""onednn_sampling: float32 linears run by oneDNN while sampling, torch's kernels everywhere else."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

import rftlab.models.onednn_sampling as onednn
from rftlab import GRPO, RolloutDataModule
from rftlab.models import apply_lora
from rftlab.models.loading import tiny_llama
from rftlab.models.onednn_sampling import OneDNNSampling, onednn_linear
from rftlab.rollout.sampler import SamplingParams, left_pad, sample_completions
from rftlab.tasks import Arithmetic

pytestmark = pytest.mark.skipif(not onednn.onednn_linear_available(), reason="torch built without oneDNN")

IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])


def lora_policy() -> nn.Module:
    model = apply_lora(tiny_llama(100, seed=0), r=4, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    return model


@pytest.fixture
def calls(monkeypatch):
    """How many linear calls went to oneDNN."""
    seen = []
    real = onednn.onednn_linear
    monkeypatch.setattr(onednn, "onednn_linear", lambda *a: seen.append(1) or real(*a))
    return seen


def test_onednn_linear_equals_f_linear_plain_and_prepacked():
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 5, 16), torch.randn(24, 16), torch.randn(24)
    expected = torch.nn.functional.linear(x, w, b)
    torch.testing.assert_close(onednn_linear(x, w, b), expected, atol=1e-5, rtol=1e-5)
    packed = torch.ops.mkldnn._reorder_linear_weight(w)
    torch.testing.assert_close(onednn_linear(x, packed, None), expected - b, atol=1e-5, rtol=1e-5)


def test_sampling_logits_match_torch_kernels_and_only_no_grad_float32_calls_are_routed(calls):
    model = lora_policy().eval()
    with torch.no_grad():
        plain = model(input_ids=IDS).logits
    sampling = OneDNNSampling()
    with sampling.active(model):
        with torch.no_grad():
            routed = model(input_ids=IDS).logits
        n = len(calls)
        grad = model(input_ids=IDS).logits  # a forward with grad: torch's kernels
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=IDS)  # under autocast: torch's kernels
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    assert n == len(linears) > 0 and len(calls) == n
    torch.testing.assert_close(routed, plain, atol=1e-5, rtol=1e-5)
    assert torch.equal(grad.detach(), plain) and grad.requires_grad
    assert not any("forward" in m.__dict__ for m in model.modules()), "the swap was not undone"
    # frozen weights (the base model) were prepacked; the adapter's trained weights run as they are
    assert len(sampling) == sum(not m.weight.requires_grad for m in linears)


def test_prepacked_copies_are_reused_and_remade_after_a_change():
    model = lora_policy().eval()
    sampling = OneDNNSampling()
    q = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    with sampling.active(model):
        first = sampling._packed.get(q)
    with sampling.active(model):
        assert sampling._packed.get(q) is first
    with torch.no_grad():
        q.weight.mul_(2.0)
    with sampling.active(model), torch.no_grad():
        second = sampling._packed.get(q)
        x = torch.randn(2, q.in_features)
        torch.testing.assert_close(onednn_linear(x, second, None), x @ q.weight.t(), atol=1e-5, rtol=1e-5)
    assert second is not first


def test_nothing_is_routed_under_autocast(calls):
    model = tiny_llama(100, seed=0).eval()
    sampling = OneDNNSampling()
    with torch.autocast("cpu", dtype=torch.bfloat16), sampling.active(model), torch.no_grad():
        model(input_ids=IDS)
    assert calls == [] and len(sampling) == 0


def test_greedy_decoding_gives_the_same_tokens(tiny_grpo, tokenizer, calls):
    module = tiny_grpo()
    prompt_ids, prompt_mask = left_pad([[11, 12, 13, 14, 15], [21, 22]], tokenizer.pad_token_id)
    params = SamplingParams(max_new_tokens=8, greedy=True)
    expected = sample_completions(module.policy, prompt_ids, prompt_mask, 2, params, [-1], tokenizer.pad_token_id)
    assert calls == []
    with OneDNNSampling().active(module.policy):
        got = sample_completions(module.policy, prompt_ids, prompt_mask, 2, params, [-1], tokenizer.pad_token_id)
    assert calls and all(torch.equal(a, b) for a, b in zip(got[:2], expected[:2]))


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_grpo_samples_with_onednn_and_trains_with_torch_kernels(tmp_path, vary_reward, calls, monkeypatch, lora):
    forwards = []
    module = GRPO(policy="tiny", lora=lora, num_generations=2, lr=5e-2, validate_at_start=False)
    dm = RolloutDataModule(task=Arithmetic(num_test=0), rewards=vary_reward, prompts_per_step=2, max_new_tokens=4)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    original = module.compute_loss

    def spy(batch):
        n = len(calls)
        out = original(batch)
        forwards.append(len(calls) - n)
        return out

    monkeypatch.setattr(module, "compute_loss", spy)
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    trainer.fit(module, datamodule=dm)
    assert calls, "sampling did not use oneDNN"
    assert forwards == [0, 0], "the training forward must use torch's kernels"
    assert any(not torch.equal(p, before[n]) for n, p in module.named_parameters() if n in before)
    assert not any("forward" in m.__dict__ for m in module.policy.modules())
    assert (len(module._onednn) > 0) == lora  # full fine-tuning: every weight trains, none prepacked


def test_onednn_sampling_off_routes_nothing(tmp_path, vary_reward, calls):
    module = GRPO(policy="tiny", lora=True, num_generations=2, validate_at_start=False, onednn_sampling=False)
    dm = RolloutDataModule(task=Arithmetic(num_test=0), rewards=vary_reward, prompts_per_step=2, max_new_tokens=4)
    L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, default_root_dir=tmp_path).fit(module, datamodule=dm)
    assert calls == [] and len(module._onednn) == 0


def test_onednn_sampling_must_be_a_bool():
    with pytest.raises((TypeError, ValueError), match="onednn_sampling"):
        GRPO(policy="tiny", onednn_sampling="on")
