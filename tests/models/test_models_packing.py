"""Packed rows (each group's prompt once, its completions back to back) against the padded forward."""

from __future__ import annotations

import pytest
import torch

import rftlab.models.policy as policy_module
from rftlab.models import apply_lora
from rftlab.models.hf import set_checkpointing
from rftlab.models.loading import tiny_llama
from rftlab.models.packing import (ATTENTION_SLOWDOWN, EXPLICIT_ATTENTION_BYTES_PER_SCORE, PackedRows,
                                   attention_pair_cost, explicit_attention_pays, is_prefix_mask, pack_groups, packable,
                                   packed_attention_mask, packed_row_lengths, packing_pays)
from rftlab.models.policy import completion_forward
from tests.models.test_models_shared_prompt import gradient_model, grouped_batch, layout_grads


def test_pack_groups_hand_computed():
    # group 0: prompt [5, 6, 7] (left-padded to 5) with completions [20, 21] and [30];
    # group 1: prompt [8, 9] with completion [40, 41, 42]
    prompt_ids = torch.tensor([[0, 0, 5, 6, 7], [0, 0, 5, 6, 7], [0, 0, 0, 8, 9]])
    prompt_mask = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 1, 1]])
    completion_ids = torch.tensor([[20, 21, 0], [30, 0, 0], [40, 41, 42]])
    completion_mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    group = torch.tensor([0, 0, 1])
    packed = pack_groups(prompt_ids, prompt_mask, completion_ids, completion_mask, group)
    assert packed.width == 6  # row 0: 3 prompt + 2 + 1 completion tokens; row 1: 2 + 3
    assert packed.input_ids.tolist() == [[5, 6, 7, 20, 21, 30], [8, 9, 40, 41, 42, 0]]
    # each completion's positions continue from the end of its prompt, as when it was sampled
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 2, 3, 4, 0]]
    assert packed.segment.tolist() == [[0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 1, -1]]
    # state t = after the prompt and t completion tokens; flat index b * 6 + column; -1 past the end
    assert packed.state_index.tolist() == [[2, 3, 4, -1], [2, 5, -1, -1], [7, 8, 9, 10]]
    assert packed_row_lengths(prompt_mask, completion_mask, group).tolist() == [6, 5]


def test_packed_attention_mask_hand_computed():
    segment = torch.tensor([[0, 0, 1, 1, 2, -1]])
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],  # prompt: causal over the prompt
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],  # completion 1: the prompt and itself
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],  # completion 2: the prompt and itself, never completion 1
        [0, 0, 0, 0, 0, 1],  # padding: only itself (no all-masked row, no NaN)
    ], dtype=torch.bool)
    mask = packed_attention_mask(segment)
    assert mask.shape == (1, 1, 6, 6) and torch.equal(mask[0, 0], expected)
    additive = packed_attention_mask(segment, torch.float32)[0, 0]
    assert torch.equal(additive == 0, expected) and (additive[~expected] == torch.finfo(torch.float32).min).all()


def test_is_prefix_mask():
    assert is_prefix_mask(torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]]))
    assert not is_prefix_mask(torch.tensor([[1, 0, 1]]))


def _row_by_row(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature):
    """Slow reference: each sequence alone, real tokens only, no padding anywhere."""
    logits, hidden = [], []
    for n in range(len(prompt_ids)):
        prompt = prompt_ids[n][prompt_mask[n].bool()]
        completion = completion_ids[n][completion_mask[n].bool()]
        out = model(input_ids=torch.cat([prompt, completion])[None], output_hidden_states=True)
        logits.append(out.logits[0, len(prompt) - 1 : -1] / temperature)
        hidden.append(out.hidden_states[-1][0, len(prompt) - 1 :])
    return logits, hidden


