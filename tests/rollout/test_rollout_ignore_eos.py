"""``SamplingParams.ignore_eos``: fixed-length completions (benchmarks), on both CPU backends."""

from __future__ import annotations

import pytest
import torch

from rftlab.rollout.sampler import SamplingParams, left_pad, sample_completions


@pytest.mark.parametrize("backend", ["rftlab", "hf"])
def test_ignore_eos_runs_every_completion_to_max_new_tokens(tiny_grpo, tokenizer, backend):
    model = tiny_grpo().policy
    prompt_ids, prompt_mask = left_pad([[11, 12, 13], [21, 22]], tokenizer.pad_token_id)
    # Every token is an EOS: without ignore_eos each completion ends at its first token.
    every_token = list(range(len(tokenizer)))
    torch.manual_seed(0)
    ids, mask, truncated = sample_completions(model, prompt_ids, prompt_mask, 3,
                                              SamplingParams(max_new_tokens=5, backend=backend), every_token,
                                              tokenizer.pad_token_id)
    assert ids.shape == (6, 1) and mask.sum().item() == 6 and not truncated.any()
    torch.manual_seed(0)
    ids, mask, truncated = sample_completions(model, prompt_ids, prompt_mask, 3,
                                              SamplingParams(max_new_tokens=5, backend=backend, ignore_eos=True),
                                              every_token, tokenizer.pad_token_id)
    assert ids.shape == (6, 5)
    assert mask.tolist() == [[1] * 5] * 6  # every sampled token counts: nothing ended a completion
    assert truncated.all()


def test_ignore_eos_defaults_off():
    assert SamplingParams().ignore_eos is False
