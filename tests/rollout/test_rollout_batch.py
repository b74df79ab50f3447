"""The Rollout dataclass: slicing, trimming, minibatches of whole groups, concatenation."""

from __future__ import annotations

import pytest
import torch

from rftlab.rollout.rollout import Rollout


def make_rollout(n_groups: int = 3, G: int = 2) -> Rollout:
    N = n_groups * G
    lengths = torch.tensor([1, 3, 2, 1, 4, 2][:N])
    T = 5
    completion_mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return Rollout(
        prompt_ids=torch.arange(N * 3).view(N, 3),
        prompt_mask=torch.tensor([[0, 1, 1]] * N),
        completion_ids=torch.arange(N * T).view(N, T),
        completion_mask=completion_mask,
        group=torch.arange(n_groups).repeat_interleave(G),
        rewards=torch.arange(N, dtype=torch.float),
        rewards_per_fn=torch.arange(N, dtype=torch.float).unsqueeze(1),
        truncated=torch.zeros(N, dtype=torch.bool),
        reward_names=["r"],
        prompts=[f"p{i}" for i in range(N)],
        completions=[f"c{i}" for i in range(N)],
        rows=[{"i": i} for i in range(N)],
    )


def test_select_keeps_rows_in_order_and_trims_padding():
    r = make_rollout()
    sub = r.select([3, 0])
    assert sub.completions == ["c3", "c0"] and sub.rows == [{"i": 3}, {"i": 0}]
    assert sub.rewards.tolist() == [3.0, 0.0]
    # Longest real completion among rows 3 and 0 is 1 token; leading prompt padding column dropped.
    assert sub.completion_ids.shape == (2, 1) and sub.prompt_ids.shape == (2, 2)


def test_minibatches_hold_whole_groups_and_cover_everything():
    r = make_rollout(n_groups=3, G=2)
    mbs = r.minibatches(2, torch.Generator().manual_seed(0))
    seen = sorted(int(x) for mb in mbs for x in mb.rewards)
    assert seen == list(range(6))
    for mb in mbs:
        groups = [int(x) for x in torch.arange(6).view(3, 2)[0]]
        assert len(mb) % 2 == 0
        # each group's two rewards (2g, 2g+1) travel together
        values = sorted(int(x) for x in mb.rewards)
        assert all(v ^ 1 in values for v in values), values
    with pytest.raises(ValueError, match="num_minibatches"):
        r.minibatches(4)


def test_concat_renumbers_groups_and_repads():
    a, b = make_rollout(2, 2), make_rollout(1, 2)
    b = b.select([0, 1])  # narrower completions (trimmed to 3 columns)
    joined = Rollout.concat([a, b], pad_token_id=0)
    assert len(joined) == 6
    assert joined.group.tolist() == [0, 0, 1, 1, 2, 2]
    assert joined.completion_ids.shape[1] == a.completion_ids.shape[1]
    # re-padded columns are masked out
    assert joined.completion_mask[4:, 3:].sum() == 0


def test_to_moves_tensors_and_keeps_texts():
    r = make_rollout().to("cpu")
    assert r.completions[0] == "c0" and r.rewards.device.type == "cpu"
