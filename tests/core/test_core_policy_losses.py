"""gspo, gspo_token, cispo, sapo, gmpo (rftlab.core.policy_losses)."""

import math

import pytest
import torch
from torch.testing import assert_close

import rftlab.core.policy_losses  # noqa: F401  (registers the five losses)
from rftlab.core import POLICY_LOSS_CONTRACT, POLICY_LOSSES, aggregate, call_plugin, check_plugin_options, policy_loss
from rftlab.core.policy_losses import cispo_loss, gmpo_loss, gspo_loss, gspo_token_loss, sapo_loss

NAMES = ("gspo", "gspo_token", "cispo", "sapo", "gmpo")
TOKEN_LEVEL = ("gspo_token", "cispo", "sapo")  # take the algorithm's ``agg``
AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
SUPPLIED = ("eps_low", "eps_high", "dual_clip", "agg", "max_len")  # GRPO.loss_inputs
NAN = float("nan")
METRIC_KEYS = {
    "gspo": {"clip_ratio/low", "clip_ratio/high", "gspo/seq_ratio_mean", "approx_kl"},
    "gspo_token": {"clip_ratio/low", "clip_ratio/high", "gspo/seq_ratio_mean", "approx_kl"},
    "cispo": {"cispo/truncated_share", "cispo/weight_mean", "approx_kl"},
    "sapo": {"sapo/gate_weight_mean", "approx_kl"},
    "gmpo": {"clip_ratio/low", "clip_ratio/high", "gmpo/seq_ratio_mean", "approx_kl"},
}


def _call(name, logp, old, adv, mask, agg="seq-mean-token-mean", **options):
    fn = POLICY_LOSSES.get(name)
    return fn(logp, old, adv, mask, agg=agg, **options) if name in TOKEN_LEVEL else fn(logp, old, adv, mask, **options)


