"""Advantage math on multi-turn masks: the environment's tokens between turns are skipped, not episode ends."""

import torch
from torch.testing import assert_close

from rftlab.core import gae
from rftlab.core.advantages import token_level_rewards
from rftlab.core.baselines import discounted_returns


def _turn_mask(n, t, gen):
    """Rows of model turns separated by environment spans, then right padding."""
    mask = torch.zeros(n, t)
    for i in range(n):
        pos = 0
        while pos < t:
            turn = int(torch.randint(1, 4, (1,), generator=gen))
            mask[i, pos: pos + turn] = 1
            pos += turn + int(torch.randint(0, 4, (1,), generator=gen))  # an observation of 0-3 tokens
            if torch.rand(1, generator=gen).item() < 0.3:
                break  # the episode ends; the rest is padding
    return mask


def _compressed(fn, mask, *per_token):
    """Apply ``fn`` to each row's real tokens only (the policy's own steps, observations removed)
    and scatter the result back: the slow reference for "masked positions are skipped"."""
    outs = None
    for i in range(mask.shape[0]):
        real = mask[i] != 0
        parts = [x[i][real].unsqueeze(0) for x in per_token]
        got = fn(*parts, torch.ones(1, int(real.sum())))
        got = got if isinstance(got, tuple) else (got,)
        if outs is None:
            outs = [torch.zeros(mask.shape, dtype=g.dtype) for g in got]
        for o, g in zip(outs, got):
            o[i][real] = g[0]
    return outs


def test_gae_two_turn_episode_hand_computed():
    # Turn 1 = tokens 0-1, an observation at 2-3 (garbage values there), turn 2 = token 4.
    rewards = torch.tensor([[0.0, 0.0, 5.0, 5.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 9.0, 9.0, 0.7]])
    mask = torch.tensor([[1, 1, 0, 0, 1]])
    adv, ret = gae(rewards, values, mask, 0.9, 0.5)
    # Skipping the observation the policy's steps are 0.5, 0.6, 0.7 with the reward on the last:
    # t=4: d = 1 - 0.7 = 0.3                 A = 0.3
    # t=1: d = 0 + 0.9*0.7 - 0.6 = 0.03      A = 0.03 + 0.45*0.3 = 0.165   (bootstraps from turn 2)
    # t=0: d = 0 + 0.9*0.6 - 0.5 = 0.04      A = 0.04 + 0.45*0.165 = 0.11425
    assert_close(adv, torch.tensor([[0.11425, 0.165, 0.0, 0.0, 0.3]]))
    assert_close(ret, torch.tensor([[0.61425, 0.765, 0.0, 0.0, 1.0]]))


def test_gae_multi_turn_equals_gae_of_the_policys_own_steps():
    gen = torch.Generator().manual_seed(3)
    mask = _turn_mask(7, 12, gen)
    rewards = torch.randn(7, 12, generator=gen, dtype=torch.float64)
    values = torch.randn(7, 12, generator=gen, dtype=torch.float64)
    adv, ret = gae(rewards, values, mask, 0.97, 0.9)
    ref_adv, ref_ret = _compressed(lambda r, v, m: gae(r, v, m, 0.97, 0.9), mask, rewards, values)
    assert_close(adv, ref_adv)
    assert_close(ret, ref_ret)
    # NaN on the environment's tokens never reaches the model's
    dirty = gae(rewards.masked_fill(mask == 0, float("nan")), values.masked_fill(mask == 0, float("nan")), mask, 0.97, 0.9)
    assert_close(dirty[0], adv)


def test_discounted_returns_skip_observations():
    r = torch.tensor([[1.0, 0.0, 7.0, 2.0, 0.0]])
    mask = torch.tensor([[1, 1, 0, 1, 0]])
    # gamma 0.5 over the policy's steps 1, 0, 2: G = [1 + 0.5*(0 + 0.5*2), 0 + 0.5*2, -, 2, -]
    assert_close(discounted_returns(r, mask, 0.5), torch.tensor([[1.5, 1.0, 0.0, 2.0, 0.0]]))
    gen = torch.Generator().manual_seed(4)
    mask = _turn_mask(6, 10, gen)
    r = torch.randn(6, 10, generator=gen)
    (ref,) = _compressed(lambda x, m: discounted_returns(x, m, 0.9), mask, r)
    assert_close(discounted_returns(r, mask, 0.9), ref)


def test_outcome_reward_lands_on_the_last_turns_last_token():
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 0], [1, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]])
    out = token_level_rewards(torch.tensor([2.0, 3.0, 4.0]), mask)
    expected = torch.zeros(3, 7)
    expected[0, 5] = 2.0  # not at index sum(mask) - 1 = 3, an observation token
    expected[1, 0] = 3.0
    assert_close(out, expected)


def _reference_merge(ids, k, model):
    """Slow loop: each environment-only segment goes to the last kept segment before it (else the first kept)."""
    has = [any(m for i, m in zip(ids, model) if i == s) for s in range(k)]
    if not any(has):
        return list(ids), list(range(k))
    kept = [s for s in range(k) if has[s]]
    target = []
    for s in range(k):
        before = [j for j, t in enumerate(kept) if t <= s]
        target.append(before[-1] if before else 0)
    return [target[i] for i in ids], target


def test_environment_only_segments_join_the_models_segment_before_them():
    from rftlab.core import merge_environment_segments

    ids, target = merge_environment_segments(torch.tensor([0, 0, 1, 1, 2]), 3, torch.tensor([1, 1, 0, 0, 1]).bool())
    assert ids.tolist() == [0, 0, 0, 0, 1] and target.tolist() == [0, 0, 1]
    # a leading observation joins the first segment with a model token
    ids, target = merge_environment_segments(torch.tensor([0, 0, 1, 2]), 3, torch.tensor([0, 0, 1, 1]).bool())
    assert ids.tolist() == [0, 0, 0, 1] and target.tolist() == [0, 0, 1]
    # no model token: nothing merged
    ids, target = merge_environment_segments(torch.tensor([0, 1]), 2, torch.tensor([0, 0]).bool())
    assert ids.tolist() == [0, 1] and target.tolist() == [0, 1]
    gen = torch.Generator().manual_seed(5)
    for _ in range(50):
        t = int(torch.randint(1, 15, (1,), generator=gen))
        steps = torch.randint(0, 2, (t,), generator=gen)
        steps[0] = 0
        seg = torch.cumsum(steps, 0)
        k = int(seg.max()) + 1
        model = torch.rand(t, generator=gen) < 0.5
        got_ids, got_target = merge_environment_segments(seg, k, model)
        want_ids, want_target = _reference_merge(seg.tolist(), k, model.tolist())
        assert got_ids.tolist() == want_ids and got_target.tolist() == want_target
