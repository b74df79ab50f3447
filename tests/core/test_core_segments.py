"""Segment-level CoT RFT math: segments, segment rewards, TD targets, segment losses, exact KL."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from rftlab.core import (
    SEGMENT_RATIO_MODES,
    SegmentRewardParams,
    batch_segment_rewards,
    exact_kl,
    kl_penalty,
    segment_ids,
    segment_kl_loss,
    segment_policy_loss,
    segment_rewards,
    segment_spans,
    segment_sum,
    segment_value_loss,
    segment_value_targets,
    split_segments,
)

# ---------------------------------------------------------------- reference loops


def _ref_segment_rewards(G, S, P, r, alpha=1.5, delta=0.5, window=3, kappa_pos=1.0, kappa_neg=1.0, base=1.0,
                         progress_divisor=1.0, rho=2.0, alpha_1=2.0, alpha_2=1.0, r_max=1.0, eps_std=1e-8, whiten="none"):
    """The issue's formulas, literally, one segment at a time in Python floats (1-based k in comments)."""
    M = len(S)
    if M == 0:
        return [rho * r]
    mu = sum(S) / M
    sigma = math.sqrt(sum((s - mu) ** 2 for s in S) / M + eps_std)
    C = []
    for k in range(M):  # 0-based k is 1-based k + 1
        s_hat = (S[k] - mu) / sigma
        s_hat = alpha * s_hat if s_hat >= 0 else delta * s_hat
        if k == 0:
            p_bar = P[0]
        else:  # j = max(1, k-W) .. k-1 (1-based)  ==  max(0, k0-W) .. k0-1 (0-based)
            past = [P[j] for j in range(max(0, k - window), k)]
            p_bar = sum(past) / len(past)
        dp = P[k] - p_bar
        if dp > 0:
            E = math.sqrt(dp) * P[k] / kappa_pos
        elif dp < 0:
            E = -math.log(1 + abs(dp)) * (base - P[k]) / kappa_neg
        else:
            E = 0.0
        C.append(G + s_hat + E * S[k] / progress_divisor)
    if whiten == "chain":
        mu_c = sum(C) / M
        sigma_c = math.sqrt(sum((c - mu_c) ** 2 for c in C) / M + eps_std)
        C = [(c - mu_c) / sigma_c for c in C]
    return [min(max(c, -alpha_1 * r_max), r_max + alpha_2) for c in C] + [rho * r]


def _ref_policy_loss(logp, old, adv, seg, mask, mode, eps, dual_clip=None):
    n, t_len = logp.shape
    total = 0.0
    for i in range(n):
        tokens: dict[int, list[float]] = {}
        for t in range(t_len):
            if mask[i, t]:
                tokens.setdefault(int(seg[i, t]), []).append(float(logp[i, t] - old[i, t]))
        chain = 0.0
        for k, lrs in tokens.items():
            a = float(adv[i, k])
            if mode == "token":
                terms = []
                for lr in lrs:
                    r = math.exp(max(-20.0, min(20.0, lr)))
                    l_tok = max(-a * r, -a * min(max(r, 1 - eps), 1 + eps))
                    if dual_clip is not None and a < 0:
                        l_tok = min(l_tok, -dual_clip * a)
                    terms.append(l_tok)
                chain += sum(terms) / len(terms)
                continue
            lr = sum(lrs) if mode == "sum" else sum(lrs) / len(lrs)
            r = math.exp(max(-20.0, min(20.0, lr)))
            l_seg = max(-a * r, -a * min(max(r, 1 - eps), 1 + eps))
            if dual_clip is not None and a < 0:
                l_seg = min(l_seg, -dual_clip * a)
            chain += l_seg
        total += chain
    return total / n


# ---------------------------------------------------------------- segment rewards: hand-computed

S4 = [1.0, 0.5, 0.0, 0.5]
P4 = [0.25, 0.5, 0.25, 1.0]


