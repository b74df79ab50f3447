"""The sampler's own log-probs of the tokens it sampled (``Rollout.sampler_logp``, rollout correction)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from rftlab.core import selective_log_softmax
from rftlab.models.hf import hf_model
from rftlab.rollout.decoding import sample_next
from rftlab.rollout.sampler import SamplingParams, left_pad, sample_completions


def test_sample_next_hand_computed():
    # logits [log 1, log 3] at temperature 1: p = [0.25, 0.75]; u = 0.5 falls in token 1's interval
    # [0.25, 1), so token 1 with log-prob log 0.75. At temperature 2 the logits halve:
    # p = [1, sqrt 3] / (1 + sqrt 3).
    logits = torch.tensor([[0.0, float(torch.log(torch.tensor(3.0)))]])
    for temperature, expected in ((1.0, 0.75), (2.0, 3**0.5 / (1 + 3**0.5))):
        torch.manual_seed(0)
        u = float(torch.rand(1, dtype=torch.float64))
        torch.manual_seed(0)
        token, logp = sample_next(logits, SamplingParams(temperature=temperature))
        assert int(token) == (1 if u >= 1 - expected else 0)
        probability = expected if int(token) == 1 else 1 - expected
        assert_close(logp, torch.tensor([probability]).log())
    token, logp = sample_next(logits, SamplingParams(greedy=True))
    assert int(token) == 1 and logp is None


def test_log_probs_are_before_top_k_filtering():
    # top_k=1 always samples the argmax; its log-prob is still the unfiltered one (log 0.75, not 0).
    logits = torch.tensor([[0.0, float(torch.log(torch.tensor(3.0)))]])
    token, logp = sample_next(logits, SamplingParams(top_k=1))
    assert int(token) == 1
    assert_close(logp, torch.tensor([0.75]).log())


@pytest.mark.parametrize("backend", ["rftlab", "hf"])
@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_sampler_log_probs_equal_a_full_forward(tiny_grpo, tokenizer, backend, top_p):
    module = tiny_grpo()
    model = module.policy
    pad = tokenizer.pad_token_id
    prompt_ids, prompt_mask = left_pad([[11, 12, 13, 14, 15], [21, 22]], pad)
    params = SamplingParams(max_new_tokens=6, temperature=0.7, top_p=top_p, backend=backend)
    eos = [int(tokenizer.eos_token_id)]
    torch.manual_seed(0)
    ids, mask, _, logps = sample_completions(model, prompt_ids, prompt_mask, 3, params, eos, pad, logprobs=True)
    assert logps.shape == ids.shape and (logps[mask == 0] == 0).all()
    # The same tokens scored by one forward over prompt + completion, logits / temperature.
    prompts, pmask = prompt_ids.repeat_interleave(3, 0), prompt_mask.repeat_interleave(3, 0)
    full = torch.cat([prompts, ids], 1)
    attention = torch.cat([pmask, mask], 1)
    positions = (attention.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = hf_model(model)(input_ids=full, attention_mask=attention, position_ids=positions).logits
    completion_logits = logits[:, prompts.shape[1] - 1 : -1].float() / 0.7
    expected = selective_log_softmax(completion_logits, ids)
    real = mask.bool()
    assert_close(logps[real], expected[real], atol=1e-4, rtol=1e-4)


def test_without_logprobs_the_three_tuple_is_unchanged(tiny_grpo, tokenizer):
    module = tiny_grpo()
    pad = tokenizer.pad_token_id
    prompt_ids, prompt_mask = left_pad([[11, 12, 13]], pad)
    out = sample_completions(module.policy, prompt_ids, prompt_mask, 2, SamplingParams(max_new_tokens=3), [-1], pad)
    assert len(out) == 3
    greedy = sample_completions(module.policy, prompt_ids, prompt_mask, 1, SamplingParams(max_new_tokens=3, greedy=True),
                                [-1], pad, logprobs=True)
    assert len(greedy) == 4 and greedy[3] is None
