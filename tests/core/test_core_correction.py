"""correction_weights, correction_gap_metrics, check_correction_options, ROLLOUT_CORRECTIONS."""

import math

import pytest
import torch
from torch.testing import assert_close

from rftlab.core.correction import (
    ROLLOUT_CORRECTIONS,
    check_correction_options,
    correction_gap_metrics,
    correction_weights,
)

MODES = ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "icepop"]
NAN = float("nan")


def _hand_batch():
    # per-token ratios r = pi_train / pi_sampler: row 0 [0.25, 1, 2.5, 4]; row 1 [2, 0.6, pad, pad]
    # with NaN garbage in both log-probs on the padding
    ratios = torch.tensor([[0.25, 1.0, 2.5, 4.0], [2.0, 0.6, 1.0, 1.0]], dtype=torch.float64)
    sampler = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-1.5, -0.7, NAN, NAN]], dtype=torch.float64)
    old = sampler + torch.log(ratios)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    return old, sampler, mask


def _weights(mode, **kw):
    old, sampler, mask = _hand_batch()
    return correction_weights(old, sampler, mask, mode, **kw)


def test_registry_holds_the_five_modes():
    assert ROLLOUT_CORRECTIONS.names() == sorted(MODES)


def test_token_truncate_hand_computed():
    w, m = _weights("token_truncate", cap=3.0)
    # min(r, 3): row 0 [0.25, 1, 2.5, 3 (4 truncated)], row 1 [2, 0.6, 0, 0]
    assert_close(w, torch.tensor([[0.25, 1.0, 2.5, 3.0], [2.0, 0.6, 0.0, 0.0]], dtype=torch.float64))
    # 1 of the 6 real tokens truncated; weight mean (0.25 + 1 + 2.5 + 3 + 2 + 0.6) / 6 = 9.35 / 6
    assert_close(m["rollout_correction/corrected_share"], torch.tensor(1 / 6, dtype=torch.float64))
    assert_close(m["rollout_correction/weight_mean"], torch.tensor(9.35 / 6, dtype=torch.float64))
    # |log r| mean: (ln 4 + 0 + ln 2.5 + ln 4 + ln 2 + |ln 0.6|) / 6
    gap = (2 * math.log(4) + math.log(2.5) + math.log(2) - math.log(0.6)) / 6
    assert_close(m["rollout_correction/abs_gap"], torch.tensor(gap, dtype=torch.float64))
    assert set(m) == {"rollout_correction/abs_gap", "rollout_correction/weight_mean",
                      "rollout_correction/corrected_share"}


def test_token_mask_hand_computed():
    w, m = _weights("token_mask", cap=3.0)
    # r if r <= 3 else 0: the 4 is dropped, not truncated
    assert_close(w, torch.tensor([[0.25, 1.0, 2.5, 0.0], [2.0, 0.6, 0.0, 0.0]], dtype=torch.float64))
    assert_close(m["rollout_correction/corrected_share"], torch.tensor(1 / 6, dtype=torch.float64))
    # (0.25 + 1 + 2.5 + 0 + 2 + 0.6) / 6 = 6.35 / 6
    assert_close(m["rollout_correction/weight_mean"], torch.tensor(6.35 / 6, dtype=torch.float64))


def test_sequence_truncate_hand_computed():
    # sequence ratios = products over real tokens: row 0 0.25 * 1 * 2.5 * 4 = 2.5; row 1 2 * 0.6 = 1.2
    w, m = _weights("sequence_truncate", cap=2.0)
    # min(2.5, 2) = 2 on all of row 0 (4 tokens truncated), 1.2 on row 1's real tokens
    assert_close(w, torch.tensor([[2.0, 2.0, 2.0, 2.0], [1.2, 1.2, 0.0, 0.0]], dtype=torch.float64))
    assert_close(m["rollout_correction/corrected_share"], torch.tensor(4 / 6, dtype=torch.float64))
    # (4 * 2 + 2 * 1.2) / 6 = 10.4 / 6
    assert_close(m["rollout_correction/weight_mean"], torch.tensor(10.4 / 6, dtype=torch.float64))
    w, _ = _weights("sequence_truncate", cap=3.0)  # 2.5 <= 3: nothing truncated
    assert_close(w, torch.tensor([[2.5, 2.5, 2.5, 2.5], [1.2, 1.2, 0.0, 0.0]], dtype=torch.float64))


