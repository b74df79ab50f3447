"""aggregate, policy_loss, kl_penalty, value_loss, explained_variance."""

import math

import pytest
import torch
from torch.testing import assert_close

from rftlab.core import aggregate, explained_variance, kl_penalty, policy_loss, value_loss


def _random_mask(n, t, gen):
    # right-padded: row i has a random number of real tokens in [0, t] (0 = all-masked row)
    lengths = torch.randint(0, t + 1, (n,), generator=gen)
    lengths[0] = t
    lengths[1] = 0  # always include an all-masked row
    return (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).float()


# ---------------------------------------------------------------- aggregate

def _ref_aggregate(per_token, mask, mode, max_len=None):
    n, t_len = per_token.shape
    rows = []  # (sum over real tokens, number of real tokens)
    for i in range(n):
        s, c = 0.0, 0
        for t in range(t_len):
            if mask[i, t]:
                s += float(per_token[i, t])
                c += 1
        rows.append((s, c))
    total, count = sum(s for s, _ in rows), sum(c for _, c in rows)
    if mode == "token-mean":
        return total / count if count else 0.0
    if mode == "seq-mean-token-mean":
        return sum(s / c if c else 0.0 for s, c in rows) / n
    if mode == "seq-mean-token-sum":
        return sum(s for s, _ in rows) / n
    return total / (n * (max_len or t_len))


def test_token_mean_vs_seq_mean_hand_computed():
    # two sequences of unequal lengths: [1, 2, 3] and [4]
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    tm = aggregate(per_token, mask, "token-mean")            # (1+2+3+4) / 4 = 2.5
    sm = aggregate(per_token, mask, "seq-mean-token-mean")   # (6/3 + 4/1) / 2 = (2 + 4) / 2 = 3.0
    assert_close(tm, torch.tensor(2.5))
    assert_close(sm, torch.tensor(3.0))
    assert_close(sm - tm, torch.tensor(0.5))  # the short sequence's token weighs 1/2, not 1/4
    assert_close(aggregate(per_token, mask, "seq-mean-token-sum"), torch.tensor(5.0))  # (6 + 4) / 2
    # sum-norm: 10 / (N * T) = 10 / 6; with max_len 5: 10 / (2 * 5) = 1
    assert_close(aggregate(per_token, mask, "seq-mean-token-sum-norm"), torch.tensor(10 / 6))
    assert_close(aggregate(per_token, mask, "seq-mean-token-sum-norm", max_len=5), torch.tensor(1.0))


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                  "seq-mean-token-sum-norm"])
def test_aggregate_matches_reference(mode):
    gen = torch.Generator().manual_seed(0)
    mask = _random_mask(6, 8, gen)
    per_token = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    expected = torch.tensor(_ref_aggregate(per_token, mask, mode), dtype=torch.float64)
    assert_close(aggregate(per_token, mask, mode), expected)
    if mode == "seq-mean-token-sum-norm":
        expected = torch.tensor(_ref_aggregate(per_token, mask, mode, max_len=20), dtype=torch.float64)
        assert_close(aggregate(per_token, mask, mode, max_len=20), expected)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                  "seq-mean-token-sum-norm"])
def test_aggregate_all_masked_and_garbage(mode):
    x = torch.randn(3, 4, requires_grad=True)
    loss = aggregate(x, torch.zeros(3, 4), mode)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(x.grad, torch.zeros(3, 4))  # finite, zero gradient
    # an all-masked row contributes 0 but counts in N for the seq-mean modes
    per_token = torch.tensor([[2.0, 2.0], [float("inf"), float("nan")]])  # garbage on padding
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    expected = {"token-mean": 2.0, "seq-mean-token-mean": 1.0, "seq-mean-token-sum": 2.0,
                "seq-mean-token-sum-norm": 1.0}[mode]
    assert_close(aggregate(per_token, mask, mode), torch.tensor(expected))
    assert aggregate(torch.zeros(0, 4), torch.zeros(0, 4), mode).item() == 0.0  # empty batch


def test_aggregate_validation():
    with pytest.raises(ValueError, match="unknown aggregation 'bad'; valid: seq-mean-token-mean"):
        aggregate(torch.zeros(1, 2), torch.ones(1, 2), "bad")
    with pytest.raises(ValueError, match=r"\(N, T\)"):
        aggregate(torch.zeros(1, 2), torch.ones(1, 3), "token-mean")
    with pytest.raises(ValueError, match="max_len"):
        aggregate(torch.zeros(1, 2), torch.ones(1, 2), "seq-mean-token-sum-norm", max_len=0)


