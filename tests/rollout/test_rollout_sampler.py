"""Sampling: EOS masks, padding, positions, and that log-probs match the sampling distribution."""

from __future__ import annotations

import pytest
import torch

from rftlab.core import selective_log_softmax
from rftlab.models.hf import is_checkpointing, position_ids_from_mask
from rftlab.models.policy import completion_logits
from rftlab.rollout.sampler import (
    SamplingParams,
    completion_mask_from_eos,
    generation_config,
    left_pad,
    sample_completions,
)

EOS = 2


def test_completion_mask_includes_eos_when_pad_equals_eos():
    # pad == EOS == 2: masking by id would drop the EOS token itself.
    ids = torch.tensor([[5, 6, EOS, EOS, EOS], [7, EOS, EOS, EOS, EOS], [8, 9, 10, 11, 12]])
    mask, truncated = completion_mask_from_eos(ids, [EOS])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]


def test_completion_mask_first_of_several_eos_ids():
    ids = torch.tensor([[5, 0, 6, 2]])
    mask, truncated = completion_mask_from_eos(ids, [2, 0])
    assert mask.tolist() == [[1, 1, 0, 0]]
    assert not truncated.item()


def test_left_pad_and_positions_follow_mask():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_token_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    full = torch.cat([mask, torch.tensor([[1, 1], [1, 0]])], dim=1)
    # Left padding does not shift positions: the first real token is position 0.
    assert position_ids_from_mask(full).tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 1, 1]]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=0.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
    ],
)
def test_sampling_params_reject_bad_values(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_generation_config_overrides_library_defaults():
    # transformers fills unset fields with top_k=50; every warper must be set explicitly.
    config = generation_config(SamplingParams(temperature=0.7), 4, [EOS], EOS)
    assert config.top_k == 0 and config.top_p == 1.0 and config.temperature == 0.7
    assert config.do_sample and config.num_return_sequences == 4


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_training_logprobs_equal_the_sampling_distribution(tiny_grpo, tokenizer, temperature):
    """The processed scores generate sampled from == our temperature-scaled log-probs."""
    module = tiny_grpo()
    model = module.policy.eval()
    prompt_ids, prompt_mask = left_pad([[11, 12, 13, 14], [21, 22]], tokenizer.pad_token_id)
    params = SamplingParams(max_new_tokens=6, temperature=temperature)
    config = generation_config(params, 2, [EOS], tokenizer.pad_token_id)
    config.output_scores, config.return_dict_in_generate = True, True
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config)
    completion = out.sequences[:, prompt_ids.shape[1] :]
    mask, _ = completion_mask_from_eos(completion, [EOS])
    scores = torch.stack(out.scores, dim=1)  # (N, T, V): logits after temperature (no other warper)
    expected = torch.log_softmax(scores.float(), -1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
    rep_ids, rep_mask = prompt_ids.repeat_interleave(2, 0), prompt_mask.repeat_interleave(2, 0)
    with torch.no_grad():
        logits = completion_logits(model, rep_ids, rep_mask, completion, mask, temperature)
    got = selective_log_softmax(logits, completion)
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-4, rtol=1e-4)


def test_sample_completions_shapes_and_modes_restored(tiny_grpo, tokenizer):
    module = tiny_grpo(policy={"model": "tiny", "gradient_checkpointing": True})
    model = module.policy
    model.train()
    prompt_ids, prompt_mask = left_pad([[11, 12, 13], [21]], tokenizer.pad_token_id)
    ids, mask, truncated = sample_completions(
        model, prompt_ids, prompt_mask, 3, SamplingParams(max_new_tokens=5), [EOS], tokenizer.pad_token_id
    )
    assert ids.shape[0] == 6 and ids.shape[1] <= 5 and mask.shape == ids.shape and truncated.shape == (6,)
    assert model.training, "sampling must restore train mode"
    assert is_checkpointing(model), "sampling must restore gradient checkpointing"
    # Everything after the EOS is pad_token_id and masked out.
    assert bool(((ids == tokenizer.pad_token_id) | (mask == 1)).all())


@pytest.mark.parametrize("backend", ["rftlab", "hf"])
def test_sampling_uses_kv_cache_even_with_checkpointing(tiny_grpo, tokenizer, monkeypatch, backend):
    module = tiny_grpo(policy={"model": "tiny", "gradient_checkpointing": True})
    # rftlab's generic loop (the static-cache loop never calls the model's forward)
    monkeypatch.setattr("rftlab.rollout.static_decode.unsupported_reason", lambda model: "the generic loop")
    seen = []
    original = module.policy.forward

    def spy(*args, **kwargs):
        seen.append(kwargs.get("input_ids").shape[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(module.policy, "forward", spy)
    prompt_ids, prompt_mask = left_pad([[11, 12, 13, 14, 15]], tokenizer.pad_token_id)
    params = SamplingParams(max_new_tokens=4, temperature=1.0, backend=backend)
    sample_completions(module.policy, prompt_ids, prompt_mask, 1, params, [-1], tokenizer.pad_token_id)
    # With the cache, every step after the prefill feeds one new token, not the whole prefix.
    assert seen[0] == 5 and all(n == 1 for n in seen[1:]), seen


def test_greedy_is_deterministic(tiny_grpo, tokenizer):
    module = tiny_grpo()
    prompt_ids, prompt_mask = left_pad([[11, 12, 13]], tokenizer.pad_token_id)
    params = SamplingParams(max_new_tokens=6, greedy=True)
    a = sample_completions(module.policy, prompt_ids, prompt_mask, 1, params, [EOS], tokenizer.pad_token_id)[0]
    b = sample_completions(module.policy, prompt_ids, prompt_mask, 1, params, [EOS], tokenizer.pad_token_id)[0]
    assert torch.equal(a, b)


def test_evaluation_mode_restores_every_submodule_flag():
    from torch import nn

    from rftlab.models.hf import evaluation_mode

    model, other = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Sequential(nn.Dropout(0.5))), nn.Dropout(0.1)
    model.train()
    model[2].eval()  # a part the user froze in eval mode
    inside = []
    with evaluation_mode(model, None, other):
        inside = [m.training for m in [*model.modules(), other]]
    assert not any(inside), "everything is in eval mode inside"
    assert [m.training for m in model.modules()] == [True, True, True, False, False]
    assert other.training, "a module passed in train mode is in train mode again"
    with pytest.raises(RuntimeError), evaluation_mode(model):
        raise RuntimeError("the modes come back after an error too")
    assert model.training and not model[2].training

    class Switching(nn.Linear):  # a model class that extends train() (as HF's does) sees both switches
        def train(self, mode=True):
            calls.append(mode)
            return super().train(mode)

    calls = []
    with evaluation_mode(Switching(2, 2)):
        pass
    assert calls == [False, True]


def test_sampling_and_scoring_keep_a_frozen_submodule_in_eval_mode(tiny_grpo, tokenizer):
    module = tiny_grpo()
    model = module.policy
    model.train()
    frozen = next(m for m in model.modules() if m is not model and len(list(m.children())) > 0)
    frozen.eval()
    prompt_ids, prompt_mask = left_pad([[11, 12, 13]], tokenizer.pad_token_id)
    sample_completions(model, prompt_ids, prompt_mask, 2, SamplingParams(max_new_tokens=3), [EOS],
                       tokenizer.pad_token_id)
    assert model.training and not any(m.training for m in frozen.modules()), "sampling kept the frozen part"