def test_sequence_mask_hand_computed():
    w, m = _weights("sequence_mask", cap=2.0)
    # row 0's ratio 2.5 > 2: the whole row is dropped; row 1 keeps 1.2
    assert_close(w, torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.2, 1.2, 0.0, 0.0]], dtype=torch.float64))
    assert_close(m["rollout_correction/corrected_share"], torch.tensor(4 / 6, dtype=torch.float64))
    assert_close(m["rollout_correction/weight_mean"], torch.tensor(2.4 / 6, dtype=torch.float64))
    # the sum of log-ratios, not their mean: mean log-ratio of row 0 is ln(2.5) / 4, whose exp 1.26
    # would pass a cap of 1.5; the product 2.5 does not
    w, _ = _weights("sequence_mask", cap=1.5)
    assert w[0].abs().sum().item() == 0.0
    assert_close(w[1], torch.tensor([1.2, 1.2, 0.0, 0.0], dtype=torch.float64))


def test_icepop_hand_computed():
    w, m = _weights("icepop", low=0.5, high=3.0)
    # keep r in [0.5, 3]: 0.25 < 0.5 and 4 > 3 are dropped (two-sided), the others keep r unchanged
    assert_close(w, torch.tensor([[0.0, 1.0, 2.5, 0.0], [2.0, 0.6, 0.0, 0.0]], dtype=torch.float64))
    assert_close(m["rollout_correction/corrected_share"], torch.tensor(2 / 6, dtype=torch.float64))
    assert_close(m["rollout_correction/weight_mean"], torch.tensor(6.1 / 6, dtype=torch.float64))


def test_bounds_are_inclusive_and_none_mode():
    # r = 1 exactly (equal log-probs): kept by a cap of 1 and by icepop's [1, 1], never flagged
    old = torch.full((1, 3), -0.5)
    mask = torch.ones(1, 3)
    for mode in MODES:
        w, m = correction_weights(old, old.clone(), mask, mode, cap=1.0, low=1.0, high=1.0)
        assert torch.equal(w, torch.ones(1, 3)), mode
        assert m["rollout_correction/corrected_share"].item() == 0.0
    w, m = _weights("none")
    assert_close(w, torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]], dtype=torch.float64))
    assert m["rollout_correction/corrected_share"].item() == 0.0
    assert_close(m["rollout_correction/weight_mean"], torch.tensor(1.0, dtype=torch.float64))


# ---------------------------------------------------------------- reference loop

def _ref_correction(old, sampler, mask, mode, cap, low, high):
    n, t_len = old.shape
    w = [[0.0] * t_len for _ in range(n)]
    corrected = [[False] * t_len for _ in range(n)]
    for i in range(n):
        real = [t for t in range(t_len) if mask[i, t] != 0]
        d = {t: float(old[i, t]) - float(sampler[i, t]) for t in real}
        if mode.startswith("sequence"):
            r = math.exp(sum(d.values()))
            for t in real:
                if mode == "sequence_truncate":
                    w[i][t], corrected[i][t] = min(r, cap), r > cap
                else:
                    w[i][t], corrected[i][t] = (r, False) if r <= cap else (0.0, True)
            continue
        for t in real:
            r = math.exp(d[t])
            if mode == "token_truncate":
                w[i][t], corrected[i][t] = min(r, cap), r > cap
            elif mode == "token_mask":
                w[i][t], corrected[i][t] = (r, False) if r <= cap else (0.0, True)
            else:  # icepop
                w[i][t], corrected[i][t] = (r, False) if low <= r <= high else (0.0, True)
    flat = [(w[i][t], corrected[i][t], abs(float(old[i, t]) - float(sampler[i, t])))
            for i in range(n) for t in range(t_len) if mask[i, t] != 0]
    count = len(flat)
    metrics = {
        "rollout_correction/abs_gap": sum(g for _, _, g in flat) / count if count else 0.0,
        "rollout_correction/weight_mean": sum(x for x, _, _ in flat) / count if count else 0.0,
        "rollout_correction/corrected_share": sum(c for _, c, _ in flat) / count if count else 0.0,
    }
    return torch.tensor(w, dtype=torch.float64), torch.tensor(corrected), metrics