# ---------------------------------------------------------------- policy_loss

def _ref_policy_per_token(logp, old, adv, eps_low, eps_high, dual_clip):
    out = torch.zeros(logp.shape, dtype=torch.float64)
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            a = float(adv[i] if adv.dim() == 1 else adv[i, t])
            r = math.exp(float(logp[i, t]) - float(old[i, t]))
            clipped = min(max(r, 1 - eps_low), 1 + eps_high)
            loss = -min(r * a, clipped * a)
            if dual_clip is not None and a < 0:
                loss = min(loss, -dual_clip * a)
            out[i, t] = loss
    return out


def test_policy_loss_clip_higher_hand_picked():
    # ratios r = [0.7, 0.9, 1.25, 1.3] for A = +1 (row 0) and A = -1 (row 1); eps_low 0.2, eps_high 0.28
    ratios = torch.tensor([0.7, 0.9, 1.25, 1.3])
    logp = torch.log(ratios).repeat(2, 1).requires_grad_()
    old = torch.zeros(2, 4)
    adv = torch.tensor([1.0, -1.0])  # (N,) broadcast over T
    mask = torch.ones(2, 4)
    loss, m = policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    # A=+1: l = -min(r, clip(r, 0.8, 1.28)) = [-0.7, -0.9, -1.25, -1.28]   (1.3 clips high)
    # A=-1: l = max(r, clip(r, 0.8, 1.28))  = [0.8, 0.9, 1.25, 1.3]        (0.7 clips low)
    # token-mean = (-4.13 + 4.25) / 8 = 0.015
    assert_close(loss, torch.tensor(0.015))
    assert_close(m["clip_ratio/high"], torch.tensor(1 / 8))
    assert_close(m["clip_ratio/low"], torch.tensor(1 / 8))
    loss.backward()
    # dl/dlogp = -A r where unclipped, 0 where clipped; / 8 for token-mean
    expected = torch.tensor([[-0.7, -0.9, -1.25, 0.0], [0.0, 0.9, 1.25, 1.3]]) / 8
    assert_close(logp.grad, expected)
    # symmetric eps 0.2: r = 1.25 with A=+1 now clips high too
    _, m = policy_loss(logp.detach(), old, adv, mask, eps_low=0.2, eps_high=0.2)
    assert_close(m["clip_ratio/high"], torch.tensor(2 / 8))
    for v in m.values():
        assert v.dim() == 0 and not v.requires_grad


def test_policy_loss_dual_clip_hand_computed():
    # A = -1, ratios [4, 2, 0.5], c = 3: plain l = max(r, clip(r)) = [4, 2, 0.8]; dual: min(l, 3)
    logp = torch.log(torch.tensor([[4.0, 2.0, 0.5]])).requires_grad_()
    adv = torch.full((1, 3), -1.0)
    mask = torch.ones(1, 3)
    loss, m = policy_loss(logp, torch.zeros(1, 3), adv, mask, dual_clip=3.0)
    assert_close(loss, torch.tensor((3.0 + 2.0 + 0.8) / 3))  # 5.8 / 3
    assert_close(m["clip_ratio/dual"], torch.tensor(1 / 3))
    assert_close(m["clip_ratio/low"], torch.tensor(1 / 3))  # r = 0.5 < 0.8
    loss.backward()
    assert_close(logp.grad, torch.tensor([[0.0, 2.0 / 3, 0.0]]))  # dual- and low-clipped: no grad
    # without dual clip the r=4 token keeps its (unbounded) loss and gradient
    loss, m = policy_loss(logp.detach(), torch.zeros(1, 3), adv, mask)
    assert_close(loss, torch.tensor((4.0 + 2.0 + 0.8) / 3))
    assert "clip_ratio/dual" not in m