@pytest.mark.parametrize("attention,packed_attention", [("sdpa", "sdpa"), ("sdpa", "auto"), ("sdpa", "eager"),
                                                         ("eager", "auto"), ("eager", "sdpa")])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_packed_logits_and_hidden_equal_each_sequence_alone(attention, packed_attention, shuffle, temperature):
    model = tiny_llama(100, seed=0).eval()
    model.config._attn_implementation = attention
    batch = grouped_batch(torch.Generator().manual_seed(0), shuffle)
    calls = []
    original = policy_module.packed_states
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(policy_module, "packed_states", lambda *a: calls.append(1) or original(*a))
        packed = completion_forward(model, *batch, temperature, hidden=True, packing="always",
                                    packed_attention=packed_attention)
        logits, hidden = _row_by_row(model, *batch, temperature)
    assert calls == [1]
    assert model.config._attn_implementation == attention  # the packed forward's kernel switch is undone
    assert packed.logits.shape == (6, 4, 100) and packed.hidden.shape == (6, 5, 64)
    lengths = batch[3].sum(-1)
    for n, length in enumerate(lengths.tolist()):
        torch.testing.assert_close(packed.logits[n, :length], logits[n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed.hidden[n, : length + 1], hidden[n], atol=1e-5, rtol=1e-5)
        assert (packed.hidden[n, length + 1 :] == 0).all()  # past the end: zeros, never read


@pytest.mark.parametrize("packed_attention", ["sdpa", "eager"])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("lora", [False, True])
def test_packed_gradients_equal_the_padded_forward(lora, checkpointing, packed_attention):
    model = gradient_model(lora)
    batch = grouped_batch(torch.Generator().manual_seed(1), shuffle=True)
    full = layout_grads(model, batch, share_prompt=False)
    set_checkpointing(getattr(model, "get_base_model", lambda: model)(), checkpointing)
    model.train()
    calls = []
    original = policy_module.packed_states
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(policy_module, "packed_states", lambda *a: calls.append(1) or original(*a))
        packed = layout_grads(model, batch, packing="always", packed_attention=packed_attention)
    assert calls == [1]  # packed also under gradient checkpointing
    assert full.keys() == packed.keys() and full
    for name in full:
        # Gradients reach ~6 here and float32 sums in another order differ by up to ~1e-5, so the
        # absolute tolerance scales with each tensor's largest entry.
        scale = float(full[name].abs().max())
        torch.testing.assert_close(packed[name], full[name], atol=1e-5 * max(scale, 1.0), rtol=1e-4, msg=name)


class Packed(Exception):
    """Raised by the spy in place of the packed forward."""


def test_when_rows_are_packed(monkeypatch):
    calls = []

    def spy(*args):
        calls.append(1)
        raise Packed

    monkeypatch.setattr(policy_module, "packed_states", spy)
    model = tiny_llama(100, seed=0)
    batch = grouped_batch(torch.Generator().manual_seed(2))
    prompt_ids, prompt_mask, completion_ids, completion_mask = batch
    # packing off, no shared prompt: the padded layouts
    for options in (dict(packing="never"), dict(share_prompt=False, packing="always")):
        assert completion_forward(model, *batch, **options).logits.shape == (6, 4, 100) and not calls
    distinct = tuple(t[::3] for t in batch)  # every row its own prompt: nothing to share
    assert completion_forward(model, *distinct, packing="always").logits.shape == (2, 4, 100) and not calls
    holes = completion_mask.clone()
    holes[0] = torch.tensor([1, 0, 1, 1])  # not real tokens then padding: no packed layout
    out = completion_forward(model, prompt_ids, prompt_mask, completion_ids, holes, packing="always")
    assert out.logits.shape == (6, 4, 100) and not calls
    empty = prompt_mask.clone()
    empty[:3] = 0  # a prompt without real tokens: nothing to predict the first completion token from
    out = completion_forward(model, prompt_ids, empty, completion_ids, completion_mask, packing="always")
    assert out.logits.shape == (6, 4, 100) and not calls
    model.config._attn_implementation = "flash_attention_2"  # takes no custom 4D mask
    assert not packable(model)
    model.config._attn_implementation = "sdpa"
    model.config.sliding_window = 4  # the custom mask would drop the window
    assert not packable(model)
    model.config.sliding_window = None
    assert packable(apply_lora(model, r=4))  # the PEFT wrapper's base model decides
    with pytest.raises(Packed):
        completion_forward(model, *batch, packing="always")
    assert calls == [1]
    with pytest.raises(ValueError, match="packing"):
        completion_forward(model, *batch, packing="sometimes")
    # "auto": ragged completions are worth packing (see test_packing_pays_hand_computed), full-length
    # ones only add attention over longer rows
    with pytest.raises(Packed):
        completion_forward(model, *batch, packing="auto")
    full = torch.ones_like(completion_mask)
    assert completion_forward(model, prompt_ids, prompt_mask, completion_ids, full, packing="auto").logits is not None
    assert calls == [1, 1]


def test_packing_pays_hand_computed():
    # 2 groups x 3 completions, P = 5, T = 4, lengths 4, 2, 1; real prompts of 3 and 5 tokens:
    # packed rows of 10 and 12 tokens -> B = 2, L = 12
    _, prompt_mask, _, completion_mask = grouped_batch(torch.Generator().manual_seed(0))
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    # packed 2*12 + c*2*144 = 24 + 288c; with the prompt's cache 2*5 + 6*4 + c*6*4*9 = 34 + 216c:
    # packing pays while 72c < 10, c < 0.139
    assert packing_pays(prompt_mask, completion_mask, group, pair_cost=0.13)
    assert not packing_pays(prompt_mask, completion_mask, group, pair_cost=0.15)
    # without the cache (checkpointing): 6*9 + c*6*81 = 54 + 486c, more than 24 + 288c for any c
    assert packing_pays(prompt_mask, completion_mask, group, pair_cost=10.0, prompt_cache=False)


def test_attention_pair_cost_hand_computed():
    model = tiny_llama(100, seed=0)  # 2 layers, 4 heads x 16, 80448 parameters
    assert sum(p.numel() for p in model.parameters()) == 80448
    assert attention_pair_cost(model) == pytest.approx(ATTENTION_SLOWDOWN * 2 * 2 * 64 / 80448)


def _rows(batch: int, width: int, device: str = "cpu") -> PackedRows:
    ids = torch.zeros(batch, width, dtype=torch.long, device=device)
    return PackedRows(ids, ids, ids, ids)


def test_explicit_attention_pays_hand_computed():
    model = tiny_llama(100, seed=0)  # 2 layers, 4 heads
    assert EXPLICIT_ATTENTION_BYTES_PER_SCORE == 8
    # 3 rows of 10 tokens: 3 * 4 heads * 10 * 10 * 2 layers = 2400 scores, 19,200 bytes
    assert explicit_attention_pays(model, _rows(3, 10), budget=19_200)
    assert not explicit_attention_pays(model, _rows(3, 10), budget=19_199)
    assert explicit_attention_pays(apply_lora(tiny_llama(100, seed=0), r=4), _rows(3, 10), budget=19_200)
    # never off the CPU: an accelerator's SDPA kernels are the fast ones
    assert not explicit_attention_pays(model, _rows(3, 10, device="meta"), budget=10**9)


class _KernelSpy:
    """Records the attention kernel the model's config names while its first attention layer runs."""

    def __init__(self, model):
        self.seen = []
        config = model.config
        attention = model.model.layers[0].self_attn
        attention.register_forward_pre_hook(lambda *_: self.seen.append(config._attn_implementation))


def test_packed_attention_auto_picks_explicit_attention_for_short_rows_only(monkeypatch):
    model = tiny_llama(100, seed=0)
    spy = _KernelSpy(model)
    batch = grouped_batch(torch.Generator().manual_seed(3))
    with torch.no_grad():
        completion_forward(model, *batch, packing="always")  # rows of 10 and 12 tokens: a few KB
        assert spy.seen == ["eager"] and model.config._attn_implementation == "sdpa"
        monkeypatch.setattr("rftlab.models.packing.EXPLICIT_ATTENTION_BUDGET", 100)
        completion_forward(model, *batch, packing="always")  # over the budget: the model's own
        completion_forward(model, *batch, packing="always", packed_attention="eager")  # forced
        assert spy.seen == ["eager", "sdpa", "eager"]
    # under gradient checkpointing the backward recomputes each layer after the call: never switched
    monkeypatch.setattr("rftlab.models.packing.EXPLICIT_ATTENTION_BUDGET", 10**9)
    set_checkpointing(model, True)
    model.train()
    out = completion_forward(model, *batch, packing="always", packed_attention="eager")
    out.logits.float().logsumexp(-1).sum().backward()
    assert spy.seen[3:] == ["sdpa", "sdpa"]  # the forward, then its recompute
    assert model.config._attn_implementation == "sdpa"


def test_packed_attention_kernel_is_restored_when_the_forward_fails(monkeypatch):
    model = tiny_llama(100, seed=0)
    model.model.layers[0].register_forward_pre_hook(lambda *_: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        completion_forward(model, *grouped_batch(torch.Generator().manual_seed(3)), packing="always")
    assert model.config._attn_implementation == "sdpa"


def test_packed_attention_must_be_a_known_kernel():
    model = tiny_llama(100, seed=0)
    with pytest.raises(ValueError, match="packed_attention='flash'.*auto, sdpa, eager"):
        completion_forward(model, *grouped_batch(torch.Generator().manual_seed(3)), packed_attention="flash")
    from rftlab import GRPO

    with pytest.raises(ValueError, match="forward.packed_attention='flash'"):
        GRPO(policy="tiny", forward={"packed_attention": "flash"})
