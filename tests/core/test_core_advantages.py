"""group_advantages, gae, whiten."""

import math
import statistics

import pytest
import torch
from torch.testing import assert_close

from rftlab.core import gae, group_advantages, whiten


def _random_mask(n, t, gen):
    # right-padded: row i has a random number of real tokens in [0, t] (0 = all-masked row)
    lengths = torch.randint(0, t + 1, (n,), generator=gen)
    lengths[0] = t  # at least one full row
    return (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).float()


# ---------------------------------------------------------------- group_advantages

def _ref_group_advantages(rewards, g, scale, eps):
    r = [float(x) for x in rewards]
    all_std = statistics.stdev(r) if len(r) > 1 else 0.0  # unbiased
    out = []
    for start in range(0, len(r), g):
        grp = r[start:start + g]
        mean = sum(grp) / g
        std = statistics.stdev(grp) if g > 1 else 0.0
        for x in grp:
            if scale == "group":
                out.append((x - mean) / (std + eps))
            elif scale == "batch":
                out.append((x - mean) / (all_std + eps))
            else:
                out.append(x - mean)
    return torch.tensor(out, dtype=torch.float64)


def test_group_advantages_hand_computed():
    r = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    # group 1: mean 2, unbiased std sqrt((1+0+1)/2) = 1          -> [-1, 0, 1]
    # group 2: mean 2, std sqrt((4+4+16)/2) = sqrt(12) = 3.464102 -> [-2, -2, 4] / 3.464102
    expected_group = torch.tensor([-1.0, 0.0, 1.0, -0.5773503, -0.5773503, 1.1547005])
    assert_close(group_advantages(r, 3, "group", eps=0.0), expected_group)
    # batch std over all six: mean 2, sqrt((1+0+1+4+4+16)/5) = sqrt(5.2) = 2.2803509
    expected_batch = torch.tensor([-1.0, 0.0, 1.0, -2.0, -2.0, 4.0]) / 2.2803509
    assert_close(group_advantages(r, 3, "batch", eps=0.0), expected_batch)
    # Dr. GRPO: centering only
    assert_close(group_advantages(r, 3, "none"), torch.tensor([-1.0, 0.0, 1.0, -2.0, -2.0, 4.0]))
    # eps enters the denominator: group 1 std 1 -> 1 / (1 + 0.5)
    assert_close(group_advantages(r, 3, "group", eps=0.5)[:3], torch.tensor([-2 / 3, 0.0, 2 / 3]))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("g", [2, 4, 8])
def test_group_advantages_match_reference(scale, g):
    gen = torch.Generator().manual_seed(g)
    r = torch.randn(8 * 3, generator=gen, dtype=torch.float64)
    assert_close(group_advantages(r, g, scale, eps=1e-6), _ref_group_advantages(r, g, scale, 1e-6))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_equal_rewards_give_exactly_zero(scale):
    # 0.3 is not exact in float32: a naive (r - mean) / (std + eps) gives ~0.03, not 0
    r = torch.tensor([0.3] * 7 + [0.7] * 7)
    adv = group_advantages(r, 7, scale)
    assert torch.equal(adv, torch.zeros(14))
    mixed = group_advantages(torch.tensor([0.3, 0.3, 0.3, 1.0, 0.0, 1.0]), 3, scale)
    assert torch.equal(mixed[:3], torch.zeros(3)) and torch.isfinite(mixed).all()


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_size_one_gives_zero(scale):
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.5]), 1, scale)
    assert torch.equal(adv, torch.zeros(3))
    assert torch.equal(group_advantages(torch.tensor([2.0]), 1, scale), torch.zeros(1))


def test_group_advantages_integer_rewards_and_validation():
    assert_close(group_advantages(torch.tensor([1, 0]), 2, "none"), torch.tensor([0.5, -0.5]))
    with pytest.raises(ValueError) as err:
        group_advantages(torch.zeros(4), 2, scale="foo")
    assert "unknown advantage scale 'foo'; valid: batch, group, none" in str(err.value)
    with pytest.raises(ValueError, match="divisible"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), 2)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="group_size"):
            group_advantages(torch.zeros(4), bad)
    with pytest.raises(ValueError, match="eps"):
        group_advantages(torch.zeros(4), 2, eps=-1.0)


