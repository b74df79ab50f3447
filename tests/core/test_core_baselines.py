"""RLOO, REINFORCE++ (plain and with a group baseline), ReMax and discounted_returns."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from rftlab.core import ADVANTAGE_CONTRACT, ADVANTAGE_ESTIMATORS, call_plugin, check_plugin_options, token_level_rewards
from rftlab.core.baselines import (
    discounted_returns,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    remax_advantages,
    rloo_advantages,
)

SUPPLIED = ("kl", "kl_coef", "baseline_rewards")
NAMES = ("rloo", "reinforce_pp", "reinforce_pp_baseline", "remax")


def _call(name, rewards, group_size, mask, kl=None, kl_coef=0.0, baseline_rewards=None, **options):
    # the way an algorithm calls an estimator: contract inputs, the supplied inputs it names, the options
    supplied = {"kl": kl, "kl_coef": kl_coef, "baseline_rewards": baseline_rewards}
    return call_plugin(ADVANTAGE_ESTIMATORS.get(name), (rewards, group_size, mask), supplied, options)


def _random_mask(n, t, gen):
    # right padded, random lengths in [0, t]; row 0 full, row 1 all-masked
    lengths = torch.randint(0, t + 1, (n,), generator=gen)
    lengths[0], lengths[1] = t, 0
    return (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).float()


def _kl_with_nan_padding(mask, gen):
    kl = torch.randn(mask.shape, generator=gen, dtype=torch.float64)
    return kl.masked_fill(mask == 0, float("nan"))  # garbage on padding must not leak


# ---------------------------------------------------------------- slow references (plain Python loops)

def _ref_rloo(rewards, g):
    r = [float(x) for x in rewards]
    out = []
    for start in range(0, len(r), g):
        grp = r[start:start + g]
        for i, x in enumerate(grp):
            others = [y for j, y in enumerate(grp) if j != i]
            out.append(x - sum(others) / (g - 1))
    return torch.tensor(out, dtype=torch.float64)


def _ref_returns(scores, mask, kl, kl_coef, gamma):
    n, t_len = mask.shape
    ret = torch.zeros(n, t_len, dtype=torch.float64)
    for i in range(n):
        length = int(mask[i].sum())
        token_rewards = [(-kl_coef * float(kl[i, t]) if kl is not None else 0.0) for t in range(length)]
        if length:
            token_rewards[-1] += float(scores[i])
        running = 0.0
        for t in reversed(range(length)):
            running = token_rewards[t] + gamma * running
            ret[i, t] = running
    return ret


def _ref_whiten(x, mask):
    values = [float(x[i, t]) for i in range(x.shape[0]) for t in range(x.shape[1]) if mask[i, t]]
    out = torch.zeros(x.shape, dtype=torch.float64)
    if not values:
        return out
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / len(values)  # biased, as rftlab's whiten
    for i in range(x.shape[0]):
        for t in range(x.shape[1]):
            if mask[i, t]:
                out[i, t] = (float(x[i, t]) - mean) / math.sqrt(var + 1e-8)
    return out


def _ref_reinforce_pp(rewards, g, mask, kl, kl_coef, gamma, baseline):
    r = [float(x) for x in rewards]
    if baseline:
        centred = []
        for start in range(0, len(r), g):
            grp = r[start:start + g]
            centred += [x - sum(grp) / g for x in grp]
        r = centred
    return _ref_whiten(_ref_returns(r, mask, kl, kl_coef, gamma), mask)


# ---------------------------------------------------------------- registry, attributes

def test_registered_with_their_attributes():
    assert set(NAMES) <= set(ADVANTAGE_ESTIMATORS.names())
    assert ADVANTAGE_ESTIMATORS.get("rloo") is rloo_advantages
    assert ADVANTAGE_ESTIMATORS.get("reinforce_pp") is reinforce_pp_advantages
    assert ADVANTAGE_ESTIMATORS.get("reinforce_pp_baseline") is reinforce_pp_baseline_advantages
    assert ADVANTAGE_ESTIMATORS.get("remax") is remax_advantages
    assert {n: ADVANTAGE_ESTIMATORS.get(n).min_group_size for n in NAMES} == {
        "rloo": 2, "reinforce_pp": 1, "reinforce_pp_baseline": 2, "remax": 1}
    assert remax_advantages.needs_greedy_baseline is True
    for name in ("rloo", "reinforce_pp", "reinforce_pp_baseline"):
        assert not getattr(ADVANTAGE_ESTIMATORS.get(name), "needs_greedy_baseline", False)


# ---------------------------------------------------------------- rloo

def test_rloo_hand_computed():
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    # group 1: 1 - (2+6)/2 = -3;  2 - (1+6)/2 = -1.5;  6 - (1+2)/2 = 4.5
    # group 2: 0 - (0+3)/2 = -1.5 (twice);  3 - (0+0)/2 = 3
    adv = _call("rloo", rewards, 3, torch.ones(6, 4))
    assert_close(adv, torch.tensor([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]))


def test_rloo_group_size_two_is_the_difference():
    # G = 2: the other completion is the whole baseline, A = +-(r1 - r2)
    rewards = torch.tensor([0.2, 0.9, 5.0, -1.0])
    assert_close(rloo_advantages(rewards, 2, torch.ones(4, 1)), torch.tensor([-0.7, 0.7, 6.0, -6.0]))


@pytest.mark.parametrize("g", [2, 3, 8])
def test_rloo_matches_reference_and_is_scaled_dr_grpo(g):
    gen = torch.Generator().manual_seed(g)
    rewards = torch.randn(4 * g, generator=gen, dtype=torch.float64)
    mask = _random_mask(4 * g, 5, gen)
    adv = _call("rloo", rewards, g, mask)
    assert_close(adv, _ref_rloo(rewards, g))
    dr_grpo = call_plugin(ADVANTAGE_ESTIMATORS.get("dr_grpo"), (rewards, g, mask), {}, {})  # float32
    assert_close(adv.float(), dr_grpo * (g / (g - 1)))


def test_rloo_equal_groups_are_exactly_zero():
    # 0.3 is not exact in float32: a naive r - mean leaks ~3e-8 (times G/(G-1))
    rewards = torch.tensor([0.3] * 7 + [0.7] * 7 + [0.3, 0.3, 0.3, 1.0, 0.0, 1.0, 0.0])
    adv = rloo_advantages(rewards, 7, torch.ones(21, 2))
    assert torch.equal(adv[:14], torch.zeros(14))
    assert (adv[14:] != 0).all()


def test_rloo_rejects_group_size_one_and_bad_inputs():
    with pytest.raises(ValueError, match=r"group_size=1 is invalid for advantage 'rloo': must be an int >= 2"):
        rloo_advantages(torch.tensor([1.0, 0.0]), 1, torch.ones(2, 3))
    with pytest.raises(ValueError, match="divisible"):
        rloo_advantages(torch.zeros(5), 2, torch.ones(5, 1))
    with pytest.raises(ValueError, match="1-D"):
        rloo_advantages(torch.zeros(2, 2), 2, torch.ones(2, 1))
    with pytest.raises(ValueError, match=r"mask must be \(N, T\)"):
        rloo_advantages(torch.zeros(4), 2, torch.ones(3, 1))
    for bad in (2.0, True):
        with pytest.raises(ValueError, match="group_size"):
            rloo_advantages(torch.zeros(4), bad, torch.ones(4, 1))
    # integer rewards are promoted to float
    assert_close(rloo_advantages(torch.tensor([1, 0]), 2, torch.ones(2, 1)), torch.tensor([1.0, -1.0]))


# ---------------------------------------------------------------- discounted_returns

def test_discounted_returns_hand_computed():
    token_rewards = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, float("nan"), float("nan"), float("nan")]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    # gamma 0.5, row 0: G2 = 3, G1 = 2 + 0.5*3 = 3.5, G0 = 1 + 0.5*3.5 = 2.75; the 99 on padding is ignored
    # row 1: one real token, G0 = 4; NaN on padding does not leak
    out = discounted_returns(token_rewards, mask, 0.5)
    assert_close(out, torch.tensor([[2.75, 3.5, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]]))
    # gamma 1: plain reward-to-go [6, 5, 3]; gamma 0: the rewards themselves
    assert_close(discounted_returns(token_rewards, mask)[0], torch.tensor([6.0, 5.0, 3.0, 0.0]))
    assert_close(discounted_returns(token_rewards, mask, 0.0)[0], torch.tensor([1.0, 2.0, 3.0, 0.0]))


def test_discounted_returns_edge_cases_and_validation():
    assert torch.equal(discounted_returns(torch.full((2, 3), float("nan")), torch.zeros(2, 3)), torch.zeros(2, 3))
    assert discounted_returns(torch.zeros(2, 0), torch.zeros(2, 0)).shape == (2, 0)
    assert discounted_returns(torch.tensor([[1, 2]]), torch.ones(1, 2)).dtype == torch.float32
    for gamma in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"gamma=.* is invalid: must be in \[0, 1\]"):
            discounted_returns(torch.zeros(1, 2), torch.ones(1, 2), gamma)
    with pytest.raises(ValueError, match=r"\(N, T\)"):
        discounted_returns(torch.zeros(1, 2), torch.ones(1, 3))


# ---------------------------------------------------------------- reinforce_pp

def test_reinforce_pp_returns_with_kl_hand_computed_before_whitening():
    # one row, 3 real tokens, outcome 1; kl = [0.1, 0.2, 0.3] (NaN on padding), kl_coef 0.5, gamma 0.5
    # token rewards: [-0.05, -0.1, -0.15 + 1 = 0.85]
    # returns: G2 = 0.85, G1 = -0.1 + 0.5*0.85 = 0.325, G0 = -0.05 + 0.5*0.325 = 0.1125
    rewards = torch.tensor([1.0])
    mask = torch.tensor([[1, 1, 1, 0]])
    kl = torch.tensor([[0.1, 0.2, 0.3, float("nan")]])
    returns = discounted_returns(token_level_rewards(rewards, mask, kl, 0.5), mask, 0.5)
    assert_close(returns, torch.tensor([[0.1125, 0.325, 0.85, 0.0]]))
    # whitened over the 3 real tokens: mean 0.4291667, biased var 0.0960764 (std 0.3099619)
    adv = _call("reinforce_pp", rewards, 1, mask, kl=kl, kl_coef=0.5, gamma=0.5)
    assert_close(adv, torch.tensor([[-1.0216308, -0.3360628, 1.3576936, 0.0]]))


def test_reinforce_pp_hand_computed_whole_batch():
    # rewards [1, 0], row 1 has one real token: returns [[1, 1], [0, pad]]
    # over the 3 real tokens [1, 1, 0]: mean 2/3, biased var 2/9, std sqrt(2)/3
    # -> (1 - 2/3) / (sqrt(2)/3) = 1/sqrt(2); (0 - 2/3) / (sqrt(2)/3) = -sqrt(2)
    adv = _call("reinforce_pp", torch.tensor([1.0, 0.0]), 1, torch.tensor([[1, 1], [1, 0]]))
    assert_close(adv, torch.tensor([[0.7071068, 0.7071068], [-1.4142136, 0.0]]))


@pytest.mark.parametrize("name", ["reinforce_pp", "reinforce_pp_baseline"])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("kl_coef", [0.0, 0.2])
def test_reinforce_pp_matches_reference(name, gamma, kl_coef):
    gen = torch.Generator().manual_seed(int(gamma * 10) + int(kl_coef * 100))
    g, n, t = 4, 12, 7
    rewards = torch.randn(n, generator=gen, dtype=torch.float64)
    mask = _random_mask(n, t, gen)
    kl = _kl_with_nan_padding(mask, gen)
    adv = _call(name, rewards, g, mask, kl=kl, kl_coef=kl_coef, gamma=gamma)
    expected = _ref_reinforce_pp(rewards, g, mask, kl, kl_coef, gamma, baseline=name == "reinforce_pp_baseline")
    assert torch.isfinite(adv).all()
    assert torch.equal(adv[1], torch.zeros(t))  # the all-masked row
    assert_close(adv, expected)


@pytest.mark.parametrize("name", ["reinforce_pp", "reinforce_pp_baseline"])
def test_kl_only_matters_with_a_positive_coefficient(name):
    gen = torch.Generator().manual_seed(3)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.2])
    mask = _random_mask(4, 5, gen)
    kl = _kl_with_nan_padding(mask, gen).float()
    without = _call(name, rewards, 2, mask)
    assert torch.equal(_call(name, rewards, 2, mask, kl=kl, kl_coef=0.0), without)
    with_kl = _call(name, rewards, 2, mask, kl=kl, kl_coef=0.3)
    assert torch.isfinite(with_kl).all() and not torch.allclose(with_kl, without)


@pytest.mark.parametrize("name", ["reinforce_pp", "reinforce_pp_baseline"])
def test_all_masked_rows_and_batches_give_zeros(name):
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0]])
    kl = torch.full((4, 3), float("nan")).masked_fill(mask != 0, 0.1)
    adv = _call(name, torch.tensor([1.0, 5.0, 0.0, -2.0]), 2, mask, kl=kl, kl_coef=0.1)
    assert torch.isfinite(adv).all()
    assert torch.equal(adv[1], torch.zeros(3)) and torch.equal(adv[3], torch.zeros(3))
    nothing = _call(name, torch.tensor([1.0, 0.0]), 2, torch.zeros(2, 3), kl=torch.full((2, 3), float("nan")),
                    kl_coef=0.1)
    assert torch.equal(nothing, torch.zeros(2, 3))
    assert _call(name, torch.tensor([1.0, 0.0]), 2, torch.zeros(2, 0)).shape == (2, 0)


def test_reinforce_pp_equal_returns_whiten_to_exact_zeros():
    # every real token's return is 0.3 (outcome 0.3, no KL, gamma 1); 0.3 is inexact in float32, and a
    # plain whiten would turn the ~3e-8 error of the mean into ~3e-4 once divided by sqrt(1e-8)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]])
    adv = _call("reinforce_pp", torch.full((4,), 0.3), 1, mask)
    assert torch.equal(adv, torch.zeros(4, 3))


def test_reinforce_pp_rejects_bad_gamma_when_called_directly():
    with pytest.raises(ValueError, match=r"gamma=1\.5 is invalid"):
        reinforce_pp_advantages(torch.zeros(2), 1, torch.ones(2, 2), gamma=1.5)
    with pytest.raises(ValueError, match=r"gamma=-0\.5 is invalid"):
        reinforce_pp_baseline_advantages(torch.zeros(2), 2, torch.ones(2, 2), gamma=-0.5)
    with pytest.raises(ValueError, match="kl_coef"):
        reinforce_pp_advantages(torch.zeros(2), 1, torch.ones(2, 2), kl=torch.zeros(2, 2), kl_coef=-1.0)


# ---------------------------------------------------------------- reinforce_pp_baseline

def test_reinforce_pp_baseline_hand_computed():
    # groups of 2: [1, 0] -> centred [0.5, -0.5]; [0.5, 0.5] -> exactly [0, 0]
    # gamma 1, no KL, 2 real tokens each: returns [[.5, .5], [-.5, -.5], [0, 0], [0, 0]]
    # over the 8 real tokens: mean 0, biased var 4 * 0.25 / 8 = 0.125, std 0.3535534 -> +-1.4142136, 0
    adv = _call("reinforce_pp_baseline", torch.tensor([1.0, 0.0, 0.5, 0.5]), 2, torch.ones(4, 2))
    s = 1.4142136
    assert_close(adv, torch.tensor([[s, s], [-s, -s], [0.0, 0.0], [0.0, 0.0]]))


def test_reinforce_pp_baseline_uses_per_token_returns_not_a_broadcast_score():
    # gamma 0.5, 3 tokens, centred [0.5, -0.5]: returns [0.125, 0.25, 0.5] and the negatives
    # (a broadcast score, as verl does, would be constant along the row)
    # mean 0, biased var 2 * (0.015625 + 0.0625 + 0.25) / 6 = 0.109375, std 0.3307189
    adv = _call("reinforce_pp_baseline", torch.tensor([1.0, 0.0]), 2, torch.ones(2, 3), gamma=0.5)
    row = torch.tensor([0.3779645, 0.7559289, 1.5118579])
    assert_close(adv, torch.stack([row, -row]))


def test_reinforce_pp_baseline_equal_groups_are_exactly_zero():
    # every group constant (the float32 mean of seven 0.3 or 0.7 is off by ~3e-8) and rows of random
    # lengths: a centring that leaked the round-off would give unequal returns that whitening blows up
    mask = _random_mask(14, 4, torch.Generator().manual_seed(5))
    adv = _call("reinforce_pp_baseline", torch.tensor([0.3] * 7 + [0.7] * 7), 7, mask)
    assert torch.equal(adv, torch.zeros(14, 4))
    # a constant group next to a varying one: the same as REINFORCE++ on [0, 0, 0, centred group 2]
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 1, 1], [1, 0, 0]])
    rewards = torch.tensor([0.9, 0.9, 0.9, 1.0, 0.0, 0.5])
    expected = _call("reinforce_pp", torch.tensor([0.0, 0.0, 0.0, 0.5, -0.5, 0.0]), 3, mask)
    assert_close(_call("reinforce_pp_baseline", rewards, 3, mask), expected)


def test_reinforce_pp_baseline_rejects_group_size_one():
    with pytest.raises(ValueError, match=r"group_size=1 is invalid for advantage 'reinforce_pp_baseline'"):
        reinforce_pp_baseline_advantages(torch.tensor([1.0, 0.0]), 1, torch.ones(2, 2))


# ---------------------------------------------------------------- remax

def test_remax_hand_computed():
    # the greedy completion of prompt 1 scored 0.5, of prompt 2 scored 1 (G = 2, repeated per row)
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0])
    baseline = torch.tensor([0.5, 0.5, 1.0, 1.0])
    adv = _call("remax", rewards, 2, torch.ones(4, 3), baseline_rewards=baseline)
    assert_close(adv, torch.tensor([0.5, -0.5, -0.5, 0.0]))
    # integer baselines (a 0/1 verifier) are promoted; G = 1 is fine
    assert_close(remax_advantages(torch.tensor([1.0, 0.0]), 1, torch.ones(2, 1), baseline_rewards=torch.tensor([1, 0])),
                 torch.tensor([0.0, 0.0]))


def test_remax_matches_reference():
    gen = torch.Generator().manual_seed(7)
    rewards = torch.randn(12, generator=gen, dtype=torch.float64)
    baseline = torch.randn(4, generator=gen, dtype=torch.float64).repeat_interleave(3)
    adv = _call("remax", rewards, 3, _random_mask(12, 5, gen), baseline_rewards=baseline)
    expected = torch.tensor([float(r) - float(b) for r, b in zip(rewards, baseline)], dtype=torch.float64)
    assert_close(adv, expected)


def test_remax_requires_the_greedy_baseline():
    with pytest.raises(ValueError, match=r"remax.*baseline_rewards.*None.*DataModule must draw one greedy sample"):
        _call("remax", torch.tensor([1.0, 0.0]), 2, torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"baseline_rewards must be \(N,\)"):
        remax_advantages(torch.tensor([1.0, 0.0]), 2, torch.ones(2, 2), baseline_rewards=torch.zeros(1))


# ---------------------------------------------------------------- option checks

@pytest.mark.parametrize("name", ["reinforce_pp", "reinforce_pp_baseline"])
def test_gamma_option_is_range_checked(name):
    fn = ADVANTAGE_ESTIMATORS.get(name)
    check_plugin_options(fn, "advantage", name, ADVANTAGE_CONTRACT, {"gamma": 0.9}, SUPPLIED, "advantage.options")
    check_plugin_options(fn, "advantage", name, ADVANTAGE_CONTRACT, {}, SUPPLIED, "advantage.options")
    for bad in (1.5, -0.1):
        with pytest.raises(ValueError, match=r"advantage\.options\.gamma=.* is invalid: must be in \[0, 1\]"):
            check_plugin_options(fn, "advantage", name, ADVANTAGE_CONTRACT, {"gamma": bad}, SUPPLIED,
                                 "advantage.options")
    with pytest.raises(ValueError, match=r"advantage\.options\.gamma='high' is invalid"):
        check_plugin_options(fn, "advantage", name, ADVANTAGE_CONTRACT, {"gamma": "high"}, SUPPLIED,
                             "advantage.options")
    with pytest.raises(ValueError, match=r"advantage\.options\.kl_coef is invalid: 'kl_coef' is supplied"):
        check_plugin_options(fn, "advantage", name, ADVANTAGE_CONTRACT, {"kl_coef": 0.1}, SUPPLIED,
                             "advantage.options")


@pytest.mark.parametrize("name", ["rloo", "remax"])
def test_estimators_without_options_refuse_any(name):
    fn = ADVANTAGE_ESTIMATORS.get(name)
    check_plugin_options(fn, "advantage", name, ADVANTAGE_CONTRACT, {}, SUPPLIED, "advantage.options")
    with pytest.raises(ValueError, match=rf"advantage\.options\.gamma is invalid: advantage '{name}' takes no "
                                         r"option 'gamma'; its options: none"):
        check_plugin_options(fn, "advantage", name, ADVANTAGE_CONTRACT, {"gamma": 1.5}, SUPPLIED, "advantage.options")
    if name == "remax":
        with pytest.raises(ValueError, match=r"'baseline_rewards' is supplied by the algorithm"):
            check_plugin_options(fn, "advantage", name, ADVANTAGE_CONTRACT, {"baseline_rewards": [1.0]}, SUPPLIED,
                                 "advantage.options")