def test_four_thought_segments_hand_computed():
    # Defaults: alpha 1.5, delta 0.5, W 3, kappa 1, B 1, lam 1, rho 2, alpha_1 2, alpha_2 1, eps_std 1e-8.
    # mu_S = (1 + 0.5 + 0 + 0.5) / 4 = 0.5; deviations [0.5, 0, -0.5, 0]
    # var = (0.25 + 0 + 0.25 + 0) / 4 = 0.125; sigma = sqrt(0.125 + 1e-8) = 0.35355340
    # S_hat = [1.4142135, 0, -1.4142135, 0] -> x alpha / delta -> [2.1213203, 0, -0.7071068, 0]
    # Pbar: k=1: P_1 = 0.25; k=2: mean(P_1) = 0.25; k=3: mean(0.25, 0.5) = 0.375;
    #       k=4: mean(0.25, 0.5, 0.25) = 1/3
    # dP = [0, 0.25, -0.125, 2/3]
    # E_1 = 0; E_2 = sqrt(0.25) * 0.5 = 0.25; E_3 = -log(1.125) * (1 - 0.25) = -0.1177830 * 0.75 = -0.0883373
    # E_4 = sqrt(2/3) * 1.0 = 0.8164966
    # m = S / lam = [1, 0.5, 0, 0.5]; Q = E m = [0, 0.125, 0, 0.4082483]
    # C = G + S_hat + Q with G = 1: [3.1213203, 1.125, 0.2928932, 1.4082483]
    # R = clamp(C, -2, 2) = [2.0, 1.125, 0.2928932, 1.4082483]; answer R_5 = rho * 1 = 2.0
    R = segment_rewards(1.0, torch.tensor(S4), torch.tensor(P4), 1.0)
    assert_close(R, torch.tensor([2.0, 1.125, 0.2928932, 1.4082483, 2.0]))
    # W = 2: Pbar_4 = mean(P_2, P_3) = 0.375, dP_4 = 0.625, E_4 = sqrt(0.625) = 0.7905694,
    # Q_4 = 0.3952847, C_4 = 1.3952847 (segments 1-3 are unchanged: their windows hold <= 2 values)
    R_w2 = segment_rewards(1.0, torch.tensor(S4), torch.tensor(P4), 1.0, window=2)
    assert_close(R_w2, torch.tensor([2.0, 1.125, 0.2928932, 1.3952847, 2.0]))
    # G = 0.5, wrong answer (r = 0), rho = 3: C = [2.6213203, 0.625, -0.2071068, 0.9082483]
    # R = [2.0 (clamped), 0.625, -0.2071068, 0.9082483, 3 * 0 = 0]
    R_half = segment_rewards(0.5, torch.tensor(S4), torch.tensor(P4), 0.0, rho=3.0)
    assert_close(R_half, torch.tensor([2.0, 0.625, -0.2071068, 0.9082483, 0.0]))


def test_lower_clamp_and_negative_progress_hand_computed():
    # S = [1, 1]: equal scores -> S_hat = [0, 0]. P = [1, 0]: Pbar_2 = 1, dP_2 = -1
    # E_2 = -log(1 + 1) * (B - P_2) / kappa_neg = -0.6931472 * 1 / 0.25 = -2.7725887; Q_2 = E_2 * 1
    # C = G + S_hat + Q = [0, -2.7725887] -> clamp at -alpha_1 * r_max = -2 -> R = [0, -2, rho * 0.5 = 1]
    R = segment_rewards(0.0, torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0]), 0.5, kappa_neg=0.25)
    assert_close(R, torch.tensor([0.0, -2.0, 1.0]))
    # base B = 0.5: E_2 = -0.6931472 * 0.5 / 0.25 = -1.3862944, inside the clamp range
    R_b = segment_rewards(0.0, torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0]), 0.5, kappa_neg=0.25, base=0.5)
    assert_close(R_b, torch.tensor([0.0, -1.3862944, 1.0]))
    # upper clamp with alpha_2 = 0: r_max + alpha_2 = 1 caps C_1 = 3.1213203 of the four-segment case
    R_cap = segment_rewards(1.0, torch.tensor(S4), torch.tensor(P4), 1.0, alpha_2=0.0)
    assert_close(R_cap[:2], torch.tensor([1.0, 1.0]))