def test_policy_loss_approx_kl_hand_computed():
    # r = 2 on the only real token: (2 - 1) - ln 2 = 0.3068528; padding ignored
    logp = torch.tensor([[math.log(2.0), 5.0]])
    _, m = policy_loss(logp, torch.zeros(1, 2), torch.ones(1), torch.tensor([[1.0, 0.0]]))
    assert_close(m["approx_kl"], torch.tensor(1.0 - math.log(2.0)))


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("dual_clip", [None, 2.0])
@pytest.mark.parametrize("per_sequence", [False, True])
def test_policy_loss_matches_reference(agg, dual_clip, per_sequence):
    gen = torch.Generator().manual_seed(1)
    n, t = 6, 7
    mask = _random_mask(n, t, gen)
    old = torch.randn(n, t, generator=gen, dtype=torch.float64) - 2
    logp = old + 0.4 * torch.randn(n, t, generator=gen, dtype=torch.float64)
    adv = torch.randn((n,) if per_sequence else (n, t), generator=gen, dtype=torch.float64)
    loss, m = policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28, agg=agg, dual_clip=dual_clip)
    per_token = _ref_policy_per_token(logp, old, adv, 0.2, 0.28, dual_clip)
    expected = torch.tensor(_ref_aggregate(per_token, mask, agg), dtype=torch.float64)
    assert_close(loss, expected)
    # metrics against loops too
    full_adv = adv.unsqueeze(-1).expand(n, t) if per_sequence else adv
    low = high = kl = cnt = 0
    for i in range(n):
        for j in range(t):
            if mask[i, j]:
                r = math.exp(float(logp[i, j] - old[i, j]))
                a = float(full_adv[i, j])
                low += a < 0 and r < 0.8
                high += a > 0 and r > 1.28
                kl += (r - 1) - math.log(r)
                cnt += 1
    assert_close(m["clip_ratio/low"], torch.tensor(low / cnt, dtype=torch.float64))
    assert_close(m["clip_ratio/high"], torch.tensor(high / cnt, dtype=torch.float64))
    assert_close(m["approx_kl"], torch.tensor(kl / cnt, dtype=torch.float64))


def test_policy_loss_huge_log_ratios_stay_finite():
    logp = torch.tensor([[200.0, -200.0, 0.0, 1e4]], requires_grad=True)
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    for dual_clip in (None, 3.0):
        loss, m = policy_loss(logp, old, adv, mask, dual_clip=dual_clip)
        grad, = torch.autograd.grad(loss, logp)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert all(torch.isfinite(v) for v in m.values())
    # NaN / inf on padded positions (logp, old_logp or advantages) never reach loss or gradient
    logp = torch.tensor([[0.1, float("nan")]], requires_grad=True)
    old = torch.tensor([[0.0, float("-inf")]])
    loss, m = policy_loss(logp, old, torch.tensor([[1.0, float("nan")]]), torch.tensor([[1.0, 0.0]]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all() and logp.grad[0, 1] == 0


def test_policy_loss_all_masked_and_on_policy():
    logp = torch.randn(2, 3, requires_grad=True)
    loss, m = policy_loss(logp, logp.detach(), torch.ones(2), torch.zeros(2, 3))
    assert loss.item() == 0.0 and all(v.item() == 0.0 for v in m.values())
    # on-policy (r = 1): loss = -mean(A), gradient = -A / count (the REINFORCE gradient)
    adv = torch.tensor([2.0, -1.0])
    loss, m = policy_loss(logp, logp.detach(), adv, torch.ones(2, 3))
    assert_close(loss, torch.tensor(-(2.0 * 3 - 1.0 * 3) / 6))
    grad, = torch.autograd.grad(loss, logp)
    assert_close(grad, torch.tensor([[-2.0] * 3, [1.0] * 3]) / 6)
    assert m["approx_kl"].item() == 0.0 and m["clip_ratio/low"].item() == 0.0


def test_policy_loss_validation():
    args = (torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), torch.ones(1, 2))
    with pytest.raises(ValueError, match="eps_low"):
        policy_loss(*args, eps_low=-0.1)
    with pytest.raises(ValueError, match=r"eps_high.*eps_low"):
        policy_loss(*args, eps_low=0.3, eps_high=0.2)
    for bad in (1.0, 0.5):
        with pytest.raises(ValueError, match="dual_clip"):
            policy_loss(*args, dual_clip=bad)
    with pytest.raises(ValueError, match="unknown aggregation 'mean'; valid: "):
        policy_loss(*args, agg="mean")
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(3), torch.ones(1, 2))
    with pytest.raises(ValueError, match="must all be"):
        policy_loss(torch.zeros(1, 2), torch.zeros(1, 3), torch.ones(1), torch.ones(1, 2))


# ---------------------------------------------------------------- kl_penalty