def _random_inputs(seed, per_sequence, fractional=False, n=6, t=7, scale=0.3):
    """Right-padded batch with an all-masked row and NaN/-inf garbage on every padded position."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (n,), generator=gen)
    lengths[0], lengths[1] = t, 0  # a full row and an all-masked row
    real = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
    mask = real.double()
    if fractional:  # a float loss mask: weights in [0.5, 1.5) on real tokens
        mask = torch.where(real, 0.5 + torch.rand(n, t, generator=gen, dtype=torch.float64), mask)
    old = torch.randn(n, t, generator=gen, dtype=torch.float64) - 2.0
    logp = old + scale * torch.randn(n, t, generator=gen, dtype=torch.float64)
    logp[~real] = NAN
    old[~real] = -math.inf
    if per_sequence:
        adv = torch.randn(n, generator=gen, dtype=torch.float64)
    else:
        adv = torch.randn(n, t, generator=gen, dtype=torch.float64)
        adv[~real] = NAN
    return logp, old, adv, mask


# ---------------------------------------------------------------- slow references (loops + autograd)

def _tokens(mask, i):
    return [(t, float(mask[i, t])) for t in range(mask.shape[1]) if mask[i, t] != 0]


def _a(adv, i, t):
    return adv[i] if adv.dim() == 1 else adv[i, t]


def _row_adv(adv, mask, i):
    toks = _tokens(mask, i)
    if adv.dim() == 1:
        return float(adv[i])
    return sum(m * float(adv[i, t]) for t, m in toks) / sum(m for _, m in toks)


def _clip(x, lo, hi):
    # clip with a constant (gradient-free) bound when it binds
    value = float(x.detach()) if isinstance(x, torch.Tensor) else x
    if lo is not None and value < lo:
        return lo
    if hi is not None and value > hi:
        return hi
    return x


def _ref_agg(rows, n, t_len, mode):
    """rows: per row a list of (weight, per-token loss term)."""
    zero = torch.zeros((), dtype=torch.float64)
    total = sum((m * l for row in rows for m, l in row), zero)
    weight = sum(m for row in rows for m, _ in row)
    if mode == "token-mean":
        return total / weight if weight else zero
    if mode == "seq-mean-token-mean":
        return sum((sum((m * l for m, l in row), zero) / sum(m for m, _ in row) for row in rows if row), zero) / n
    if mode == "seq-mean-token-sum":
        return total / n
    return total / (n * t_len)


def _ref_gspo(logp, old, adv, mask, low=3e-4, high=4e-4):
    n = logp.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    for i in range(n):
        toks = _tokens(mask, i)
        if not toks:
            continue
        w = sum(m for _, m in toks)
        s = torch.exp(sum(m * (logp[i, t] - old[i, t]) for t, m in toks) / w)
        a = _row_adv(adv, mask, i)
        total = total - min(s * a, _clip(s, 1 - low, 1 + high) * a)
    return total / n


def _ref_gspo_token(logp, old, adv, mask, agg, low=3e-4, high=4e-4):
    rows = []
    for i in range(logp.shape[0]):
        toks = _tokens(mask, i)
        row = []
        if toks:
            w = sum(m for _, m in toks)
            s_value = math.exp(sum(m * float(logp[i, t].detach() - old[i, t]) for t, m in toks) / w)
            for t, m in toks:
                s = s_value * torch.exp(logp[i, t] - logp[i, t].detach())  # sg[s_i] * pi / sg[pi]
                a = _a(adv, i, t)
                row.append((m, -min(s * a, _clip(s, 1 - low, 1 + high) * a)))
        rows.append(row)
    return _ref_agg(rows, *logp.shape, agg)


def _ref_cispo(logp, old, adv, mask, agg, low=None, high=4.0):
    rows = []
    for i in range(logp.shape[0]):
        row = []
        for t, m in _tokens(mask, i):
            r = math.exp(float(logp[i, t].detach() - old[i, t]))
            w = _clip(r, None if low is None else 1 - low, 1 + high)
            row.append((m, -w * _a(adv, i, t) * logp[i, t]))
        rows.append(row)
    return _ref_agg(rows, *logp.shape, agg)


def _ref_sapo(logp, old, adv, mask, agg, tau_pos=1.0, tau_neg=1.05):
    rows = []
    for i in range(logp.shape[0]):
        row = []
        for t, m in _tokens(mask, i):
            r = torch.exp(logp[i, t] - old[i, t])
            a = _a(adv, i, t)
            tau = tau_pos if a > 0 else tau_neg
            gate = 1.0 / (1.0 + torch.exp(-tau * (r - 1.0)))
            row.append((m, -(4.0 / tau) * gate * a))
        rows.append(row)
    return _ref_agg(rows, *logp.shape, agg)


def _ref_gmpo(logp, old, adv, mask, low=0.4, high=0.4):
    n = logp.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    for i in range(n):
        toks = _tokens(mask, i)
        if not toks:
            continue
        a = _row_adv(adv, mask, i)
        u_sum = 0.0
        for t, m in toks:
            lr = logp[i, t] - old[i, t]
            if a > 0:
                u = _clip(lr, None, high)   # only the cap binds when the objective wants r up
            elif a < 0:
                u = _clip(lr, -low, None)   # only the floor binds when it wants r down
            else:
                u = 0.0
            u_sum = u_sum + m * u
        total = total - a * torch.exp(torch.as_tensor(u_sum / sum(m for _, m in toks), dtype=torch.float64))
    return total / n


def _ref_metrics(name, logp, old, adv, mask, options):
    n, t_len = logp.shape
    weight = kl = 0.0
    clip_low = clip_high = 0.0  # token-weighted (gspo_token, gmpo) or row counts (gspo)
    trunc = w_sum = gate_w = 0.0
    seq_ratios, rows_low, rows_high = [], 0, 0
    for i in range(n):
        toks = _tokens(mask, i)
        if not toks:
            continue
        w_row = sum(m for _, m in toks)
        seq_lr = sum(m * float(logp[i, t] - old[i, t]) for t, m in toks) / w_row
        a_row = _row_adv(adv, mask, i)
        if name == "gspo":
            low, high = options.get("seq_eps_low", 3e-4), options.get("seq_eps_high", 4e-4)
            s = math.exp(seq_lr)
            rows_low += a_row < 0 and s < 1 - low
            rows_high += a_row > 0 and s > 1 + high
        for t, m in toks:
            lr = float(logp[i, t] - old[i, t])
            r = math.exp(lr)
            a = float(_a(adv, i, t))
            weight += m
            kl += m * ((r - 1) - lr)
            if name == "gspo_token":
                low, high = options.get("seq_eps_low", 3e-4), options.get("seq_eps_high", 4e-4)
                s = math.exp(seq_lr)
                clip_low += m * (a < 0 and s < 1 - low)
                clip_high += m * (a > 0 and s > 1 + high)
            elif name == "gmpo":
                low, high = options.get("log_eps_low", 0.4), options.get("log_eps_high", 0.4)
                clip_low += m * (a_row < 0 and lr < -low)
                clip_high += m * (a_row > 0 and lr > high)
            elif name == "cispo":
                lo = options.get("is_eps_low")
                w = min(r, 1 + options.get("is_eps_high", 4.0))
                w = max(w, 1 - lo) if lo is not None else w
                trunc += m * (w != r)
                w_sum += m * w
            elif name == "sapo":
                tau = options.get("tau_pos", 1.0) if a > 0 else options.get("tau_neg", 1.05)
                sig = 1 / (1 + math.exp(-tau * (r - 1)))
                gate_w += m * 4 * sig * (1 - sig)
        if name == "gmpo":
            low, high = options.get("log_eps_low", 0.4), options.get("log_eps_high", 0.4)
            us = []
            for t, m in toks:
                lr = float(logp[i, t] - old[i, t])
                us.append(m * (min(lr, high) if a_row > 0 else max(lr, -low) if a_row < 0 else 0.0))
            seq_ratios.append(math.exp(sum(us) / w_row))
        else:
            seq_ratios.append(math.exp(seq_lr))
    out = {"approx_kl": kl / weight}
    if name == "gspo":
        out.update({"clip_ratio/low": rows_low / len(seq_ratios), "clip_ratio/high": rows_high / len(seq_ratios)})
    if name in ("gspo_token", "gmpo"):
        out.update({"clip_ratio/low": clip_low / weight, "clip_ratio/high": clip_high / weight})
    if name in ("gspo", "gspo_token"):
        out["gspo/seq_ratio_mean"] = sum(seq_ratios) / len(seq_ratios)
    if name == "gmpo":
        out["gmpo/seq_ratio_mean"] = sum(seq_ratios) / len(seq_ratios)
    if name == "cispo":
        out.update({"cispo/truncated_share": trunc / weight, "cispo/weight_mean": w_sum / weight})
    if name == "sapo":
        out["sapo/gate_weight_mean"] = gate_w / weight
    return out


def _reference(name, logp, old, adv, mask, agg, options):
    if name == "gspo":
        return _ref_gspo(logp, old, adv, mask, options.get("seq_eps_low", 3e-4), options.get("seq_eps_high", 4e-4))
    if name == "gspo_token":
        return _ref_gspo_token(logp, old, adv, mask, agg, options.get("seq_eps_low", 3e-4),
                               options.get("seq_eps_high", 4e-4))
    if name == "cispo":
        return _ref_cispo(logp, old, adv, mask, agg, options.get("is_eps_low"), options.get("is_eps_high", 4.0))
    if name == "sapo":
        return _ref_sapo(logp, old, adv, mask, agg, options.get("tau_pos", 1.0), options.get("tau_neg", 1.05))
    return _ref_gmpo(logp, old, adv, mask, options.get("log_eps_low", 0.4), options.get("log_eps_high", 0.4))


# (name, agg, options): options chosen so that some, not all, rows/tokens are clipped or truncated
REFERENCE_CASES = [
    ("gspo", None, {}),
    ("gspo", None, {"seq_eps_low": 0.05, "seq_eps_high": 0.08}),
    *[("gspo_token", agg, {"seq_eps_low": 0.05, "seq_eps_high": 0.08}) for agg in AGGS],
    ("gspo_token", "seq-mean-token-mean", {}),
    *[("cispo", agg, {"is_eps_high": 0.3}) for agg in AGGS],
    ("cispo", "token-mean", {}),
    ("cispo", "token-mean", {"is_eps_low": 0.2, "is_eps_high": 0.25}),
    *[("sapo", agg, {}) for agg in AGGS],
    ("sapo", "seq-mean-token-mean", {"tau_pos": 3.0, "tau_neg": 6.0}),
    ("gmpo", None, {}),
    ("gmpo", None, {"log_eps_low": 0.1, "log_eps_high": 0.2}),
]


@pytest.mark.parametrize("name, agg, options", REFERENCE_CASES)
@pytest.mark.parametrize("per_sequence", [True, False])
@pytest.mark.parametrize("fractional", [False, True])
def test_matches_slow_reference_value_gradient_and_metrics(name, agg, options, per_sequence, fractional):
    base, old, adv, mask = _random_inputs(7, per_sequence, fractional, scale=0.5 if name == "gmpo" else 0.3)
    logp = base.clone().requires_grad_()
    loss, metrics = _call(name, logp, old, adv, mask, agg=agg, **options)
    grad, = torch.autograd.grad(loss, logp)
    ref_logp = base.clone().requires_grad_()
    expected = _reference(name, ref_logp, old, adv, mask, agg, options)
    expected_grad, = torch.autograd.grad(expected, ref_logp)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert_close(loss, expected)
    assert_close(grad, expected_grad)
    assert (grad[~(mask != 0)] == 0).all()
    assert set(metrics) == METRIC_KEYS[name]
    for key, value in _ref_metrics(name, base, old, adv, mask, options).items():
        assert_close(metrics[key], torch.tensor(value, dtype=torch.float64), msg=key)
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())


def test_reference_cases_exercise_clipping():
    # the options above must make the clip/truncation bind on some rows/tokens and not on others,
    # or the reference comparison would not test the clipped branches
    logp, old, adv, mask = _random_inputs(7, True)
    _, m = gspo_loss(logp, old, adv, mask, seq_eps_low=0.05, seq_eps_high=0.08)
    assert 0 < m["clip_ratio/low"] + m["clip_ratio/high"] < 1
    _, m = cispo_loss(logp, old, adv, mask, is_eps_high=0.3)
    assert 0 < m["cispo/truncated_share"] < 1
    glogp, gold, gadv, gmask = _random_inputs(7, True, scale=0.5)
    _, m = gmpo_loss(glogp, gold, gadv, gmask)
    assert 0 < m["clip_ratio/low"] + m["clip_ratio/high"] < 1


# ---------------------------------------------------------------- hand-computed cases

def _gspo_batch():
    # eps 0.2 / 0.2 so the numbers are readable; old_logp = 0 on real tokens, garbage on padding
    # row 0: log r = [ln 1.21, 0]    -> s = exp(ln(1.1)) = 1.1, A = +1: inside (0.8, 1.2) -> l = -1.1
    # row 1: log r = [ln 0.25, 0]    -> s = exp(ln(0.5)) = 0.5, A = -1: max(0.5, 0.8) = 0.8 (clipped low)
    # row 2: log r = [ln 8, 0, 0]    -> s = exp(ln(2))   = 2,   A = +2: max(-4, -2.4) = -2.4 (clipped high)
    # row 3: no real token, A = 5    -> 0
    logp = torch.tensor([[math.log(1.21), 0.0, NAN], [math.log(0.25), 0.0, NAN],
                         [math.log(8.0), 0.0, 0.0], [NAN, NAN, NAN]], dtype=torch.float64)
    old = torch.tensor([[0.0, 0.0, -math.inf], [0.0, 0.0, 7.0], [0.0, 0.0, 0.0], [NAN, 1.0, 2.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 1], [0, 0, 0]], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 2.0, 5.0], dtype=torch.float64)
    return logp, old, adv, mask


def test_gspo_hand_computed():
    base, old, adv, mask = _gspo_batch()
    logp = base.clone().requires_grad_()
    loss, m = gspo_loss(logp, old, adv, mask, seq_eps_low=0.2, seq_eps_high=0.2)
    assert_close(loss, torch.tensor(-0.675, dtype=torch.float64))  # (-1.1 + 0.8 - 2.4 + 0) / 4
    grad, = torch.autograd.grad(loss, logp)
    # only row 0 is unclipped: d(-A s)/dlogp_t = -A s / |y| = -1.1 / 2, then / N = 4 -> -0.1375
    expected = torch.zeros(4, 3, dtype=torch.float64)
    expected[0, :2] = -0.1375
    assert_close(grad, expected)
    assert_close(m["clip_ratio/low"], torch.tensor(1 / 3, dtype=torch.float64))   # row 1 of 3 real rows
    assert_close(m["clip_ratio/high"], torch.tensor(1 / 3, dtype=torch.float64))  # row 2
    assert_close(m["gspo/seq_ratio_mean"], torch.tensor(1.2, dtype=torch.float64))  # (1.1 + 0.5 + 2) / 3
    # k3 over the 7 real tokens: (0.21 - ln 1.21) + (-0.75 + ln 4) + (7 - ln 8), the r = 1 tokens give 0
    kl = (0.21 - math.log(1.21) + (-0.75 + math.log(4.0)) + 7.0 - math.log(8.0)) / 7
    assert_close(m["approx_kl"], torch.tensor(kl, dtype=torch.float64))
    # per-token advantages are reduced to the row's mean: same rows means -> same loss and gradient
    adv_tokens = torch.tensor([[0.5, 1.5, NAN], [-2.0, 0.0, NAN], [2.0, 2.0, 2.0], [NAN] * 3], dtype=torch.float64)
    loss2, _ = gspo_loss(logp, old, adv_tokens, mask, seq_eps_low=0.2, seq_eps_high=0.2)
    assert_close(loss2, loss)
    assert_close(torch.autograd.grad(loss2, logp)[0], expected)
    # paper defaults (3e-4 / 4e-4): every real row is now clipped -> (-1.0004 + 0.9997 - 2 * 1.0004) / 4
    loss3, m3 = gspo_loss(logp, old, adv, mask)
    assert_close(loss3, torch.tensor((-1.0004 + 0.9997 - 2.0008) / 4, dtype=torch.float64))
    assert torch.count_nonzero(torch.autograd.grad(loss3, logp)[0]) == 0
    assert_close(m3["clip_ratio/high"], torch.tensor(2 / 3, dtype=torch.float64))


def test_gspo_token_hand_computed():
    base, old, adv, mask = _gspo_batch()
    logp = base.clone().requires_grad_()
    # seq-mean-token-mean: each row's tokens all carry l_i, so the value is GSPO's -0.675
    loss, _ = gspo_token_loss(logp, old, adv, mask, agg="seq-mean-token-mean", seq_eps_low=0.2, seq_eps_high=0.2)
    assert_close(loss, torch.tensor(-0.675, dtype=torch.float64))
    # token-mean: per-token losses [-1.1, -1.1], [0.8, 0.8], [-2.4] * 3 -> -7.8 / 7
    loss, m = gspo_token_loss(logp, old, adv, mask, agg="token-mean", seq_eps_low=0.2, seq_eps_high=0.2)
    assert_close(loss, torch.tensor(-7.8 / 7, dtype=torch.float64))
    grad, = torch.autograd.grad(loss, logp)
    # d s_{i,t} / dlogp_t = s_i (its own log-prob only): row 0 tokens get -A s / 7 = -1.1 / 7
    expected = torch.zeros(4, 3, dtype=torch.float64)
    expected[0, :2] = -1.1 / 7
    assert_close(grad, expected)
    assert_close(m["clip_ratio/low"], torch.tensor(2 / 7, dtype=torch.float64))   # row 1's two tokens
    assert_close(m["clip_ratio/high"], torch.tensor(3 / 7, dtype=torch.float64))  # row 2's three tokens
    assert_close(m["gspo/seq_ratio_mean"], torch.tensor(1.2, dtype=torch.float64))
    # per-token advantages of opposite signs in one row (s = 1.1): [-1.1 * 1, -1.1 * -1] -> [-1.1, 1.1]
    logp1 = torch.tensor([[math.log(1.21), 0.0]], dtype=torch.float64, requires_grad=True)
    f64 = torch.float64
    loss, _ = gspo_token_loss(logp1, torch.zeros(1, 2, dtype=f64), torch.tensor([[1.0, -1.0]], dtype=f64),
                              torch.ones(1, 2, dtype=f64), agg="token-mean", seq_eps_low=0.2, seq_eps_high=0.2)
    assert_close(loss, torch.tensor(0.0, dtype=torch.float64))
    assert_close(torch.autograd.grad(loss, logp1)[0], torch.tensor([[-1.1 / 2, 1.1 / 2]], dtype=torch.float64))


def test_cispo_hand_computed_keeps_every_token_gradient():
    # row 0, A = +1: old = [.1, .2, .1, .1], r = [0.5, 1, 2, 8] -> logp = ln[.05, .2, .2, .8]
    # row 1, A = -1: old = [.5, .1], r = [0.5, 3] -> logp = ln[.25, .3]; two padded positions
    # default weights: min(r, 1 + 4) = [0.5, 1, 2, 5] and [0.5, 3]; 6 real tokens (token-mean)
    logp = torch.log(torch.tensor([[0.05, 0.2, 0.2, 0.8], [0.25, 0.3, 1.0, 1.0]], dtype=torch.float64))
    logp[1, 2:] = NAN
    logp.requires_grad_()
    old = torch.log(torch.tensor([[0.1, 0.2, 0.1, 0.1], [0.5, 0.1, 1.0, 1.0]], dtype=torch.float64))
    old[1, 2:] = -math.inf
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    loss, m = cispo_loss(logp, old, adv, mask, agg="token-mean")
    expected = (-(0.5 * math.log(0.05) + math.log(0.2) + 2 * math.log(0.2) + 5 * math.log(0.8))
                + (0.5 * math.log(0.25) + 3 * math.log(0.3))) / 6
    assert_close(loss, torch.tensor(expected, dtype=torch.float64))
    grad, = torch.autograd.grad(loss, logp)
    assert_close(grad, torch.tensor([[-0.5, -1.0, -2.0, -5.0], [0.5, 3.0, 0.0, 0.0]], dtype=torch.float64) / 6)
    assert_close(m["cispo/truncated_share"], torch.tensor(1 / 6, dtype=torch.float64))  # r = 8 only
    assert_close(m["cispo/weight_mean"], torch.tensor(2.0, dtype=torch.float64))  # (0.5+1+2+5+0.5+3) / 6
    # with both bounds (0.8, 1.2): weights [0.8, 1, 1.2, 1.2] and [0.8, 1.2]; every token still has a
    # gradient, where ppo_clip with the same range drops r = 2, 8 (A > 0) and r = 0.5 (A < 0)
    loss, m = cispo_loss(logp, old, adv, mask, agg="token-mean", is_eps_low=0.2, is_eps_high=0.2)
    grad, = torch.autograd.grad(loss, logp)
    assert_close(grad, torch.tensor([[-0.8, -1.0, -1.2, -1.2], [0.8, 1.2, 0.0, 0.0]], dtype=torch.float64) / 6)
    assert_close(m["cispo/truncated_share"], torch.tensor(5 / 6, dtype=torch.float64))
    ppo, _ = policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.2)
    ppo_grad, = torch.autograd.grad(ppo, logp)
    assert ppo_grad[0, 2] == 0 and ppo_grad[0, 3] == 0 and ppo_grad[1, 0] == 0


def test_sapo_hand_computed():
    # tau_pos = 1, tau_neg = 2; ratios chosen so the sigmoid is 3/4 or 1/4:
    # row 0, A = +2: r = [1 + ln 3, 1] -> sigmoid(ln 3) = 0.75, sigmoid(0) = 0.5
    #   f = 4 * [0.75, 0.5] = [3, 2] -> l = -2 f = [-6, -4]
    # row 1, A = -1: r = [1 - ln(3)/2] -> sigmoid(2 * -ln(3)/2) = 0.25, f = 0.25 * 4 / 2 = 0.5 -> l = +0.5
    ln3 = math.log(3.0)
    logp = torch.tensor([[math.log(1 + ln3), 0.0], [math.log(1 - ln3 / 2), NAN]], dtype=torch.float64,
                        requires_grad=True)
    old = torch.tensor([[0.0, 0.0], [0.0, NAN]], dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.float64)
    adv = torch.tensor([2.0, -1.0], dtype=torch.float64)
    loss, m = sapo_loss(logp, old, adv, mask, agg="seq-mean-token-mean", tau_pos=1.0, tau_neg=2.0)
    assert_close(loss, torch.tensor(((-6 - 4) / 2 + 0.5) / 2, dtype=torch.float64))  # -2.25
    grad, = torch.autograd.grad(loss, logp)
    # dl/dlogp = -A * 4 sigmoid (1 - sigmoid) * r; weights 0.75, 1, 0.75; / |y_i| / N
    expected = torch.tensor([[-2 * 0.75 * (1 + ln3) / 4, -2 * 1.0 / 4], [0.75 * (1 - ln3 / 2) / 2, 0.0]],
                            dtype=torch.float64)
    assert_close(grad, expected)
    assert_close(m["sapo/gate_weight_mean"], torch.tensor(2.5 / 3, dtype=torch.float64))
    loss, _ = sapo_loss(logp, old, adv, mask, agg="token-mean", tau_pos=1.0, tau_neg=2.0)
    assert_close(loss, torch.tensor((-6 - 4 + 0.5) / 3, dtype=torch.float64))
    # defaults 1.0 / 1.05: the negative row's gate is sigmoid(1.05 (r - 1)) * 4 / 1.05
    loss, _ = sapo_loss(logp, old, adv, mask, agg="token-mean")
    r1 = 1 - ln3 / 2
    neg = 4 / 1.05 / (1 + math.exp(-1.05 * (r1 - 1)))
    assert_close(loss, torch.tensor((-6 - 4 + neg) / 3, dtype=torch.float64))
    # A = 0 takes tau_neg: no loss or gradient, but it sets the reported gate weight
    # r = 1 + ln(3)/2 with tau_neg = 2 -> sigmoid(ln 3) = 0.75 -> weight 0.75 (tau_pos = 1 would give
    # 4 sigmoid(ln(3)/2) (1 - sigmoid(ln(3)/2)) = 4 * 0.634 * 0.366 = 0.928)
    f64 = torch.float64
    zero = sapo_loss(torch.tensor([[math.log(1 + ln3 / 2)]], dtype=f64), torch.zeros(1, 1, dtype=f64),
                     torch.zeros(1, dtype=f64), torch.ones(1, 1, dtype=f64), tau_pos=1.0, tau_neg=2.0)
    assert zero[0].item() == 0.0
    assert_close(zero[1]["sapo/gate_weight_mean"], torch.tensor(0.75, dtype=torch.float64))


def test_gmpo_hand_computed():
    # log_eps 0.4 / 0.4
    # row 0, A = +1, log r = [0.6, -0.6, 0.3]: cap only -> [0.4, -0.6, 0.3], mean 0.1/3, R = e^(1/30)
    # row 1, A = -2, log r = [0.6, -0.6]:      floor only -> [0.6, -0.4], mean 0.1, R = e^0.1
    # row 2: no real token
    # loss = (-e^(1/30) + 2 e^0.1) / 3
    logp = torch.tensor([[0.6, -0.6, 0.3], [0.6, -0.6, NAN], [NAN, NAN, NAN]], dtype=torch.float64,
                        requires_grad=True)
    old = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, -math.inf], [NAN, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.float64)
    adv = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    loss, m = gmpo_loss(logp, old, adv, mask)
    r0, r1 = math.exp(1 / 30), math.exp(0.1)
    assert_close(loss, torch.tensor((-r0 + 2 * r1) / 3, dtype=torch.float64))
    grad, = torch.autograd.grad(loss, logp)
    # dR/dlogp_t = R / |y| on unclipped tokens: row 0 -> -A R0 / 3 / N, row 1 -> -A R1 / 2 / N
    expected = torch.tensor([[0.0, -r0 / 9, -r0 / 9], [2 * r1 / 6, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    assert_close(grad, expected)
    assert_close(m["clip_ratio/high"], torch.tensor(1 / 5, dtype=torch.float64))  # row 0, log r = 0.6
    assert_close(m["clip_ratio/low"], torch.tensor(1 / 5, dtype=torch.float64))   # row 1, log r = -0.6
    assert_close(m["gmpo/seq_ratio_mean"], torch.tensor((r0 + r1) / 2, dtype=torch.float64))
    kl = sum(math.exp(x) - 1 - x for x in (0.6, -0.6, 0.3, 0.6, -0.6)) / 5
    assert_close(m["approx_kl"], torch.tensor(kl, dtype=torch.float64))
    # per-token advantages reduce to the row mean (row 0: mean(0, 2, 1) = 1; row 1: mean(-4, 0) = -2)
    adv_tokens = torch.tensor([[0.0, 2.0, 1.0], [-4.0, 0.0, NAN], [NAN] * 3], dtype=torch.float64)
    loss2, _ = gmpo_loss(logp, old, adv_tokens, mask)
    assert_close(loss2, loss)
    assert_close(torch.autograd.grad(loss2, logp)[0], expected)


# ---------------------------------------------------------------- cross-checks between losses

@pytest.mark.parametrize("fractional", [False, True])
@pytest.mark.parametrize("options", [{}, {"seq_eps_low": 0.05, "seq_eps_high": 0.08}])
def test_gspo_token_equals_gspo_with_sequence_advantages(fractional, options):
    base, old, adv, mask = _random_inputs(11, per_sequence=True, fractional=fractional)
    a = base.clone().requires_grad_()
    b = base.clone().requires_grad_()
    seq_loss, seq_m = gspo_loss(a, old, adv, mask, **options)
    tok_loss, tok_m = gspo_token_loss(b, old, adv, mask, agg="seq-mean-token-mean", **options)
    assert_close(tok_loss, seq_loss)
    grad_a, = torch.autograd.grad(seq_loss, a)
    grad_b, = torch.autograd.grad(tok_loss, b)
    assert_close(grad_b, grad_a)
    assert torch.count_nonzero(grad_a) > 0
    assert_close(tok_m["gspo/seq_ratio_mean"], seq_m["gspo/seq_ratio_mean"])
    # with huge log-ratios too (tokens beyond +-20 get zero gradient in both)
    huge = base.clone()
    huge[0, 0] = old[0, 0] + 100.0
    huge[2, 0] = old[2, 0] - 100.0
    a = huge.clone().requires_grad_()
    b = huge.clone().requires_grad_()
    seq_loss, _ = gspo_loss(a, old, adv, mask, **options)
    tok_loss, _ = gspo_token_loss(b, old, adv, mask, agg="seq-mean-token-mean", **options)
    assert_close(tok_loss, seq_loss)
    assert_close(torch.autograd.grad(tok_loss, b)[0], torch.autograd.grad(seq_loss, a)[0])


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("per_sequence", [True, False])
def test_cispo_on_policy_gradient_is_the_plain_policy_gradient(agg, per_sequence):
    base, _, adv, mask = _random_inputs(3, per_sequence)
    logp = base.clone().requires_grad_()
    loss, m = cispo_loss(logp, base.clone(), adv, mask, agg=agg)  # r == 1 on every real token
    grad, = torch.autograd.grad(loss, logp)
    # REINFORCE: the gradient of aggregate(-A logp), with NaN padding removed first
    real = mask != 0
    pg_logp = base.clone().requires_grad_()
    pg = aggregate(torch.where(real, -torch.nan_to_num(adv if adv.dim() == 2 else adv[:, None].expand_as(base))
                               * torch.where(real, pg_logp, 0.0), 0.0), mask, agg)
    expected, = torch.autograd.grad(pg, pg_logp)
    assert_close(grad, expected)
    assert torch.count_nonzero(grad) > 0
    assert m["cispo/truncated_share"] == 0 and m["cispo/weight_mean"] == 1 and m["approx_kl"] == 0


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("per_sequence", [True, False])
@pytest.mark.parametrize("taus", [{}, {"tau_pos": 0.5, "tau_neg": 4.0}])
def test_sapo_on_policy_gradient_equals_ppo_clip(agg, per_sequence, taus):
    base, _, adv, mask = _random_inputs(5, per_sequence)
    a = base.clone().requires_grad_()
    b = base.clone().requires_grad_()
    loss, m = sapo_loss(a, base.clone(), adv, mask, agg=agg, **taus)
    ppo, _ = policy_loss(b, base.clone(), adv, mask, agg=agg)
    grad_a, = torch.autograd.grad(loss, a)
    grad_b, = torch.autograd.grad(ppo, b)
    assert_close(grad_a, grad_b)
    assert torch.count_nonzero(grad_a) > 0
    assert_close(m["sapo/gate_weight_mean"], torch.tensor(1.0, dtype=torch.float64))  # 4 * 1/2 * 1/2


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("adv_kind", ["random", "all-equal", "group-of-2"])
def test_on_policy_gradient_is_reinforce_for_every_loss(name, adv_kind):
    # At r = 1 nothing is clipped and every loss's gradient is -A grad(logp), averaged per sequence
    # then over rows (the paper aggregation of all five).
    base, _, adv, mask = _random_inputs(13, per_sequence=True)
    if adv_kind == "all-equal":
        adv = torch.full_like(adv, 0.7)
    elif adv_kind == "group-of-2":  # GRPO with G = 2 and rewards (1, 0): advantages +-1/sqrt(2)
        base, mask = base[:1].repeat(2, 1), mask[:1].repeat(2, 1)
        adv = torch.tensor([1.0, -1.0], dtype=torch.float64) / math.sqrt(2.0)
    logp = base.clone().requires_grad_()
    loss, _ = _call(name, logp, base.clone(), adv, mask)
    grad, = torch.autograd.grad(loss, logp)
    real = mask != 0
    counts = mask.sum(-1, keepdim=True).clamp_min(1.0)
    expected = torch.where(real, -adv[:, None] * mask / counts / mask.shape[0], 0.0)
    assert_close(grad, expected)
    if adv_kind == "group-of-2":  # the better completion's tokens go up, the worse one's down
        assert (grad[0][real[0]] < 0).all() and (grad[1][real[1]] > 0).all()
        if name in ("gspo", "gspo_token", "gmpo"):
            assert_close(loss, torch.tensor(0.0, dtype=torch.float64))  # -(A_0 + A_1) / 2 with s = 1


# ---------------------------------------------------------------- edge cases

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("per_sequence", [True, False])
def test_zero_advantages_give_zero_loss_and_gradient(name, per_sequence):
    base, old, adv, mask = _random_inputs(17, per_sequence)
    adv = torch.where(torch.isnan(adv), adv, torch.zeros_like(adv))  # keep the NaN padding
    logp = base.clone().requires_grad_()
    loss, m = _call(name, logp, old, adv, mask)
    grad, = torch.autograd.grad(loss, logp)
    assert loss.item() == 0.0
    assert torch.count_nonzero(grad) == 0
    assert all(torch.isfinite(v) for v in m.values())


@pytest.mark.parametrize("name", NAMES)
def test_all_masked_batch_gives_zero_and_finite_gradients(name):
    logp = torch.full((3, 4), NAN, requires_grad=True)
    old = torch.full((3, 4), -math.inf)
    adv = torch.full((3, 4), NAN)
    for agg in AGGS if name in TOKEN_LEVEL else (None,):
        loss, m = _call(name, logp, old, adv, torch.zeros(3, 4), agg=agg)
        grad, = torch.autograd.grad(loss, logp)
        assert loss.item() == 0.0
        assert torch.equal(grad, torch.zeros(3, 4))
        assert set(m) == METRIC_KEYS[name] and all(v.item() == 0.0 for v in m.values())
    # an empty batch too
    loss, _ = _call(name, torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, 4))
    assert loss.item() == 0.0


@pytest.mark.parametrize("name", NAMES)
def test_all_masked_rows_contribute_zero_but_count(name):
    # adding an all-masked row (with garbage) to a batch of N rows scales the row-mean losses by N/(N+1)
    logp = torch.tensor([[0.1, -0.05], [0.02, 0.0]], dtype=torch.float64)
    old = torch.zeros(2, 2, dtype=torch.float64)
    adv = torch.tensor([1.0, -0.5], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    opts = {"gspo": {"seq_eps_low": 0.2, "seq_eps_high": 0.2}, "gspo_token": {"seq_eps_low": 0.2, "seq_eps_high": 0.2}}
    loss, _ = _call(name, logp, old, adv, mask, **opts.get(name, {}))
    padded, _ = _call(name, torch.cat([logp, torch.full((1, 2), NAN, dtype=torch.float64)]),
                      torch.cat([old, torch.full((1, 2), NAN, dtype=torch.float64)]),
                      torch.cat([adv, torch.tensor([9.0], dtype=torch.float64)]),
                      torch.cat([mask, torch.zeros(1, 2, dtype=torch.float64)]), **opts.get(name, {}))
    assert loss.item() != 0.0
    assert_close(padded, loss * 2 / 3)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("per_sequence", [True, False])
def test_ratio_overflow_stays_finite(name, per_sequence):
    # logp - old_logp = +-100 (exp would overflow float32), both advantage signs, for every aggregation
    logp = torch.tensor([[100.0, -100.0, 0.0], [-100.0, 100.0, 1e4], [100.0, 0.0, 0.0]], requires_grad=True)
    old = torch.zeros(3, 3)
    adv = torch.tensor([1.0, -1.0, -2.0]) if per_sequence else torch.tensor([[1.0, -1.0, 2.0], [-1.0, 1.0, 3.0],
                                                                             [-2.0, -2.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    for agg in AGGS if name in TOKEN_LEVEL else (None,):
        loss, m = _call(name, logp, old, adv, mask, agg=agg)
        grad, = torch.autograd.grad(loss, logp)
        assert torch.isfinite(loss), agg
        assert torch.isfinite(grad).all(), agg
        assert all(torch.isfinite(v) for v in m.values()), agg


@pytest.mark.parametrize("name", TOKEN_LEVEL)
def test_per_token_losses_are_zero_on_padding(name, monkeypatch):
    # An aggregation registered by a user may multiply by the mask instead of selecting with it:
    # the per-token loss must then already be 0 (not NaN) on padded positions.
    from rftlab.core import AGGREGATIONS

    monkeypatch.setitem(AGGREGATIONS._entries, "test-multiply-by-mask",
                        lambda per_token, mask, max_len: (per_token * mask).sum() / mask.sum().clamp_min(1.0))
    base, old, adv, mask = _random_inputs(23, per_sequence=False)
    logp = base.clone().requires_grad_()
    loss, _ = _call(name, logp, old, adv, mask, agg="test-multiply-by-mask")
    grad, = torch.autograd.grad(loss, logp)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert_close(loss, _call(name, base, old, adv, mask, agg="token-mean")[0])


def test_losses_are_selected_through_call_plugin_with_supplied_inputs():
    # the algorithm offers its clip group and agg; each loss receives only the ones it names
    base, old, adv, mask = _random_inputs(19, per_sequence=True)
    supplied = {"eps_low": 0.2, "eps_high": 0.28, "dual_clip": None, "agg": "token-mean"}
    for name in NAMES:
        got, _ = call_plugin(POLICY_LOSSES.get(name), (base, old, adv, mask), supplied, {})
        direct, _ = _call(name, base, old, adv, mask, agg="token-mean")
        assert_close(got, direct)
    got, _ = call_plugin(POLICY_LOSSES.get("sapo"), (base, old, adv, mask), supplied, {"tau_neg": 3.0})
    assert_close(got, sapo_loss(base, old, adv, mask, agg="token-mean", tau_neg=3.0)[0])


# ---------------------------------------------------------------- options and validation

def test_registry_lists_the_five_losses():
    assert set(NAMES) <= set(POLICY_LOSSES.names())
    assert POLICY_LOSSES.get("gspo") is gspo_loss and POLICY_LOSSES.get("gmpo") is gmpo_loss


@pytest.mark.parametrize("name, option, value, rule", [
    ("gspo", "seq_eps_low", -1.0, r"must be in \[0, 1\)"),
    ("gspo", "seq_eps_low", 1.0, r"must be in \[0, 1\)"),
    ("gspo", "seq_eps_high", -0.1, "must be >= 0"),
    ("gspo_token", "seq_eps_low", -3e-4, r"must be in \[0, 1\)"),
    ("gspo_token", "seq_eps_high", -4e-4, "must be >= 0"),
    ("cispo", "is_eps_low", -0.1, "must be None"),
    ("cispo", "is_eps_high", -0.5, "must be >= 0"),
    ("sapo", "tau_pos", -1.0, "must be > 0"),
    ("sapo", "tau_pos", 0.0, "must be > 0"),
    ("sapo", "tau_neg", -1.05, "must be > 0"),
    ("gmpo", "log_eps_low", -0.4, "must be >= 0"),
    ("gmpo", "log_eps_high", -1.0, "must be >= 0"),
])
def test_option_range_checks(name, option, value, rule):
    fn = POLICY_LOSSES.get(name)
    message = rf"loss\.options\.{option}={value!r} is invalid: {rule}"
    with pytest.raises(ValueError, match=message):
        check_plugin_options(fn, "loss", name, POLICY_LOSS_CONTRACT, {option: value}, SUPPLIED, "loss.options")
    # direct callers are checked as well
    args = (torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), torch.ones(1, 2))
    with pytest.raises(ValueError, match=rf"{option}={value!r} is invalid"):
        fn(*args, **{option: value})


@pytest.mark.parametrize("name, options", [
    ("gspo", {}),
    ("gspo", {"seq_eps_low": 0.0, "seq_eps_high": 0.0}),
    ("gspo_token", {"seq_eps_high": 1e-3}),
    ("cispo", {"is_eps_low": None}),
    ("cispo", {"is_eps_low": 10.0, "is_eps_high": 0.2}),
    ("sapo", {"tau_pos": 2.0}),
    ("gmpo", {"log_eps_low": 0.0, "log_eps_high": 1.5}),
])
def test_valid_options_pass(name, options):
    check_plugin_options(POLICY_LOSSES.get(name), "loss", name, POLICY_LOSS_CONTRACT, options, SUPPLIED, "loss.options")


def test_option_names_types_and_supplied_inputs():
    def check(name, options):
        check_plugin_options(POLICY_LOSSES.get(name), "loss", name, POLICY_LOSS_CONTRACT, options, SUPPLIED,
                             "loss.options")

    with pytest.raises(ValueError, match=r"loss\.options\.eps_low is invalid: 'eps_low' is supplied by the algorithm"):
        check("gspo", {"eps_low": 0.1})
    with pytest.raises(ValueError, match=r"loss\.options\.agg is invalid: 'agg' is supplied"):
        check("cispo", {"agg": "token-mean"})
    with pytest.raises(ValueError, match=r"loss 'gmpo' takes no option 'clip'; its options: log_eps_high, log_eps_low"):
        check("gmpo", {"clip": 0.4})
    with pytest.raises(ValueError, match=r"its options: is_eps_high, is_eps_low$"):
        check("cispo", {"eps": 1.0})
    with pytest.raises(ValueError, match=r"loss\.options\.tau_pos='warm' is invalid: must be a finite number"):
        check("sapo", {"tau_pos": "warm"})
    with pytest.raises(ValueError, match=r"loss\.options\.is_eps_high=nan is invalid"):
        check("cispo", {"is_eps_high": NAN})


@pytest.mark.parametrize("name", NAMES)
def test_shape_and_aggregation_validation(name):
    fn = POLICY_LOSSES.get(name)
    with pytest.raises(ValueError, match="must all be"):
        fn(torch.zeros(1, 2), torch.zeros(1, 3), torch.ones(1), torch.ones(1, 2))
    with pytest.raises(ValueError, match="advantages"):
        fn(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(3), torch.ones(1, 2))
    if name in TOKEN_LEVEL:
        with pytest.raises(ValueError, match="unknown aggregation 'mean'"):
            fn(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), torch.ones(1, 2), agg="mean")