def _random_batch(seed, n=10, t=6, scale=0.6):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (n,), generator=gen)
    lengths[0], lengths[1] = t, 0  # a full row and an all-masked row
    mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).double()
    sampler = -torch.rand(n, t, generator=gen, dtype=torch.float64) * 3
    old = sampler + torch.randn(n, t, generator=gen, dtype=torch.float64) * scale
    real = mask != 0
    # NaN / inf garbage on padding, in both inputs
    old = torch.where(real, old, torch.full_like(old, NAN))
    sampler = torch.where(real, sampler, torch.full_like(sampler, -float("inf")))
    return old, sampler, mask


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_loop(mode, seed):
    old, sampler, mask = _random_batch(seed)
    cap, low, high = 1.5, 0.7, 1.6
    expected_w, expected_c, expected_m = _ref_correction(old, sampler, mask, mode, cap, low, high)
    w, m = correction_weights(old, sampler, mask, mode, cap=cap, low=low, high=high)
    assert_close(w, expected_w)
    assert torch.isfinite(w).all()
    for name, value in expected_m.items():
        assert_close(m[name], torch.tensor(value, dtype=torch.float64), msg=name)
    # the inputs truncate / mask some tokens but not all, so the comparison means something
    assert 0 < expected_c.sum() < mask.sum()
    # the registered function itself flags exactly the reference's tokens
    real = mask != 0
    log_ratio = torch.where(real, old - sampler, torch.zeros(()).double())
    _, corrected = ROLLOUT_CORRECTIONS.get(mode)(log_ratio, mask, cap, low, high)
    assert torch.equal(corrected, expected_c)


def test_ratio_overflow_gives_finite_weights():
    # d = +-100: exp(100) overflows float32, exp(-100) underflows; every weight stays finite
    sampler = torch.zeros(2, 3)
    old = torch.tensor([[100.0, -100.0, 0.0], [100.0, 100.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    for mode in MODES:
        w, m = correction_weights(old, sampler, mask, mode, cap=2.0)
        assert torch.isfinite(w).all() and (w >= 0).all(), mode
        assert all(torch.isfinite(v) for v in m.values()), mode
    w, _ = correction_weights(old, sampler, mask, "token_truncate", cap=2.0)
    assert w[0, 0].item() == 2.0 and w[1, 1].item() == 2.0  # +100 truncated to the cap
    assert 0 < w[0, 1].item() < 1e-8  # exp(-20): clamped, not 0 and not NaN
    w, m = correction_weights(old, sampler, mask, "sequence_truncate", cap=2.0)
    # row 0's sum is 0 (ratio 1); row 1's is 200, truncated to 2
    assert_close(w, torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]]))
    w, _ = correction_weights(old, sampler, mask, "icepop")
    assert_close(w, torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]))
    # a cap of 1e300 (log 690.8) keeps d = 100, whose exp() the clamp holds at exp(20), not inf
    big = math.exp(20.0)
    for mode in ("token_truncate", "token_mask"):
        w, _ = correction_weights(old, sampler, mask, mode, cap=1e300)
        assert_close(w[0, 0], torch.tensor(big), msg=mode)
    for mode in ("sequence_truncate", "sequence_mask"):  # row 1's sum 200 is kept too
        w, _ = correction_weights(old, sampler, mask, mode, cap=1e300)
        assert_close(w[1], torch.tensor([big, big, 0.0]), msg=mode)
    # d = 1000 > log(1e300) is truncated; the cap itself is not a float32, the weight stays exp(20)
    for mode in ("token_truncate", "sequence_truncate"):
        w, _ = correction_weights(old * 10, sampler, mask, mode, cap=1e300)
        assert torch.isfinite(w).all() and w.max().item() == pytest.approx(big, rel=1e-6), mode
    # float32 at the boundary of exp(): 89 > log(float32 max)
    w, _ = correction_weights(torch.tensor([[89.0]]), torch.zeros(1, 1), torch.ones(1, 1), "token_mask")
    assert w.item() == 0.0