def test_kl_penalty_hand_computed():
    logp = torch.log(torch.tensor([0.5, 0.25]))
    ref = torch.log(torch.tensor([0.25, 0.25]))
    # token 0: d = ln(0.25/0.5) = -ln 2 = -0.6931472
    #   k1 = -d = 0.6931472; k2 = d^2/2 = 0.2402265; k3 = e^d - d - 1 = 0.5 + 0.6931472 - 1 = 0.1931472
    # token 1: d = 0 -> all three 0
    assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([0.6931472, 0.0]))
    assert_close(kl_penalty(logp, ref, "k2"), torch.tensor([0.2402265, 0.0]))
    assert_close(kl_penalty(logp, ref, "k3"), torch.tensor([0.1931472, 0.0]))
    assert_close(kl_penalty(logp, ref), kl_penalty(logp, ref, "k3"))  # default


def test_kl_penalty_matches_reference():
    gen = torch.Generator().manual_seed(3)
    logp = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    ref = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    for kind in ("k1", "k2", "k3"):
        expected = torch.empty(4, 5, dtype=torch.float64)
        for i in range(4):
            for t in range(5):
                d = float(ref[i, t] - logp[i, t])
                expected[i, t] = {"k1": -d, "k2": d * d / 2, "k3": math.exp(d) - d - 1}[kind]
        assert_close(kl_penalty(logp, ref, kind), expected)


def test_kl_penalty_k3_is_unbiased_and_clamped():
    # k1 and k3 are unbiased for KL(p || ref) with samples x ~ p; check k3 against the exact KL
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    ref = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    exact = (p * (p / ref).log()).sum()
    for kind in ("k1", "k3"):
        est = (p * kl_penalty(p.log(), ref.log(), kind)).sum()  # expectation under p
        assert_close(est, exact)
    # huge differences stay finite, k3 >= 0, and gradients are finite
    logp = torch.tensor([-500.0, 500.0, 0.0], requires_grad=True)
    k3 = kl_penalty(logp, torch.zeros(3), "k3")
    assert torch.isfinite(k3).all() and (k3 >= 0).all()
    k3.sum().backward()
    assert torch.isfinite(logp.grad).all()
    # d clamped to 20: exp(20) - 20 - 1
    assert_close(k3[0].detach(), torch.tensor(math.exp(20.0) - 21.0))


def test_kl_penalty_validation():
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'; valid: k1, k2, k3"):
        kl_penalty(torch.zeros(2), torch.zeros(2), "k4")
    with pytest.raises(ValueError, match="same shape"):
        kl_penalty(torch.zeros(2), torch.zeros(3))


# ---------------------------------------------------------------- value_loss

def test_value_loss_hand_computed():
    values = torch.tensor([[1.0, 0.5, 7.0]], requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, m = value_loss(values, old, returns, mask, clip=0.2)
    # token 0: unclipped (1 - 2)^2 = 1; clipped V = 0.5 + clamp(0.5, +-0.2) = 0.7 -> (0.7 - 2)^2 = 1.69
    #          max = 1.69 (clipped strictly larger)
    # token 1: V = V_old: both (0.5 - 0)^2 = 0.25
    # loss = 0.5 * (1.69 + 0.25) / 2 = 0.485
    assert_close(loss, torch.tensor(0.485))
    assert_close(m["value/clip_ratio"], torch.tensor(0.5))
    loss.backward()
    # token 0: clipped branch wins -> zero gradient; token 1: 0.5 * 2 * (0.5 - 0) / 2 = 0.25
    assert_close(values.grad, torch.tensor([[0.0, 0.25, 0.0]]))
    # unclipped: 0.5 * (1 + 0.25) / 2 = 0.3125
    loss0, m0 = value_loss(values.detach(), old, returns, mask, clip=0.0)
    assert_close(loss0, torch.tensor(0.3125))
    assert m0["value/clip_ratio"].item() == 0.0


@pytest.mark.parametrize("clip", [0.0, 0.1, 0.5])
def test_value_loss_matches_reference(clip):
    gen = torch.Generator().manual_seed(4)
    n, t = 5, 6
    mask = _random_mask(n, t, gen)
    old = torch.randn(n, t, generator=gen, dtype=torch.float64)
    values = old + 0.5 * torch.randn(n, t, generator=gen, dtype=torch.float64)
    returns = torch.randn(n, t, generator=gen, dtype=torch.float64)
    loss, m = value_loss(values, old, returns, mask, clip=clip)
    total, clipped_count, count = 0.0, 0, 0
    for i in range(n):
        for j in range(t):
            if mask[i, j]:
                v, vo, r = float(values[i, j]), float(old[i, j]), float(returns[i, j])
                unclipped = (v - r) ** 2
                term = unclipped
                if clip > 0:
                    clipped = (vo + min(max(v - vo, -clip), clip) - r) ** 2
                    term = max(unclipped, clipped)
                    clipped_count += clipped > unclipped
                total += term
                count += 1
    assert_close(loss, torch.tensor(0.5 * total / count, dtype=torch.float64))
    assert_close(m["value/clip_ratio"], torch.tensor(clipped_count / count, dtype=torch.float64))


def test_value_loss_edge_cases():
    values = torch.randn(2, 3, requires_grad=True)
    loss, m = value_loss(values, torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3))
    assert loss.item() == 0.0 and m["value/clip_ratio"].item() == 0.0
    garbage = torch.tensor([[1.0, float("nan")]], requires_grad=True)
    loss, _ = value_loss(garbage, torch.tensor([[1.0, float("inf")]]), torch.tensor([[0.0, float("nan")]]),
                         torch.tensor([[1.0, 0.0]]))
    loss.backward()
    assert_close(loss, torch.tensor(0.5))  # 0.5 * (1 - 0)^2
    assert torch.isfinite(garbage.grad).all()
    with pytest.raises(ValueError, match="must all be"):
        value_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 3), torch.ones(1, 2))


