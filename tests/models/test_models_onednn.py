"""onednn_kernels: float32 linears run by oneDNN in sampling, scoring and training, at float32 accuracy."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_params_changed, fit_tiny, trainable_snapshot
from torch import nn

import rftlab.models.onednn as onednn
from rftlab import GRPO, RolloutDataModule
from rftlab.models.loading import tiny_llama
from rftlab.models.onednn import OneDNNLinears, onednn_linear
from rftlab.rollout.sampler import SamplingParams, left_pad, sample_completions
from rftlab.tasks import Arithmetic
from tiny_models import lora_policy

pytestmark = pytest.mark.skipif(not onednn.onednn_linear_available(), reason="torch built without oneDNN")

IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])



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
    sampling = OneDNNLinears()
    with sampling.active(model, sampling=True):
        with torch.no_grad():
            routed = model(input_ids=IDS).logits
        n = len(calls)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=IDS)  # under autocast: torch's kernels
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    assert n == len(linears) > 0 and len(calls) == n
    torch.testing.assert_close(routed, plain, atol=1e-5, rtol=1e-5)
    assert not any("forward" in m.__dict__ for m in model.modules()), "the swap was not undone"
    # frozen weights (the base model) were prepacked; the adapter's trained weights run as they are
    assert len(sampling) == sum(not m.weight.requires_grad for m in linears)


def grads_of(model, kernels, calls):
    model.zero_grad()
    with kernels.active(model) if kernels is not None else torch.enable_grad():
        logits = model(input_ids=IDS).logits
    forward_calls = len(calls)
    logits.logsumexp(-1).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads, forward_calls


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_training_forward_and_backward_match_torch(calls, lora):
    model = lora_policy() if lora else tiny_llama(100, seed=0)
    plain_logits, plain_grads, _ = grads_of(model, None, calls)
    assert calls == []
    logits, grads, forward_calls = grads_of(model, OneDNNLinears(), calls)
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    assert forward_calls == len(linears) > 0
    assert len(calls) > forward_calls  # the backward's gradients run oneDNN too
    torch.testing.assert_close(logits, plain_logits, atol=1e-5, rtol=1e-5)
    assert grads.keys() == plain_grads.keys() and any(("lora_A" if lora else "q_proj") in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_the_frozen_linear_backward_by_hand():
    # y = x W^T + b with W = [[1, 2], [3, 4], [5, 6]]: dL/dx = g W; W and b get no gradient
    weight = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    bias = torch.tensor([0.5, -0.5, 1.0])
    x = torch.tensor([[1.0, -1.0]], requires_grad=True)
    y = onednn._FrozenLinear.apply(x, weight, torch.ops.mkldnn._reorder_linear_weight(weight), bias)
    assert y.tolist() == [[-0.5, -1.5, 0.0]]
    y.backward(torch.tensor([[1.0, 0.0, 2.0]]))
    assert x.grad.tolist() == [[11.0, 14.0]]


def test_the_trained_linear_backward_by_hand():
    # y = x W^T + b; with g = dL/dy: dL/dx = g W, dL/dW = g^T x, dL/db = sum of g over rows
    weight = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], requires_grad=True)
    bias = torch.tensor([0.5, -0.5, 1.0], requires_grad=True)
    x = torch.tensor([[[1.0, -1.0], [2.0, 0.0]]], requires_grad=True)  # (1, 2, 2): batch, rows, in
    y = onednn._TrainedLinear.apply(x, weight, bias)
    assert y.tolist() == [[[-0.5, -1.5, 0.0], [2.5, 5.5, 11.0]]]
    y.backward(torch.tensor([[[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]]]))
    assert x.grad.tolist() == [[[11.0, 14.0], [3.0, 4.0]]]
    assert weight.grad.tolist() == [[1.0, -1.0], [2.0, 0.0], [2.0, -2.0]]
    assert bias.grad.tolist() == [1.0, 1.0, 2.0]


def test_onednn_float32_is_float32_accurate():
    # Against float64: float32 kernels err by ~1e-6 relative, bf16 by ~1e-3. oneDNN must stay on
    # the float32 side (it would not if a reduced-precision fp32 math mode were switched on).
    torch.manual_seed(0)
    x, w = torch.randn(64, 576), torch.randn(512, 576)
    exact = x.double() @ w.double().t()
    for weight in (w, torch.ops.mkldnn._reorder_linear_weight(w)):
        error = (onednn_linear(x, weight, None).double() - exact).abs().max() / exact.abs().max()
        assert error < 1e-5


def test_gradient_checkpointing_keeps_torch_kernels_outside_sampling(calls):
    model = tiny_llama(100, seed=0)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.requires_grad_(False)
    with OneDNNLinears().active(model), torch.no_grad():
        model(input_ids=IDS)
    assert calls == []


def test_prepacked_copies_are_reused_and_remade_after_a_change():
    model = lora_policy().eval()
    sampling = OneDNNLinears()
    q = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    with sampling.active(model, sampling=True):
        first = sampling._packed.get(q)
    with sampling.active(model, sampling=True):
        assert sampling._packed.get(q) is first
    with torch.no_grad():
        q.weight.mul_(2.0)
    with sampling.active(model, sampling=True), torch.no_grad():
        second = sampling._packed.get(q)
        x = torch.randn(2, q.in_features)
        torch.testing.assert_close(onednn_linear(x, second, None), x @ q.weight.t(), atol=1e-5, rtol=1e-5)
    assert second is not first


def test_nothing_is_routed_under_autocast(calls):
    model = tiny_llama(100, seed=0).eval()
    sampling = OneDNNLinears()
    with torch.autocast("cpu", dtype=torch.bfloat16), sampling.active(model, sampling=True), torch.no_grad():
        model(input_ids=IDS)
    assert calls == [] and len(sampling) == 0


def test_greedy_decoding_gives_the_same_tokens(tiny_grpo, tokenizer, calls, monkeypatch):
    # the generic loop, whose forward runs the model's linear layers (the static-cache loop has its own)
    monkeypatch.setattr("rftlab.rollout.static_decode.unsupported_reason", lambda model: "the generic loop")
    module = tiny_grpo()
    prompt_ids, prompt_mask = left_pad([[11, 12, 13, 14, 15], [21, 22]], tokenizer.pad_token_id)
    params = SamplingParams(max_new_tokens=8, greedy=True)
    expected = sample_completions(module.policy, prompt_ids, prompt_mask, 2, params, [-1], tokenizer.pad_token_id)
    assert calls == []
    with OneDNNLinears().active(module.policy, sampling=True):
        got = sample_completions(module.policy, prompt_ids, prompt_mask, 2, params, [-1], tokenizer.pad_token_id)
    assert calls and all(torch.equal(a, b) for a, b in zip(got[:2], expected[:2]))


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_grpo_samples_scores_and_trains_with_onednn(tmp_path, vary_reward, calls, monkeypatch, lora):
    forwards = []
    module = GRPO(policy="tiny", lora=lora, lr=5e-2, log={"validate_at_start": False}, forward={"packing": "always"})
    dm = RolloutDataModule(task=Arithmetic(num_test=0), rewards=vary_reward, prompts_per_step=2, num_generations=2,
                           max_new_tokens=4)
    original = module.compute_loss

    def spy(batch):
        n = len(calls)
        out = original(batch)
        forwards.append(len(calls) - n)
        return out

    monkeypatch.setattr(module, "compute_loss", spy)
    module.configure_model()
    before = trainable_snapshot(module)
    fit_tiny(module, dm, 2, tmp_path)  # Arithmetic(num_test=0): no validation either way
    assert calls, "sampling did not use oneDNN"
    # the training forward runs every linear layer with oneDNN, once: each group is one packed row
    # (packing)
    linears = [m for m in module.policy.modules() if type(m) is nn.Linear]
    assert forwards == [len(linears)] * 2
    assert_params_changed(before, module, require="any")
    assert not any("forward" in m.__dict__ for m in module.policy.modules())
    assert (len(module.runtime._onednn) > 0) == lora  # prepacked: frozen weights only (none under full fine-tuning)


def test_the_frozen_reference_copy_runs_onednn_without_prepacked_copies(vary_reward, calls):
    module = GRPO(policy="tiny", lora=False, beta=0.1, log={"validate_at_start": False}, forward={"packing": "always"})
    module.configure_model()
    dm = RolloutDataModule(task=Arithmetic(num_test=0), rewards=vary_reward, prompts_per_step=2, num_generations=2,
                           max_new_tokens=4).attach(module)
    rollout = dm.build_rollout()
    before = len(calls)
    logits = module.policy_logits(rollout, reference=True)
    reference_linears = [m for m in module.ref_policy.modules() if type(m) is nn.Linear]
    assert len(calls) - before == len(reference_linears)  # one packed row per group (packing)
    assert len(module.runtime._onednn) == 0  # every reference weight is frozen, none was prepacked
    module.runtime.options = module.forward_options.replace(onednn_kernels=False)  # the runtime reads the switch
    torch.testing.assert_close(module.policy_logits(rollout, reference=True), logits, atol=1e-5, rtol=1e-5)


def test_onednn_kernels_off_routes_nothing(tmp_path, vary_reward, calls):
    module = GRPO(policy="tiny", lora=True, log={"validate_at_start": False}, forward={"onednn_kernels": False})
    dm = RolloutDataModule(task=Arithmetic(num_test=0), rewards=vary_reward, prompts_per_step=2, num_generations=2,
                           max_new_tokens=4)
    fit_tiny(module, dm, 1, tmp_path)
    assert calls == [] and len(module.runtime._onednn) == 0


def test_onednn_kernels_must_be_a_bool():
    with pytest.raises((TypeError, ValueError), match="forward.onednn_kernels='on'"):
        GRPO(policy="tiny", forward={"onednn_kernels": "on"})