# ---------------------------------------------------------------- gae

def _ref_gae(rewards, values, mask, gamma, lam):
    n, t_len = rewards.shape
    adv = torch.zeros(n, t_len, dtype=torch.float64)
    ret = torch.zeros(n, t_len, dtype=torch.float64)
    for i in range(n):
        length = int(mask[i].sum())
        last = 0.0
        for t in reversed(range(length)):
            next_v = float(values[i, t + 1]) if t + 1 < length else 0.0
            delta = float(rewards[i, t]) + gamma * next_v - float(values[i, t])
            last = delta + gamma * lam * last
            adv[i, t] = last
            ret[i, t] = last + float(values[i, t])
    return adv, ret


def test_gae_hand_computed_three_tokens():
    gamma, lam = 0.9, 0.5
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 99.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.2, 0.4, 50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma, lam)
    # row 0: t=2: d = 1 + 0.9*0 - 0.7 = 0.3;         A2 = 0.3
    #        t=1: d = 0 + 0.9*0.7 - 0.6 = 0.03;      A1 = 0.03 + 0.45*0.3 = 0.165
    #        t=0: d = 0 + 0.9*0.6 - 0.5 = 0.04;      A0 = 0.04 + 0.45*0.165 = 0.11425
    # row 1 (last real token t=1; the 99 and 50 on padding must not leak):
    #        t=1: d = 1 + 0.9*0 - 0.4 = 0.6;         A1 = 0.6
    #        t=0: d = 0 + 0.9*0.4 - 0.2 = 0.16;      A0 = 0.16 + 0.45*0.6 = 0.43
    assert_close(adv, torch.tensor([[0.11425, 0.165, 0.3], [0.43, 0.6, 0.0]]))
    # returns = A + V: [0.61425, 0.765, 1.0], [0.63, 1.0, 0 (padding)]
    assert_close(ret, torch.tensor([[0.61425, 0.765, 1.0], [0.63, 1.0, 0.0]]))


def test_gae_special_cases():
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[0.5, 0.5, 0.5]])
    mask = torch.ones(1, 3)
    # lam = 1, gamma = 1: A_t = sum_{k>=t} r_k - V_t (Monte Carlo return minus baseline)
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    assert_close(adv, torch.tensor([[5.5, 4.5, 2.5]]))
    assert_close(ret, torch.tensor([[6.0, 5.0, 3.0]]))
    # lam = 0: one-step TD error
    adv, _ = gae(rewards, values, mask, 1.0, 0.0)
    assert_close(adv, torch.tensor([[1.0, 2.0, 2.5]]))


def test_gae_matches_reference_random():
    gen = torch.Generator().manual_seed(0)
    n, t = 6, 9
    mask = _random_mask(n, t, gen)
    rewards = torch.randn(n, t, generator=gen, dtype=torch.float64)
    values = torch.randn(n, t, generator=gen, dtype=torch.float64)
    adv, ret = gae(rewards, values, mask, 0.95, 0.9)
    ref_adv, ref_ret = _ref_gae(rewards, values, mask, 0.95, 0.9)
    assert_close(adv, ref_adv)
    assert_close(ret, ref_ret)


def test_gae_padding_garbage_does_not_leak():
    gen = torch.Generator().manual_seed(1)
    mask = _random_mask(5, 7, gen)
    rewards = torch.randn(5, 7, generator=gen)
    values = torch.randn(5, 7, generator=gen)
    adv, ret = gae(rewards, values, mask, 0.99, 0.95)
    padding = mask == 0
    dirty_r = rewards.masked_fill(padding, float("nan"))
    dirty_v = values.masked_fill(padding, float("inf"))
    adv2, ret2 = gae(dirty_r, dirty_v, mask, 0.99, 0.95)
    assert_close(adv2, adv)
    assert_close(ret2, ret)
    assert torch.equal(adv[padding], torch.zeros(int(padding.sum())))
    # an all-masked row is all zeros
    a, r = gae(torch.ones(2, 3), torch.ones(2, 3), torch.tensor([[1, 1, 1], [0, 0, 0]]), 1.0, 1.0)
    assert torch.equal(a[1], torch.zeros(3)) and torch.equal(r[1], torch.zeros(3))