# ---------------------------------------------------------------- explained_variance

def test_explained_variance_hand_computed():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0, 99.0]])
    values = torch.tensor([[1.0, 2.0, 3.0, 5.0, -99.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    # residual [0, 0, 0, -1]: mean -0.25, var = (3 * 0.0625 + 0.5625) / 4 = 0.1875
    # returns [1, 2, 3, 4]: mean 2.5, var = (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25
    # 1 - 0.1875 / 1.25 = 0.85
    assert_close(explained_variance(values, returns, mask), torch.tensor(0.85))
    assert_close(explained_variance(returns, returns, mask), torch.tensor(1.0))


def test_explained_variance_matches_reference():
    gen = torch.Generator().manual_seed(5)
    mask = _random_mask(4, 6, gen)
    returns = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    values = returns + 0.3 * torch.randn(4, 6, generator=gen, dtype=torch.float64)
    r = [float(returns[i, t]) for i in range(4) for t in range(6) if mask[i, t]]
    res = [float(returns[i, t] - values[i, t]) for i in range(4) for t in range(6) if mask[i, t]]

    def var(xs):
        mu = sum(xs) / len(xs)
        return sum((x - mu) ** 2 for x in xs) / len(xs)

    expected = torch.tensor(1 - var(res) / var(r), dtype=torch.float64)
    assert_close(explained_variance(values, returns, mask), expected)


def test_explained_variance_degenerate():
    mask = torch.ones(1, 3)
    assert explained_variance(torch.zeros(1, 3), torch.full((1, 3), 2.0), mask).item() == 0.0
    assert explained_variance(torch.zeros(1, 3), torch.randn(1, 3), torch.zeros(1, 3)).item() == 0.0
    v = torch.randn(1, 3, requires_grad=True)
    assert not explained_variance(v, torch.randn(1, 3), mask).requires_grad


def test_explained_variance_of_returns_constant_up_to_round_off_is_zero():
    from rftlab.core import gae

    gen = torch.Generator().manual_seed(6)
    values = 1e-3 * torch.randn(4, 32, generator=gen)
    mask = torch.ones(4, 32)
    # All-zero rewards, gamma = lam = 1: returns = A + V telescope to 0 only up to float32 round-off.
    _, returns = gae(torch.zeros(4, 32), values, mask, 1.0, 1.0)
    assert returns.abs().max() < 1e-6
    assert explained_variance(values, returns, mask).item() == 0.0  # not 1 - var(V) / ~1e-20
    # Scale-free: tiny returns that really vary are still explained.
    tiny = 1e-6 * torch.randn(4, 32, generator=gen, dtype=torch.float64)
    assert_close(explained_variance(tiny, tiny, mask), torch.tensor(1.0, dtype=torch.float64))
    noisy = 1e-6 * torch.randn(1, 3, generator=gen) + 1.0
    assert explained_variance(torch.ones(1, 3), noisy, torch.ones(1, 3)).item() == 0.0