def test_all_masked_and_empty_batch():
    old = torch.full((3, 4), NAN)
    sampler = torch.full((3, 4), float("inf"))
    for mode in [*MODES, "none"]:
        w, m = correction_weights(old, sampler, torch.zeros(3, 4), mode)
        assert torch.equal(w, torch.zeros(3, 4)), mode
        assert all(v.item() == 0.0 for v in m.values()), mode
        w, m = correction_weights(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, 4), mode)
        assert w.shape == (0, 4) and all(v.item() == 0.0 for v in m.values())
    gap = correction_gap_metrics(old, sampler, torch.zeros(3, 4))
    assert {k: v.item() for k, v in gap.items()} == {"rollout_correction/abs_gap": 0.0,
                                                     "rollout_correction/max_abs_gap": 0.0}
    gap = correction_gap_metrics(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, 4))
    assert gap["rollout_correction/max_abs_gap"].item() == 0.0


def test_gap_metrics_hand_computed():
    # gaps on real tokens: |-1 - (-1.5)| = 0.5, |-2 - (-0.5)| = 1.5, |-0.3 - (-0.3)| = 0; padding is NaN
    old = torch.tensor([[-1.0, -2.0], [-0.3, NAN]])
    sampler = torch.tensor([[-1.5, -0.5], [-0.3, 7.0]])
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    gap = correction_gap_metrics(old, sampler, mask)
    assert_close(gap["rollout_correction/abs_gap"], torch.tensor(2.0 / 3))  # (0.5 + 1.5 + 0) / 3
    assert_close(gap["rollout_correction/max_abs_gap"], torch.tensor(1.5))
    _, m = correction_weights(old, sampler, mask, "token_truncate")
    assert_close(m["rollout_correction/abs_gap"], gap["rollout_correction/abs_gap"])


def test_weights_carry_no_gradient_and_bf16_inputs():
    old = torch.randn(2, 3, requires_grad=True)
    w, m = correction_weights(old, torch.zeros(2, 3), torch.ones(2, 3), "token_truncate")
    assert not w.requires_grad and not any(v.requires_grad for v in m.values())
    # bf16 log-probs are compared in float32
    w, _ = correction_weights(torch.zeros(1, 2, dtype=torch.bfloat16), torch.zeros(1, 2, dtype=torch.bfloat16),
                              torch.ones(1, 2), "icepop")
    assert w.dtype == torch.float32 and torch.equal(w, torch.ones(1, 2))


def test_bad_options_rejected_with_field_name():
    with pytest.raises(ValueError, match=r"^loss\.correction\.cap=-1 is invalid: must be > 0"):
        check_correction_options("token_truncate", -1, 0.5, 5.0, where="loss.correction")
    with pytest.raises(ValueError, match=r"^loss\.correction\.cap=nan is invalid"):
        check_correction_options("token_truncate", NAN, 0.5, 5.0, where="loss.correction")
    with pytest.raises(ValueError, match=r"^loss\.correction\.low=0 is invalid: must be in \(0, 1\]"):
        check_correction_options("icepop", 2.0, 0, 5.0, where="loss.correction")
    with pytest.raises(ValueError, match=r"^x\.low=1\.5 is invalid"):
        check_correction_options("icepop", 2.0, 1.5, 5.0, where="x")
    with pytest.raises(ValueError, match=r"^high=0\.9 is invalid: must be >= 1"):
        check_correction_options("icepop", 2.0, 0.5, 0.9)
    with pytest.raises(ValueError, match=r"^cap=True is invalid"):
        check_correction_options("token_mask", True, 0.5, 5.0)
    with pytest.raises(ValueError, match=r"^loss\.correction\.mode='tis' is invalid: must be one of none, icepop, "
                                         r"sequence_mask, sequence_truncate, token_mask, token_truncate"):
        check_correction_options("tis", 2.0, 0.5, 5.0, where="loss.correction")
    check_correction_options("none", 2.0, 0.5, 5.0)  # valid
    with pytest.raises(ValueError, match=r"^cap=0 is invalid"):
        _weights("token_truncate", cap=0)
    with pytest.raises(ValueError, match=r"\(N, T\)"):
        correction_weights(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3), "icepop")