def test_gae_validation_and_empty():
    with pytest.raises(ValueError, match="gamma"):
        gae(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), 1.5, 0.9)
    with pytest.raises(ValueError, match="lam"):
        gae(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), 0.9, -0.1)
    with pytest.raises(ValueError, match="must all be"):
        gae(torch.zeros(1, 2), torch.zeros(1, 3), torch.ones(1, 2), 0.9, 0.9)
    adv, ret = gae(torch.zeros(2, 0), torch.zeros(2, 0), torch.ones(2, 0), 0.9, 0.9)
    assert adv.shape == ret.shape == (2, 0)


# ---------------------------------------------------------------- whiten

def _ref_whiten(x, mask):
    vals = [float(x[i, t]) for i in range(x.shape[0]) for t in range(x.shape[1]) if mask[i, t]]
    out = torch.zeros(x.shape, dtype=torch.float64)
    if not vals:
        return out
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / len(vals)  # biased
    for i in range(x.shape[0]):
        for t in range(x.shape[1]):
            if mask[i, t]:
                out[i, t] = (float(x[i, t]) - mean) / math.sqrt(var + 1e-8)
    return out


def test_whiten_hand_computed():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # mean 2, biased var (1 + 0 + 1) / 3 = 2/3, sqrt(2/3) = 0.8164966 -> +-1 / 0.8164966 = +-1.2247449
    assert_close(whiten(x, mask), torch.tensor([[-1.2247449, 0.0, 1.2247449, 0.0]]))


def test_whiten_matches_reference_random():
    gen = torch.Generator().manual_seed(2)
    mask = _random_mask(5, 6, gen)
    x = torch.randn(5, 6, generator=gen, dtype=torch.float64) * 3 + 1
    out = whiten(x, mask)
    assert_close(out, _ref_whiten(x, mask))
    real = out[mask.bool()]
    assert abs(real.mean().item()) < 1e-9 and abs(real.var(unbiased=False).item() - 1) < 1e-6


def test_whiten_edge_cases():
    assert torch.equal(whiten(torch.ones(2, 3), torch.zeros(2, 3)), torch.zeros(2, 3))  # all masked
    out = whiten(torch.full((1, 3), 5.0), torch.ones(1, 3))  # constant: 0, not NaN
    assert torch.equal(out, torch.zeros(1, 3))
    x = torch.tensor([[1.0, float("nan")]])  # garbage on padding stays out
    assert torch.equal(whiten(x, torch.tensor([[1.0, 0.0]])), torch.zeros(1, 2))


def test_whiten_of_a_constant_is_exactly_zero():
    # float32 mean([0.3] * 7) is off by ~3e-8; divided by sqrt(var + 1e-8) ~ 1e-4 it leaked ~3e-4.
    x = torch.full((1, 7), 0.3)
    mask = torch.ones(1, 7)
    assert torch.equal(whiten(x, mask), torch.zeros(1, 7))
    # padding does not count: real positions all 0.3, padding 5.0 (and NaN) ignored
    padded = torch.tensor([[0.3, 0.3, 5.0], [0.3, float("nan"), 0.0]])
    assert torch.equal(whiten(padded, torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])), torch.zeros(2, 3))
    # a non-constant input still whitens: [1, 3] -> mean 2, biased var 1 -> [-1, 1] / sqrt(1 + 1e-8)
    torch.testing.assert_close(whiten(torch.tensor([[1.0, 3.0]]), torch.ones(1, 2)), torch.tensor([[-1.0, 1.0]]))
