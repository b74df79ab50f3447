"""Annotations travel in typed Rollout fields: sliced, trimmed, joined and moved like the rest."""

from __future__ import annotations

import dataclasses

import torch

from rftlab.rollout.resume import rollout_from_state, rollout_to_state
from rftlab.rollout.rollout import Rollout


def _rollout(n: int, t: int, k: int, offset: float = 0.0) -> Rollout:
    mask = torch.ones(n, t, dtype=torch.long)
    mask[0, t - 1] = 0  # a shorter first row
    return Rollout(
        prompt_ids=torch.arange(n * 2).view(n, 2), prompt_mask=torch.ones(n, 2, dtype=torch.long),
        completion_ids=torch.arange(n * t).view(n, t), completion_mask=mask, group=torch.arange(n) // 2,
        rewards=torch.arange(n, dtype=torch.float) + offset, rewards_per_fn=torch.zeros(n, 1),
        truncated=torch.zeros(n, dtype=torch.bool), group_size=2, max_new_tokens=t,
        seq_advantages=torch.arange(n, dtype=torch.float), state_values=torch.ones(n, t + 1) * offset,
        segment_starts=torch.arange(n * k).view(n, k), segment_mask=torch.ones(n, k),
        segment_rewards=torch.full((n, k), offset), metrics={"reward/mean": offset},
    )


def test_select_slices_every_per_sequence_field():
    r = _rollout(4, 3, 2)
    sub = r.select([3, 1], trim=False)
    assert torch.equal(sub.segment_starts, r.segment_starts[[3, 1]])
    assert torch.equal(sub.state_values, r.state_values[[3, 1]])
    assert torch.equal(sub.seq_advantages, torch.tensor([3.0, 1.0]))
    assert sub.metrics == r.metrics and sub.group_size == 2 and sub.max_new_tokens == 3


def test_trim_drops_padding_columns_of_token_fields_only():
    r = _rollout(2, 4, 2)
    r.completion_mask[:, 2:] = 0
    r.old_logp = torch.randn(2, 4)
    trimmed = r.trimmed()
    assert trimmed.completion_ids.shape[1] == 2 and trimmed.old_logp.shape == (2, 2)
    assert trimmed.state_values.shape == (2, 5), "per-sequence fields are never trimmed"


def test_concat_joins_every_field_and_pads_segment_layouts():
    a, b = _rollout(2, 3, 2, offset=1.0), _rollout(2, 5, 3, offset=2.0)
    joined = Rollout.concat([a, b], pad_token_id=0)
    assert joined.completion_ids.shape == (4, 5)
    assert joined.segment_starts.shape == (4, 3)
    # the first part's missing third segment is padded past the completion width, its mask with 0
    assert joined.segment_starts[:2, 2].tolist() == [5, 5] and joined.segment_mask[:2, 2].tolist() == [0, 0]
    assert torch.equal(joined.segment_rewards[2:], b.segment_rewards)
    assert joined.rewards.tolist() == [1.0, 2.0, 2.0, 3.0]
    assert joined.group.tolist() == [0, 0, 1, 1]
    assert joined.metrics == a.metrics, "per-rollout metrics are the first part's"
    c = dataclasses.replace(b, state_values=None)
    assert Rollout.concat([a, c], pad_token_id=0).state_values is None, "a field set on only some parts is dropped"


def test_pending_rollout_round_trips_through_a_checkpoint_state():
    r = _rollout(2, 3, 2)
    r.first_of_rollout = False
    back = rollout_from_state(rollout_to_state(r))
    assert back.metrics == r.metrics and back.first_of_rollout is False
    assert torch.equal(back.segment_starts, r.segment_starts)


def test_a_pending_rollout_of_the_untyped_layout_loads():
    state = rollout_to_state(_rollout(2, 3, 2))
    for name in ("metrics", "first_of_rollout", "max_new_tokens", "segment_starts", "segment_mask"):
        state.pop(name)
    state["extras"] = {"metrics": {"a": 1.0}, "first_of_rollout": False, "max_new_tokens": 7}
    state["seq_extras"] = {"starts": torch.zeros(2, 1, dtype=torch.long), "mask": torch.ones(2, 1)}
    back = rollout_from_state(state)
    assert back.metrics == {"a": 1.0} and back.first_of_rollout is False and back.max_new_tokens == 7
    assert back.segment_starts.shape == (2, 1) and back.segment_mask.shape == (2, 1)
