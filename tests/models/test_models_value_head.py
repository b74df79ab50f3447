"""Value head, per-state values along completions, and the critic-adapter helpers of policy.py."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from rftlab.models.loading import tiny_llama
from rftlab.models.policy import adapter_active, adapter_disabled, add_adapter, apply_lora, completion_forward
from rftlab.models.value_head import (
    ValueHead,
    completion_state_values,
    final_values,
    prompt_values,
    token_values,
    values_at,
)

# Row 0 has two left-padding prompt tokens and one right-padding completion token.
PROMPT_IDS = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
PROMPT_MASK = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
COMPLETION_IDS = torch.tensor([[11, 12, 0], [13, 14, 15]])
COMPLETION_MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])


def test_value_head_hand_computed_and_float32_under_bf16_autocast():
    head = ValueHead(2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([1.0, 2.0]))
        head.bias.fill_(0.5)
    # 1 * 3 + 2 * 4 + 0.5 = 11.5
    assert_close(head(torch.tensor([[3.0, 4.0]])), torch.tensor([11.5]))
    with torch.no_grad():
        head.weight.copy_(torch.tensor([1.001, 0.0]))
        head.bias.zero_()
    hidden = torch.tensor([[1000.0, 0.0]])
    # float32: 1000 * 1.001 = 1001.0; in bfloat16 (8 bits of mantissa) 1.001 rounds to 1.0 -> 1000
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = head(hidden)
    assert value.dtype == torch.float32
    assert_close(value, torch.tensor([1001.0]))
    # bf16 hidden states (a bf16 trunk) come out as float32 values too
    assert head(hidden.bfloat16()).dtype == torch.float32


def test_value_head_stays_float32_when_the_module_is_cast():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), ValueHead(4))
    model.to(torch.bfloat16)
    assert model[0].weight.dtype == torch.bfloat16
    assert model[1].weight.dtype == torch.float32 and model[1].bias.dtype == torch.float32


def test_value_head_is_initialised_small():
    H = 4096
    head = ValueHead(H, init_scale=0.01, generator=torch.Generator().manual_seed(0))
    # weight ~ N(0, (0.01 / sqrt(H))^2): std 0.01 / 64 = 1.5625e-4
    assert head.weight.std().item() == pytest.approx(0.01 / 64, rel=0.05)
    assert head.bias.item() == 0.0
    # so a unit-RMS hidden state gets a value of about N(0, 0.01^2)
    values = head(torch.randn(2000, H, generator=torch.Generator().manual_seed(1)))
    assert values.std().item() == pytest.approx(0.01, rel=0.1)
    assert torch.count_nonzero(ValueHead(8, init_scale=0.0).weight) == 0
    a = ValueHead(8, generator=torch.Generator().manual_seed(3))
    b = ValueHead(8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.weight, b.weight)


@pytest.mark.parametrize("kwargs, message", [
    (dict(hidden_size=0), "hidden_size=0"),
    (dict(hidden_size=4, init_scale=-1.0), "init_scale=-1.0"),
])
def test_value_head_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ValueHead(**kwargs)


def test_completion_forward_hidden_is_what_the_lm_head_reads():
    model = tiny_llama(100, seed=0).eval()
    with torch.no_grad():
        out = completion_forward(model, PROMPT_IDS, PROMPT_MASK, COMPLETION_IDS, COMPLETION_MASK, temperature=2.0, hidden=True)
        only_hidden = completion_forward(model, PROMPT_IDS, PROMPT_MASK, COMPLETION_IDS, COMPLETION_MASK, logits=False, hidden=True)
    assert out.logits.shape == (2, 3, 100) and out.hidden.shape == (2, 4, 64)
    # hidden[:, t] for t < T predicts completion token t: the LM head on it gives the logits
    assert_close(model.lm_head(out.hidden[:, :-1]) / 2.0, out.logits, atol=1e-5, rtol=1e-5)
    assert only_hidden.logits is None
    assert_close(only_hidden.hidden, out.hidden)


def _reference_state_values(model, head):
    """Slow reference: each state (prompt + first t completion tokens) alone, without padding."""
    rows = []
    for i in range(2):
        prompt = PROMPT_IDS[i][PROMPT_MASK[i] == 1]
        length = int(COMPLETION_MASK[i].sum())
        row = []
        for t in range(length + 1):
            ids = torch.cat([prompt, COMPLETION_IDS[i, :t]]).unsqueeze(0)
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
            row.append(head(hidden[0, -1]))
        rows.append(torch.stack(row))
    return rows


def test_completion_state_values_match_a_reference_loop():
    model = tiny_llama(100, seed=0).eval()
    head = ValueHead(64, init_scale=1.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        state = completion_state_values(model, head, PROMPT_IDS, PROMPT_MASK, COMPLETION_IDS, COMPLETION_MASK)
        expected = _reference_state_values(model, head)
    assert state.shape == (2, 4) and state.dtype == torch.float32
    assert_close(state[0, :3], expected[0], atol=1e-5, rtol=1e-5)  # row 0: L = 2, states t = 0..2
    assert_close(state[1], expected[1], atol=1e-5, rtol=1e-5)      # row 1: L = 3, states t = 0..3
    # aligned with the tokens: V(s_t) for t < T
    assert_close(token_values(state), state[:, :3])
    assert_close(prompt_values(state), torch.stack([expected[0][0], expected[1][0]]))
    assert_close(final_values(state, COMPLETION_MASK), torch.stack([expected[0][2], expected[1][3]]))


def test_values_at_hand_computed_and_bounds():
    state = torch.tensor([[0.0, 1.0, 2.0, 3.0], [10.0, 11.0, 12.0, 13.0]])
    # row 0 picks columns 3, 0; row 1 picks 1, 1
    assert_close(values_at(state, torch.tensor([[3, 0], [1, 1]])), torch.tensor([[3.0, 0.0], [11.0, 11.0]]))
    with pytest.raises(ValueError, match=r"positions must be in \[0, 3\]"):
        values_at(state, torch.tensor([[4], [0]]))
    with pytest.raises(ValueError, match="positions must be"):
        values_at(state, torch.tensor([1, 2]))


# ---------------------------------------------------------------- critic adapter helpers

def _two_adapter_model():
    model = apply_lora(tiny_llama(100, seed=0), r=4)
    add_adapter(model, "critic", r=4)
    with torch.no_grad():  # non-trivial adapters (LoRA B starts at zero)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(generator=torch.Generator().manual_seed(len(name)))
    return model


def _trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_add_adapter_trains_both_adapters_and_keeps_the_policy_active():
    model = _two_adapter_model()
    names = _trainable_names(model)
    assert any(".critic." in n for n in names) and any(".default." in n for n in names)
    assert all("lora_" in n for n in names), "base weights stay frozen"
    assert model.active_adapter == "default"
    with pytest.raises(ValueError, match="PEFT model"):
        add_adapter(tiny_llama(100), "critic")


def test_adapter_switches_leave_trainable_parameters_and_the_active_adapter_alone():
    model = _two_adapter_model().eval()
    before = _trainable_names(model)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        policy = model(input_ids=ids).logits
        with adapter_active(model, "critic"):
            critic = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
        with adapter_disabled(model):  # PEFT alone would freeze the critic adapter here
            base = model(input_ids=ids).logits
    assert model.active_adapter == "default"
    assert _trainable_names(model) == before
    assert torch.equal(policy, again)
    assert not torch.allclose(policy, critic) and not torch.allclose(policy, base)


def test_a_checkpoint_with_a_scalar_bias_still_loads():
    # The bias became shape (1,) (FSDP2 cannot shard a 0-d parameter); older checkpoints hold a scalar.
    head = ValueHead(4, init_scale=0.0)
    head.load_state_dict({"weight": torch.ones(4), "bias": torch.tensor(0.25)})
    assert head.bias.shape == (1,) and head(torch.zeros(4)).item() == 0.25
