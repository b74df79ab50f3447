"""The shared-prompt forward (each distinct prompt encoded once per group) against the full forward."""

from __future__ import annotations

import pytest
import torch

from rftlab.models import apply_lora
from rftlab.models.hf import set_checkpointing
from rftlab.models.loading import tiny_llama
from rftlab.models.policy import completion_forward, prompt_groups


def grouped_batch(generator: torch.Generator, shuffle: bool = False):
    """Two left-padded prompts x 3 completions of ragged lengths (right-padded), rows grouped by prompt."""
    prompts = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    masks = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    prompt_ids, prompt_mask = prompts.repeat_interleave(3, 0), masks.repeat_interleave(3, 0)
    completion_ids = torch.randint(3, 100, (6, 4), generator=generator)
    completion_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]] * 2)
    completion_ids = completion_ids * completion_mask
    if shuffle:  # training minibatches may mix groups
        order = torch.tensor([3, 0, 5, 1, 4, 2])
        prompt_ids, prompt_mask, completion_ids, completion_mask = (
            t[order] for t in (prompt_ids, prompt_mask, completion_ids, completion_mask))
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def test_prompt_groups_hand_computed():
    ids = torch.tensor([[1, 2], [3, 4], [1, 2], [0, 2]])
    mask = torch.tensor([[1, 1], [1, 1], [1, 1], [0, 1]])
    first, group = prompt_groups(ids, mask)
    # three distinct prompts; rows 0 and 2 share one; a different mask is a different prompt
    assert len(first) == 3
    assert group[0] == group[2] and len({int(group[0]), int(group[1]), int(group[3])}) == 3
    assert torch.equal(ids[first][group], ids) and torch.equal(mask[first][group], mask)
    assert all(int(first[g]) == min(i for i in range(4) if group[i] == g) for g in range(3))


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_shared_prompt_logits_and_hidden_equal_the_full_forward(shuffle, temperature):
    model = tiny_llama(100, seed=0).eval()
    batch = grouped_batch(torch.Generator().manual_seed(0), shuffle)
    with torch.no_grad():
        full = completion_forward(model, *batch, temperature, hidden=True, share_prompt=False)
        shared = completion_forward(model, *batch, temperature, hidden=True, share_prompt=True)
    assert shared.logits.shape == full.logits.shape == (6, 4, 100)
    assert shared.hidden.shape == full.hidden.shape
    valid = batch[3].bool()  # logits after EOS (right padding) are never used
    torch.testing.assert_close(shared.logits[valid], full.logits[valid], atol=1e-5, rtol=1e-5)
    hidden_valid = torch.cat([torch.ones(6, 1, dtype=torch.bool), valid], dim=1)
    torch.testing.assert_close(shared.hidden[hidden_valid], full.hidden[hidden_valid], atol=1e-5, rtol=1e-5)


def layout_grads(model, batch, **options):
    """Gradients of a weighted log-prob loss through ``completion_forward(..., **options)``."""
    model.zero_grad(set_to_none=True)
    out = completion_forward(model, *batch, 1.0, **options)
    logp = out.logits.log_softmax(-1).gather(-1, batch[2].unsqueeze(-1)).squeeze(-1)
    weights = torch.linspace(-1.0, 1.0, logp.shape[0]).unsqueeze(-1)  # unequal advantages per row
    (weights * logp * batch[3]).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def gradient_model(lora):
    """The tiny model, or it with a LoRA adapter whose B is non-zero (so the adapter changes outputs)."""
    model = tiny_llama(100, seed=0)
    if lora:
        model = apply_lora(model, r=4)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.1)
    return model


@pytest.mark.parametrize("lora", [False, True])
def test_shared_prompt_gradients_equal_the_full_forward(lora):
    model = gradient_model(lora)
    batch = grouped_batch(torch.Generator().manual_seed(1), shuffle=True)
    full, shared = layout_grads(model, batch, share_prompt=False), layout_grads(model, batch, share_prompt=True)
    assert full.keys() == shared.keys() and full
    # the prompt's layers get gradient from every completion of its group: all weights are covered
    assert all(full[n].abs().sum() > 0 for n in full if "lora_A" in n or not lora)
    for name in full:
        torch.testing.assert_close(shared[name], full[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("lora", [False, True])
def test_rows_with_distinct_prompts_and_checkpointing_take_the_full_path(monkeypatch, lora):
    import rftlab.models.policy as policy

    calls = []
    monkeypatch.setattr(policy, "_shared_prompt_forward", lambda *a, **k: calls.append(1) or None)
    model = tiny_llama(100, seed=0)
    model = apply_lora(model, r=4) if lora else model
    prompt_ids, prompt_mask, completion_ids, completion_mask = grouped_batch(torch.Generator().manual_seed(2))
    distinct = (prompt_ids[::3], prompt_mask[::3], completion_ids[::3], completion_mask[::3])
    assert completion_forward(model, *distinct).logits.shape == (2, 4, 100) and not calls
    set_checkpointing(getattr(model, "get_base_model", lambda: model)(), True)
    model.train()
    batch = (prompt_ids, prompt_mask, completion_ids, completion_mask)
    assert completion_forward(model, *batch).logits.shape == (6, 4, 100) and not calls
    with torch.no_grad():  # no backward, so no recomputation: sharing is safe again
        assert completion_forward(model, *batch) is None and calls == [1]