def test_chain_whitening_removes_g_and_batch_whitening_keeps_it():
    S, P = torch.tensor(S4), torch.tensor(P4)
    r_lo = segment_rewards(0.0, S, P, 1.0, whiten="chain")
    r_hi = segment_rewards(1.0, S, P, 1.0, whiten="chain")
    assert_close(r_lo, r_hi)  # G is a constant of the chain: whitening subtracts it
    assert abs(float(r_lo[:-1].mean())) < 1.0  # centred thoughts (then clamped)
    # batch whitening across two chains that differ only in G keeps the difference (sign and size)
    R, mask = batch_segment_rewards(torch.tensor([0.0, 1.0]), [S, S], [P, P], torch.tensor([1.0, 1.0]),
                                    whiten="batch")
    assert (R[1, :4] > R[0, :4]).all()
    assert mask.tolist() == [[1] * 5, [1] * 5]


def test_reference_loop_random_chains():
    gen = torch.Generator().manual_seed(0)
    for trial in range(40):
        M = int(torch.randint(0, 7, (1,), generator=gen))
        S = torch.rand(M, generator=gen, dtype=torch.float64)
        P = torch.rand(M, generator=gen, dtype=torch.float64)
        G, r = float(torch.rand(1, generator=gen)), float(torch.rand(1, generator=gen)) * 2 - 0.5
        params = dict(window=1 + trial % 4, alpha=1.0 + trial % 3, delta=0.25, kappa_pos=0.5 + trial % 2,
                      kappa_neg=0.5, progress_divisor=0.8, rho=1.5, whiten=("none", "chain")[trial % 2])
        got = segment_rewards(torch.tensor(G, dtype=torch.float64), S, P, r, **params)
        expected = _ref_segment_rewards(G, S.tolist(), P.tolist(), r, **params)
        assert_close(got, torch.tensor(expected, dtype=torch.float64))


