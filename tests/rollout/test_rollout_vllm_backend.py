"""The optional vLLM backend: the construction guard, the pure helpers, and merged LoRA weights.

vLLM itself never runs here (no GPU, no vllm): the engine is faked where the sampler's contract is checked.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from rftlab.rollout import vllm_backend
from rftlab.rollout.datamodule import RolloutDataModule
from rftlab.rollout.sampler import SamplingParams, sample_completions
from rftlab.rollout.vllm_backend import completion_tensor, merged_weights, prompt_token_lists, sampling_kwargs
from rftlab.tasks import Arithmetic

EOS, PAD = 2, 0


@pytest.fixture
def vllm_usable(monkeypatch):
    """Pretend vllm is installed and a GPU is visible (only the guard looks)."""
    monkeypatch.setattr(vllm_backend, "vllm_installed", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def _datamodule(**kwargs):
    return RolloutDataModule(task=Arithmetic(num_test=0), **kwargs)


# ---- the guard -------------------------------------------------------------------------------
def test_without_vllm_construction_fails_naming_the_parameter_and_the_install(monkeypatch):
    monkeypatch.setattr(vllm_backend, "vllm_installed", lambda: False)
    with pytest.raises(ValueError, match=r"sampler_backend='vllm' needs the vllm package.*pip install vllm"):
        _datamodule(sampler_backend="vllm")
    with pytest.raises(ValueError, match=r"backend='vllm' needs the vllm package.*pip install vllm"):
        SamplingParams(backend="vllm")


def test_without_a_gpu_or_the_cpu_build_construction_fails_naming_both(monkeypatch):
    monkeypatch.setattr(vllm_backend, "vllm_installed", lambda: True)
    monkeypatch.setattr(vllm_backend, "vllm_cpu_build", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"sampler_backend='vllm' needs a CUDA GPU or vLLM's CPU build.*"
                                         r"sampler_backend='rftlab'"):
        _datamodule(sampler_backend="vllm")
    with pytest.raises(ValueError, match=r"backend='vllm' needs a CUDA GPU or vLLM's CPU build"):
        SamplingParams(backend="vllm")


def test_the_cpu_build_is_accepted_without_a_gpu(monkeypatch):
    monkeypatch.setattr(vllm_backend, "vllm_installed", lambda: True)
    monkeypatch.setattr(vllm_backend, "vllm_cpu_build", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert SamplingParams(backend="vllm").backend == "vllm"
    assert _datamodule(sampler_backend="vllm").sampling.backend == "vllm"


def test_stacked_sources_follow_vllms_packed_modules():
    mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    assert vllm_backend.stacked_sources("model.layers.3.self_attn.qkv_proj", mapping) == [
        "model.layers.3.self_attn.q_proj", "model.layers.3.self_attn.k_proj", "model.layers.3.self_attn.v_proj"]
    assert vllm_backend.stacked_sources("model.layers.0.mlp.gate_up_proj", mapping) == [
        "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    assert vllm_backend.stacked_sources("model.layers.0.mlp.down_proj", mapping) == ["model.layers.0.mlp.down_proj"]
    assert vllm_backend.stacked_sources("lm_head", mapping) == ["lm_head"]


def test_the_real_guard_here_refuses_vllm():
    # rftlab's own environment has no vllm: construction fails, naming it.
    if vllm_backend.vllm_installed() and (torch.cuda.is_available() or vllm_backend.vllm_cpu_build()):
        pytest.skip("vllm is installed where it can run")
    with pytest.raises(ValueError, match="sampler_backend='vllm' needs"):
        _datamodule(sampler_backend="vllm")


def test_with_vllm_and_a_gpu_it_constructs_but_refuses_several_processes(vllm_usable):
    dm = _datamodule(sampler_backend="vllm", rewards={"zero": lambda completions, **_: [0.0] * len(completions)})
    assert dm.sampling.backend == "vllm" and dm.val_sampling.backend == "vllm"
    trainer = SimpleNamespace(strategy=type("DDPStrategy", (), {})(), max_steps=10, val_check_interval=1.0,
                              limit_val_batches=1.0, world_size=2)
    with pytest.raises(ValueError, match=r"sampler_backend='vllm' supports one process.*world_size=2"):
        dm.check_trainer(trainer, "fit")
    trainer.strategy, trainer.world_size = type("SingleDeviceStrategy", (), {})(), 1
    dm.check_trainer(trainer, "fit")


# ---- pure helpers ----------------------------------------------------------------------------
def test_sampling_kwargs_match_rftlab_semantics():
    kw = sampling_kwargs(SamplingParams(max_new_tokens=7, temperature=0.7, top_p=0.9, top_k=0), 4, [EOS, 5], seed=11)
    assert kw == {"n": 4, "max_tokens": 7, "temperature": 0.7, "top_p": 0.9, "top_k": -1, "stop_token_ids": [EOS, 5],
                  "ignore_eos": False, "seed": 11, "detokenize": False}
    assert sampling_kwargs(SamplingParams(top_k=20), 2, [EOS], 0)["top_k"] == 20
    greedy = sampling_kwargs(SamplingParams(greedy=True, temperature=0.5, top_k=5, top_p=0.5), 1, [EOS], 0)
    assert (greedy["temperature"], greedy["top_k"], greedy["top_p"]) == (0.0, -1, 1.0)  # vLLM: temperature 0 is greedy
    assert sampling_kwargs(SamplingParams(ignore_eos=True), 2, [], 0)["ignore_eos"] is True


def test_prompt_token_lists_drop_the_left_padding():
    ids = torch.tensor([[PAD, PAD, 5, 6], [7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert prompt_token_lists(ids, mask) == [[5, 6], [7, 8, 9, 10]]


def _output(*samples):
    """A fake vllm RequestOutput: only ``outputs[i].index`` and ``.token_ids`` are read."""
    return SimpleNamespace(outputs=[SimpleNamespace(index=i, token_ids=t) for i, t in samples])


def test_completion_tensor_groups_by_prompt_and_right_pads():
    # Samples may come back out of index order; rows must be b * G + g.
    outputs = [_output((1, [13, EOS]), (0, [11, 12, 14, EOS])), _output((0, [21]), (1, [22, 23, 24, 25]))]
    tokens = completion_tensor(outputs, num_generations=2, pad_token_id=PAD)
    assert tokens.tolist() == [[11, 12, 14, EOS], [13, EOS, PAD, PAD], [21, PAD, PAD, PAD], [22, 23, 24, 25]]
    assert tokens.dtype == torch.long


def test_completion_tensor_refuses_a_short_group():
    with pytest.raises(RuntimeError, match="1 completions for prompt 0, expected 2"):
        completion_tensor([_output((0, [5]))], num_generations=2, pad_token_id=PAD)


def test_sample_completions_gives_vllm_tokens_the_shared_mask_contract(vllm_usable, monkeypatch):
    seen = {}

    def fake_generate(model, prompt_ids, prompt_mask, num_generations, params, eos_token_ids, pad_token_id):
        seen["eos"] = eos_token_ids
        return completion_tensor([_output((0, [5, EOS]), (1, [6, 7, 8]))], num_generations, pad_token_id)

    monkeypatch.setattr(vllm_backend, "vllm_generate", fake_generate)
    ids, mask, truncated = sample_completions(torch.nn.Identity(), torch.tensor([[4]]), torch.tensor([[1]]), 2,
                                              SamplingParams(max_new_tokens=3, backend="vllm"), [EOS], PAD)
    assert ids.tolist() == [[5, EOS, PAD], [6, 7, 8]]
    assert mask.tolist() == [[1, 1, 0], [1, 1, 1]]  # EOS included, by position not by id
    assert truncated.tolist() == [False, True]
    assert seen["eos"] == [EOS]
    sample_completions(torch.nn.Identity(), torch.tensor([[4]]), torch.tensor([[1]]), 2,
                       SamplingParams(max_new_tokens=3, backend="vllm", ignore_eos=True), [EOS], PAD)
    assert seen["eos"] == []


# ---- weights pushed to the engine ------------------------------------------------------------
def test_merged_weights_equal_peft_merge_and_unload(tiny_grpo):
    module = tiny_grpo(lora=True)
    policy = module.policy
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA's B starts at zero: make the adapter do something
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    ours = dict(merged_weights(policy))
    expected = copy.deepcopy(policy).merge_and_unload()
    reference = dict(expected.named_parameters())
    assert set(ours) == set(reference)  # HF names: no lora_ factors, no .base_layer.
    for name, weight in ours.items():
        torch.testing.assert_close(weight, reference[name], msg=name)
    base = {n.replace(".base_layer.", "."): w for n, w in policy.get_base_model().named_parameters() if "lora_" not in n}
    assert any(not torch.equal(ours[n], base[n]) for n in ours)  # the adapter is in the pushed weights
    for k, v in policy.state_dict().items():  # the training model is untouched
        assert torch.equal(v, before[k]), k


def test_merged_weights_of_a_plain_model_are_its_parameters(tiny_grpo):
    policy = tiny_grpo().policy
    ours = dict(merged_weights(policy))
    params = dict(policy.named_parameters())
    assert ours.keys() == params.keys()
    assert all(torch.equal(ours[n], params[n]) and not ours[n].requires_grad for n in params)
