"""rftlab's decode loop: same tokens as transformers' generate, same sampling distribution."""

from __future__ import annotations

import pytest
import torch

from rftlab.rollout.decoding import filter_logits, inverse_cdf, next_tokens
from rftlab.rollout.sampler import SamplingParams, left_pad, sample_completions, sampling_mode


def _both(model, prompt_ids, prompt_mask, G, params, eos, pad):
    """rftlab's loop with G completions per prompt vs HF greedy on the prompts repeated G times
    (HF's greedy search refuses num_return_sequences > 1)."""
    hf = SamplingParams(**{**params.__dict__, "backend": "hf"})
    ours = SamplingParams(**{**params.__dict__, "backend": "rftlab"})
    return {
        "hf": sample_completions(model, prompt_ids.repeat_interleave(G, 0), prompt_mask.repeat_interleave(G, 0),
                                 1, hf, eos, pad),
        "rftlab": sample_completions(model, prompt_ids, prompt_mask, G, ours, eos, pad),
    }


def test_greedy_decode_equals_transformers_generate(tiny_grpo, tokenizer):
    module = tiny_grpo()
    model = module.policy
    pad = tokenizer.pad_token_id
    prompt_ids, prompt_mask = left_pad([[11, 12, 13, 14, 15], [21, 22], [31, 32, 33]], pad)
    params = SamplingParams(max_new_tokens=8, greedy=True)
    # First without EOS, then with an EOS that one row emits early, so rows finish at different
    # steps and the loop has to drop rows from its batch and cache mid-way.
    free = _both(model, prompt_ids, prompt_mask, 2, params, [-1], pad)
    assert torch.equal(free["hf"][0], free["rftlab"][0])
    eos = int(free["hf"][0][0, 2])
    stopped = _both(model, prompt_ids, prompt_mask, 2, params, [eos], pad)
    for a, b in zip(stopped["hf"], stopped["rftlab"]):
        assert torch.equal(a, b)
    lengths = stopped["rftlab"][1].sum(1)
    assert lengths.min() <= 3 and lengths.max() == 8, "rows must finish at different steps"


def test_filter_logits_matches_transformers_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    for top_k, top_p in [(0, 0.9), (5, 1.0), (10, 0.5), (0, 0.05)]:
        expected = logits.clone()
        if top_k:
            expected = TopKLogitsWarper(top_k)(None, expected)
        if top_p < 1:
            expected = TopPLogitsWarper(top_p)(None, expected)
        assert torch.equal(torch.isinf(filter_logits(logits, top_k, top_p)), torch.isinf(expected)), (top_k, top_p)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.5, 3, 1.0), (1.0, 0, 0.8)])
def test_samples_follow_the_filtered_tempered_softmax(temperature, top_k, top_p):
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).repeat(40_000, 1)
    torch.manual_seed(0)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    samples = next_tokens(logits, params)
    freq = torch.bincount(samples, minlength=5).float() / len(samples)
    expected = filter_logits(logits[:1] / temperature, top_k, top_p).softmax(-1)[0]
    torch.testing.assert_close(freq, expected, atol=0.01, rtol=0)


def test_inverse_cdf_by_hand():
    # cdf of [1/8, 0, 1/2, 3/8] is [1/8, 1/8, 5/8, 1] (exact in binary):
    # u in [0, 1/8) -> 0, [1/8, 5/8) -> 2, [5/8, 1) -> 3; the zero-probability token 1 never
    probs = torch.tensor([[0.125, 0.0, 0.5, 0.375]]).repeat(7, 1)
    u = torch.tensor([0.0, 0.1249, 0.125, 0.6249, 0.625, 0.95, 0.999999])
    assert inverse_cdf(probs, u).tolist() == [0, 0, 2, 2, 3, 3, 3]
    # unnormalised rows and a trailing filtered-out token, even at u = 1 (the rounding edge)
    probs = torch.tensor([[2.0, 0.0, 2.0, 0.0], [0.0, 0.0, 5.0, 0.0]])
    assert inverse_cdf(probs, torch.tensor([0.49, 0.0])).tolist() == [0, 2]
    assert inverse_cdf(probs, torch.tensor([1.0, 1.0])).tolist() == [2, 2]


def test_inverse_cdf_equals_a_slow_reference_loop():
    torch.manual_seed(0)
    probs = torch.rand(50, 30).pow(3)
    probs[:, ::4] = 0.0  # filtered-out tokens
    u = torch.rand(50, dtype=torch.float64)

    def reference(row, value):
        total = sum(float(p) for p in row)
        running = 0.0
        for i, p in enumerate(row):
            running += float(p)
            if running > value * total:
                return i

    assert inverse_cdf(probs, u).tolist() == [reference(probs[n], float(u[n])) for n in range(50)]


def test_sampling_matches_torch_multinomial_in_distribution():
    torch.manual_seed(1)
    logits = torch.randn(1, 20).repeat(100_000, 1)
    ours = torch.bincount(next_tokens(logits, SamplingParams()), minlength=20).float() / 100_000
    theirs = torch.bincount(torch.multinomial(logits.softmax(-1), 1).squeeze(-1), minlength=20).float() / 100_000
    torch.testing.assert_close(ours, logits[0].softmax(-1), atol=0.006, rtol=0)
    torch.testing.assert_close(ours, theirs, atol=0.008, rtol=0)


@pytest.mark.parametrize("loop", ["generic", "static"])
def test_each_prompt_is_prefilled_once(tiny_grpo, tokenizer, monkeypatch, loop):
    from rftlab.rollout.decoding import decode
    from rftlab.rollout.static_decode import StaticDecoder

    module = tiny_grpo()
    widths = []
    if loop == "generic":
        original = module.policy.forward

        def spy(*args, **kwargs):
            widths.append(tuple(kwargs["input_ids"].shape))
            return original(*args, **kwargs)

        monkeypatch.setattr(module.policy, "forward", spy)
    else:
        original = StaticDecoder.forward

        def spy(self, ids, *args, **kwargs):
            widths.append(tuple(ids.shape))
            return original(self, ids, *args, **kwargs)

        monkeypatch.setattr(StaticDecoder, "forward", spy)
    prompt_ids, prompt_mask = left_pad([[11, 12, 13, 14], [21, 22]], tokenizer.pad_token_id)
    params = SamplingParams(max_new_tokens=3)
    if loop == "generic":
        with sampling_mode(module.policy):
            decode(module.policy, prompt_ids, prompt_mask, 4, params, [-1], tokenizer.pad_token_id)
    else:  # the tiny Llama is a plain model: sample_completions takes the static loop
        sample_completions(module.policy, prompt_ids, prompt_mask, 4, params, [-1], tokenizer.pad_token_id)
    # prefill: 2 prompts (not 2 x 4); then one token for each of the 8 rows per step
    assert widths == [(2, 4), (8, 1), (8, 1)]