def test_batch_rewards_match_reference_and_pad():
    gen = torch.Generator().manual_seed(1)
    lengths = [3, 0, 5, 1]
    S = [torch.rand(m, generator=gen, dtype=torch.float64) for m in lengths]
    P = [torch.rand(m, generator=gen, dtype=torch.float64) for m in lengths]
    G = torch.rand(4, generator=gen, dtype=torch.float64)
    r = torch.tensor([1.0, 0.0, 1.0, 0.5], dtype=torch.float64)
    R, mask = batch_segment_rewards(G, S, P, r)
    assert R.shape == (4, 6) and mask.sum(1).tolist() == [4, 1, 6, 2]
    for i, m in enumerate(lengths):
        expected = _ref_segment_rewards(float(G[i]), S[i].tolist(), P[i].tolist(), float(r[i]))
        assert_close(R[i, : m + 1], torch.tensor(expected, dtype=torch.float64))
        assert (R[i, m + 1 :] == 0).all()
    # batch whitening: reference = z-score of all chains' C together, then clamp
    Rb, _ = batch_segment_rewards(G, S, P, r, whiten="batch")
    big_c = []
    for i in range(4):  # C before clamping: the reference with clamps opened wide
        big_c += _ref_segment_rewards(float(G[i]), S[i].tolist(), P[i].tolist(), 0.0, alpha_1=1e9, alpha_2=1e9)[:-1]
    mu = sum(big_c) / len(big_c)
    sd = math.sqrt(sum((c - mu) ** 2 for c in big_c) / len(big_c) + 1e-8)
    z = iter([(c - mu) / sd for c in big_c])
    for i, m in enumerate(lengths):
        expected = [min(max(next(z), -2.0), 2.0) for _ in range(m)] + [2.0 * float(r[i])]
        assert_close(Rb[i, : m + 1], torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize(
    "S, P",
    [
        ([0.7], [0.3]),                          # M = 1: sigma = sqrt(0 + eps), dP_1 = 0
        ([0.4, 0.4, 0.4, 0.4], [0.1, 0.5, 0.6, 0.9]),  # all S equal: S_hat = 0
        ([0.9, 0.2, 0.6, 0.3], [1.0, 0.8, 0.5, 0.2]),  # dP < 0 for every k > 1 (dP_1 = 0)
        ([0.5, 0.5], [0.5, 0.5]),                # dP = 0 everywhere
        ([0.3, 0.8], [0.2, 0.2 + 1e-7]),         # dP barely positive: large but finite sqrt slope
    ],
)
@pytest.mark.parametrize("whiten", ["none", "chain"])
def test_degenerate_inputs_give_finite_values_and_gradients(S, P, whiten):
    S = torch.tensor(S, requires_grad=True)
    P = torch.tensor(P, requires_grad=True)
    G = torch.tensor(0.5, requires_grad=True)
    R = segment_rewards(G, S, P, 1.0, whiten=whiten)
    assert torch.isfinite(R).all()
    (R * torch.arange(1.0, len(R) + 1)).sum().backward()
    for name, x in (("S", S), ("P", P), ("G", G)):
        assert x.grad is not None and torch.isfinite(x.grad).all(), (name, x.grad)
    expected = _ref_segment_rewards(0.5, S.tolist(), P.tolist(), 1.0, whiten=whiten)
    assert_close(R.detach(), torch.tensor(expected))


def test_equal_scores_and_single_segment_values():
    # M = 1: S_hat = 0 / sqrt(1e-8) = 0, dP_1 = 0 -> C_1 = G
    assert_close(segment_rewards(0.25, torch.tensor([0.9]), torch.tensor([0.4]), 1.0), torch.tensor([0.25, 2.0]))
    # M = 0: only the answer
    assert_close(segment_rewards(1.0, torch.zeros(0), torch.zeros(0), 0.5), torch.tensor([1.0]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(window=0), "window=0"), (dict(window=1.5), "window=1.5"), (dict(progress_divisor=0.0), "progress_divisor=0.0"),
        (dict(kappa_pos=-1.0), "kappa_pos"), (dict(kappa_neg=0.0), "kappa_neg"), (dict(eps_std=0.0), "eps_std"),
        (dict(alpha=0.0), "alpha=0.0"), (dict(delta=-0.1), "delta"), (dict(whiten="group"), "none, chain, batch"),
        (dict(rho=float("nan")), "rho"),
    ],
)
def test_bad_parameters_name_the_parameter(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SegmentRewardParams(**kwargs)
    with pytest.raises(ValueError, match=message):
        segment_rewards(1.0, torch.tensor([0.5]), torch.tensor([0.5]), 1.0, **kwargs)


def test_bad_inputs():
    with pytest.raises(ValueError, match="S must be in"):
        segment_rewards(1.0, torch.tensor([1.5]), torch.tensor([0.5]), 1.0)
    with pytest.raises(ValueError, match="same length"):
        segment_rewards(1.0, torch.tensor([0.5, 0.5]), torch.tensor([0.5]), 1.0)
    with pytest.raises(ValueError, match="batch_segment_rewards"):
        segment_rewards(1.0, torch.tensor([0.5]), torch.tensor([0.5]), 1.0, whiten="batch")
    with pytest.raises(TypeError):
        segment_rewards(1.0, torch.tensor([0.5]), torch.tensor([0.5]), 1.0, beta=1.0)


# ---------------------------------------------------------------- cutting text into segments

TEXT = "3 + 4 = 7.\n\n7 * 2 = 14\nAnswer: 14"


def test_segment_spans_hand_computed():
    # "3 + 4 = 7." is chars 0-9, its newline 10, the blank line 11 joins segment 1 -> [0, 12)
    # "7 * 2 = 14\n" is [12, 23); the answer line "Answer: 14" is [23, 33)
    assert segment_spans(TEXT) == [(0, 12), (12, 23), (23, 33)]
    assert split_segments(TEXT) == ["3 + 4 = 7.", "7 * 2 = 14", "Answer: 14"]
    assert segment_spans("\n\nfoo\nbar") == [(0, 6), (6, 9)]  # leading blank lines: first segment
    assert segment_spans("  \n") == [(0, 3)] and segment_spans("") == [(0, 0)]
    assert split_segments("just 14") == ["just 14"]


def test_segment_ids_hand_computed():
    # token starts: "3" 0, "." 9, "\n" 10 (ends line 1), "\n" 11 (blank line), "7" 12, "\n" 22 (ends line 2),
    # "Answer" 23, " 14" 31, EOS at len(text) = 33 -> after the text: the answer segment
    starts = [0, 9, 10, 11, 12, 22, 23, 31, 33]
    ids, k = segment_ids([(s, s + 1) for s in starts], TEXT)
    assert k == 3
    assert ids.tolist() == [0, 0, 0, 0, 1, 1, 2, 2, 2]


def test_segment_ids_with_the_real_tokenizer_cover_every_token_once(tokenizer):
    text = "Tom has 5 apples.\n5 + 3 = 8.\n\n  8 - 2 = 6\nAnswer: 6"
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = list(enc["offset_mapping"]) + [(len(text), len(text))]  # + EOS
    ids, k = segment_ids(offsets, text)
    spans = segment_spans(text)
    assert k == 4 and len(ids) == len(offsets)
    assert torch.bincount(ids, minlength=k).sum() == len(offsets)  # every token exactly once
    assert (ids[1:] >= ids[:-1]).all()
    for (start, _), seg in zip(offsets[:-1], ids.tolist()):
        lo, hi = spans[seg]
        assert lo <= start < hi  # the segment holds the token's first character
    answer_tokens = [i for i, (s, _) in enumerate(offsets) if s >= text.index("Answer")]
    assert all(ids[i] == k - 1 for i in answer_tokens) and ids[-1] == k - 1  # answer and EOS: last


# ---------------------------------------------------------------- sums and TD targets


def test_segment_sum_hand_and_padding_garbage():
    x = torch.tensor([[1.0, 2.0, 3.0, float("nan")], [4.0, 5.0, 6.0, 7.0]])
    seg = torch.tensor([[0, 0, 1, 99], [0, 1, 1, 2]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    # chain 1: seg 0 = 1 + 2 = 3, seg 1 = 3, the NaN on padding is dropped; chain 2: 4, 5 + 6, 7
    assert_close(segment_sum(x, seg, mask, 3), torch.tensor([[3.0, 3.0, 0.0], [4.0, 11.0, 7.0]]))
    with pytest.raises(ValueError, match="segment_index must be in"):
        segment_sum(x, seg, torch.ones(2, 4), 3)


def test_segment_value_targets_hand_computed():
    R = torch.tensor([[1.0, 0.5, 2.0], [0.2, 3.0, 0.0]])
    V = torch.tensor([[0.1, 0.4, 0.7], [0.9, 0.3, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # gamma 0.5. chain 1: Y1 = 1 + 0.5 * 0.4 = 1.2; Y2 = 0.5 + 0.5 * 0.7 = 0.85; Y3 = 2 + 0 (terminal) = 2
    # chain 2: Y1 = 0.2 + 0.5 * 0.3 = 0.35; Y2 = 3 + 0 (terminal; the 99 is padding) = 3; Y3 = 0 (padding)
    Y = segment_value_targets(R, V, mask, gamma=0.5)
    assert_close(Y, torch.tensor([[1.2, 0.85, 2.0], [0.35, 3.0, 0.0]]))
    with pytest.raises(ValueError, match="gamma"):
        segment_value_targets(R, V, mask, gamma=1.5)


def test_segment_value_targets_lambda_hand_computed():
    R = torch.tensor([[1.0, 0.5, 2.0], [0.2, 3.0, 0.0]])
    V = torch.tensor([[0.1, 0.4, 0.7], [0.9, 0.3, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # gamma 1, lambda 0.5: Y_k = R_k + 0.5 V_{k+1} + 0.5 Y_{k+1}, from the end.
    # chain 1: Y3 = 2; Y2 = 0.5 + 0.5 * 0.7 + 0.5 * 2 = 1.85; Y1 = 1 + 0.5 * 0.4 + 0.5 * 1.85 = 2.125
    # chain 2: Y2 = 3 (terminal); Y1 = 0.2 + 0.5 * 0.3 + 0.5 * 3 = 1.85; Y3 = 0 (padding)
    Y = segment_value_targets(R, V, mask, gamma=1.0, td_lambda=0.5)
    assert_close(Y, torch.tensor([[2.125, 1.85, 2.0], [1.85, 3.0, 0.0]]))
    # lambda 1: the Monte-Carlo return, V unused: chain 1: 3.5, 2.5, 2; chain 2: 3.2, 3
    Y = segment_value_targets(R, V, mask, gamma=1.0, td_lambda=1.0)
    assert_close(Y, torch.tensor([[3.5, 2.5, 2.0], [3.2, 3.0, 0.0]]))
    with pytest.raises(ValueError, match="td_lambda"):
        segment_value_targets(R, V, mask, td_lambda=-0.1)


def test_segment_value_targets_reference_loop():
    gen = torch.Generator().manual_seed(2)
    R, V = torch.randn(5, 6, generator=gen, dtype=torch.float64), torch.randn(5, 6, generator=gen, dtype=torch.float64)
    lengths = [6, 1, 3, 4, 2]
    mask = (torch.arange(6) < torch.tensor(lengths).unsqueeze(1)).long()
    expected = torch.zeros(5, 6, dtype=torch.float64)
    for i, m in enumerate(lengths):
        for k in range(m):
            expected[i, k] = R[i, k] + 0.9 * (V[i, k + 1] if k + 1 < m else 0.0)
    assert_close(segment_value_targets(R, V, mask, gamma=0.9), expected)
    # The lambda-return as the weighted sum of n-step returns (Sutton & Barto, eq. 12.3):
    # Y = (1 - lam) sum_{n>=1} lam^{n-1} G_{k:k+n} with the tail weight lam^{T-k-1} on the full return.
    lam = 0.7
    expected = torch.zeros(5, 6, dtype=torch.float64)
    for i, m in enumerate(lengths):
        for k in range(m):
            def n_step(n: int) -> torch.Tensor:
                g = sum(0.9**j * R[i, k + j] for j in range(n))
                return g + (0.9**n * V[i, k + n] if k + n < m else 0.0)
            tail = m - k
            expected[i, k] = sum((1 - lam) * lam ** (n - 1) * n_step(n) for n in range(1, tail)) + lam ** (tail - 1) * n_step(tail)
    assert_close(segment_value_targets(R, V, mask, gamma=0.9, td_lambda=lam), expected)


# ---------------------------------------------------------------- the segment policy loss

LOGP_DELTA = torch.tensor([[0.1, 0.2, -0.3, -0.4]])
SEG = torch.tensor([[0, 0, 1, 1]])
ADV = torch.tensor([[1.0, -2.0]])


@pytest.mark.parametrize(
    "mode, expected_loss, clip_frac, max_abs",
    [
        # sum: log-ratios [0.3, -0.7] -> rho [1.3498588, 0.4965853]
        #   seg 1 (A = 1):  max(-1.3498588, -1.2) = -1.2 (clipped);  seg 2 (A = -2): max(0.9931706, 1.6) = 1.6
        #   loss = -1.2 + 1.6 = 0.4; both clipped
        ("sum", 0.4, 1.0, 0.7),
        # mean: log-ratios [0.15, -0.35] -> rho [1.1618342, 0.7046881]
        #   seg 1: -1.1618342 (inside the clip); seg 2: max(1.4093762, 1.6) = 1.6 -> loss 0.4381658
        ("mean", 0.4381658, 0.5, 0.35),
        # token: r = [1.1051709, 1.2214028, 0.7408182, 0.6703200], A_k / N_k = [0.5, 0.5, -1, -1]
        #   t1: -0.5525855; t2: max(-0.6107014, -0.6) = -0.6 (clipped); t3: max(0.7408182, 0.8) = 0.8;
        #   t4: max(0.6703200, 0.8) = 0.8 -> loss = 0.4474145; 3 of 4 tokens clipped
        ("token", 0.4474145, 0.75, 0.4),
    ],
)
def test_segment_policy_loss_hand_computed(mode, expected_loss, clip_frac, max_abs):
    old = torch.tensor([[-1.0, -2.0, -1.5, -0.5]])
    logp = (old + LOGP_DELTA).requires_grad_(True)
    loss, metrics = segment_policy_loss(logp, old, ADV, SEG, torch.ones(1, 4), ratio_mode=mode, eps_low=0.2)
    assert_close(loss, torch.tensor(expected_loss))
    assert_close(metrics["segments/ratio_clip_ratio"], torch.tensor(clip_frac))
    assert_close(metrics["segments/max_abs_log_ratio"], torch.tensor(max_abs))
    loss.backward()
    assert torch.isfinite(logp.grad).all()


def test_dual_clip_hand_computed():
    # segment 2 drifted up: log-ratio sum 2 -> rho = 7.3890561 with A = -2:
    # max(2 * 7.3890561, 2 * 1.2) = 14.7781122; dual clip c = 3 caps it at -c A = 6
    old = torch.zeros(1, 4)
    logp = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    loss, metrics = segment_policy_loss(logp, old, torch.tensor([[0.0, -2.0]]), SEG, torch.ones(1, 4), dual_clip=3.0)
    assert_close(loss, torch.tensor(6.0))
    assert_close(metrics["segments/dual_clip_ratio"], torch.tensor(0.5))
    loss_no_dual, _ = segment_policy_loss(logp, old, torch.tensor([[0.0, -2.0]]), SEG, torch.ones(1, 4))
    assert_close(loss_no_dual, torch.tensor(14.7781122))


@pytest.mark.parametrize("mode", ["sum", "mean", "token"])
def test_equal_policies_give_ratio_one_and_minus_sum_of_advantages(mode):
    gen = torch.Generator().manual_seed(3)
    logp = torch.randn(3, 7, generator=gen)
    seg = torch.tensor([[0, 0, 1, 1, 1, 2, 2], [0, 1, 1, 2, 2, 2, 0], [0, 0, 0, 1, 0, 0, 0]])
    mask = torch.tensor([[1] * 7, [1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0]])
    adv = torch.tensor([[0.5, -1.0, 2.0], [1.0, 1.0, -3.0], [-0.25, 0.75, 9.0]])  # chain 3: 2 segments
    loss, metrics = segment_policy_loss(logp, logp.clone(), adv, seg, mask, ratio_mode=mode)
    # -mean_i sum_k A_ik over real segments: -(1.5 + (-1.0) + 0.5) / 3 = -1/3
    assert_close(loss, torch.tensor(-1.0 / 3.0))
    assert metrics["segments/ratio_clip_ratio"] == 0 and metrics["segments/max_abs_log_ratio"] == 0


@pytest.mark.parametrize("mode", ["sum", "mean", "token"])
def test_log_ratio_of_200_stays_finite(mode):
    old = torch.zeros(2, 4)
    logp = torch.tensor([[50.0, 50.0, 50.0, 50.0], [-50.0, -50.0, -50.0, -50.0]], requires_grad=True)
    seg = torch.zeros(2, 4, dtype=torch.long)  # one segment each: summed log-ratio +200 / -200
    for sign in (1.0, -1.0):
        loss, metrics = segment_policy_loss(logp, old, torch.tensor([[sign], [sign]]), seg, torch.ones(2, 4),
                                            ratio_mode=mode)
        assert torch.isfinite(loss)
        (grad,) = torch.autograd.grad(loss, logp)
        assert torch.isfinite(grad).all()
    if mode == "sum":
        assert_close(metrics["segments/max_abs_log_ratio"], torch.tensor(200.0))


@pytest.mark.parametrize("mode", ["sum", "mean", "token"])
@pytest.mark.parametrize("dual_clip", [None, 2.5])
def test_segment_policy_loss_reference_loop(mode, dual_clip):
    gen = torch.Generator().manual_seed(4)
    n, t_len, k = 5, 9, 4
    logp = torch.randn(n, t_len, generator=gen, dtype=torch.float64) * 0.3 - 1
    old = logp + torch.randn(n, t_len, generator=gen, dtype=torch.float64) * 0.2
    lengths = torch.tensor([9, 4, 1, 7, 0])
    mask = (torch.arange(t_len) < lengths.unsqueeze(1)).long()
    seg = torch.sort(torch.randint(0, k, (n, t_len), generator=gen), dim=1).values
    adv = torch.randn(n, k, generator=gen, dtype=torch.float64)
    loss, _ = segment_policy_loss(logp, old, adv, seg, mask, ratio_mode=mode, eps_low=0.1, dual_clip=dual_clip)
    expected = _ref_policy_loss(logp, old, adv, seg, mask, mode, 0.1, dual_clip)
    assert_close(loss, torch.tensor(expected, dtype=torch.float64))


def test_unknown_ratio_mode_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown segment ratio mode 'geo'; valid: mean, sum, token"):
        segment_policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 1), torch.zeros(1, 2, dtype=torch.long),
                            torch.ones(1, 2), ratio_mode="geo")
    assert set(SEGMENT_RATIO_MODES.names()) >= {"sum", "mean", "token"}


# ---------------------------------------------------------------- value loss and KL


def test_segment_value_loss_hand_computed():
    values = torch.tensor([[1.0, 0.5], [0.0, 9.0]], requires_grad=True)
    old = torch.tensor([[0.8, 0.5], [0.0, 9.0]])
    targets = torch.tensor([[2.0, 0.0], [1.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    # clip 0.1. chain 1, seg 1: unclipped (1 - 2)^2 = 1; V_clip = 0.8 + clamp(0.2, +-0.1) = 0.9 -> 1.21; max 1.21
    #   seg 2: (0.5 - 0)^2 = 0.25 both ways. chain 1 sum: 0.5 * (1.21 + 0.25) = 0.73
    # chain 2, seg 1: (0 - 1)^2 = 1 -> 0.5 (seg 2 is padding). mean over chains: (0.73 + 0.5) / 2 = 0.615
    loss, metrics = segment_value_loss(values, old, targets, mask, clip=0.1)
    assert_close(loss, torch.tensor(0.615))
    assert_close(metrics["value/clip_ratio"], torch.tensor(1 / 3))
    # unclipped (c_v <= 0): chain 1: 0.5 * (1 + 0.25) = 0.625; chain 2: 0.5 -> 0.5625
    loss_unclipped, _ = segment_value_loss(values, old, targets, mask, clip=0.0)
    assert_close(loss_unclipped, torch.tensor(0.5625))
    loss.backward()
    assert values.grad[1, 1] == 0 and values.grad[0, 0] == 0  # padding; clipped term wins (V moved > c_v)


def test_segment_value_loss_reference_loop():
    gen = torch.Generator().manual_seed(5)
    v, old, y = (torch.randn(4, 5, generator=gen, dtype=torch.float64) for _ in range(3))
    mask = (torch.arange(5) < torch.tensor([[5], [2], [1], [3]])).long()
    total = 0.0
    for i in range(4):
        for k in range(5):
            if mask[i, k]:
                clipped = float(old[i, k]) + max(-0.2, min(0.2, float(v[i, k] - old[i, k])))
                total += 0.5 * max((float(v[i, k]) - float(y[i, k])) ** 2, (clipped - float(y[i, k])) ** 2)
    loss, _ = segment_value_loss(v, old, y, mask, clip=0.2)
    assert_close(loss, torch.tensor(total / 4, dtype=torch.float64))


def test_exact_kl_hand_computed_and_reference():
    # p = softmax([0, 0]) = [0.5, 0.5]; q = softmax([0, ln 3]) = [0.25, 0.75]
    # KL(p || q) = 0.5 ln(0.5 / 0.25) + 0.5 ln(0.5 / 0.75) = 0.3465736 - 0.2027326 = 0.1438410
    kl = exact_kl(torch.tensor([[[0.0, 0.0]]]), torch.tensor([[[0.0, math.log(3.0)]]]))
    assert_close(kl, torch.tensor([[0.1438410]]))
    gen = torch.Generator().manual_seed(6)
    a, b = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64), torch.randn(2, 3, 7, generator=gen, dtype=torch.float64)
    expected = torch.zeros(2, 3, dtype=torch.float64)
    for i in range(2):
        for t in range(3):
            pa, pb = torch.softmax(a[i, t], -1), torch.softmax(b[i, t], -1)
            expected[i, t] = sum(float(pa[v]) * math.log(float(pa[v]) / float(pb[v])) for v in range(7))
    assert_close(exact_kl(a, b, chunk_size=2), expected)
    assert_close(exact_kl(a, a), torch.zeros(2, 3, dtype=torch.float64))
    # the sampled-token k3 estimate is unbiased for it: mean over many samples of p approaches the exact KL
    logits, ref = torch.tensor([0.3, -1.0, 2.0]), torch.tensor([1.0, 0.0, 0.5])
    samples = torch.multinomial(torch.softmax(logits, -1), 200_000, replacement=True, generator=gen)
    k3 = kl_penalty(torch.log_softmax(logits, -1)[samples], torch.log_softmax(ref, -1)[samples], "k3")
    assert_close(k3.mean(), exact_kl(logits.view(1, 1, 3), ref.view(1, 1, 3)).view(()), atol=0.01, rtol=0)


def test_segment_kl_loss_is_the_per_chain_token_sum():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # chain 1: 0.1 + 0.2 + 0.3 = 0.6; chain 2: 0.5 (padding dropped); mean = 0.55
    assert_close(segment_kl_loss(kl, mask), torch.tensor(0.55))
