"""top_entropy_mask, adaptive_entropy_coef, entropy_bonus_active."""

import math

import pytest
import torch
from torch.testing import assert_close

from rftlab.core.entropy import adaptive_entropy_coef, entropy_bonus_active, top_entropy_mask

NAN = float("nan")


# ---------------------------------------------------------------- top_entropy_mask

def test_top_fifth_of_ten_tokens_hand_computed():
    # 10 real tokens in two rows (3 padded positions, holding NaN / inf / huge garbage)
    entropy = torch.tensor([[0.5, 2.0, 0.1, 3.5, 0.7, 1.2, NAN],
                            [0.9, 4.0, 0.3, 0.2, float("inf"), 1e9, 5.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0]], dtype=torch.float32)
    # sorted real values: 0.1 0.2 0.3 0.5 0.7 0.9 1.2 2.0 3.5 4.0; position (1 - 0.2) * 9 = 7.2,
    # threshold 2.0 + 0.2 * (3.5 - 2.0) = 2.3: keeps 3.5 and 4.0, the 2 highest (20 % of 10)
    keep = top_entropy_mask(entropy, mask, 0.2)
    expected = torch.zeros(2, 7)
    expected[0, 3] = expected[1, 1] = 1.0
    assert torch.equal(keep, expected)
    assert keep.dtype == torch.float32
    # 0.5: position 4.5, threshold (0.7 + 0.9) / 2 = 0.8: keeps 0.9 1.2 2.0 3.5 4.0
    assert torch.equal(top_entropy_mask(entropy, mask, 0.5),
                       torch.tensor([[0, 1, 0, 1, 0, 1, 0], [1, 1, 0, 0, 0, 0, 0]], dtype=torch.float32))


def test_ties_are_all_kept():
    mask = torch.ones(1, 5)
    # [1, 2, 2, 2, 2], quantile 0.2: position 0.8 * 4 = 3.2 lies between two 2s, threshold 2: all
    # four 2s are kept (80 % of the tokens, not 20 %), as with TRL's >= threshold
    keep = top_entropy_mask(torch.tensor([[2.0, 1.0, 2.0, 2.0, 2.0]]), mask, 0.2)
    assert torch.equal(keep, torch.tensor([[1.0, 0.0, 1.0, 1.0, 1.0]]))
    # [1, 1, 1, 1, 2]: threshold 1 + 0.2 * (2 - 1) = 1.2, only the 2
    keep = top_entropy_mask(torch.tensor([[1.0, 1.0, 2.0, 1.0, 1.0]]), mask, 0.2)
    assert torch.equal(keep, torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0]]))
    # all equal: everything is kept
    assert torch.equal(top_entropy_mask(torch.full((2, 3), 0.7), torch.ones(2, 3), 0.1), torch.ones(2, 3))


def test_quantile_one_keeps_every_real_token():
    gen = torch.Generator().manual_seed(0)
    entropy = torch.rand(4, 9, generator=gen)
    entropy[2, 5:] = NAN
    mask = (torch.arange(9).unsqueeze(0) < torch.tensor([[9], [3], [5], [0]])).float()
    assert torch.equal(top_entropy_mask(entropy, mask, 1.0), mask)
    assert torch.equal(top_entropy_mask(entropy, mask.bool(), 1), mask)  # bool mask: float32 out


def test_padding_is_never_kept_and_never_moves_the_threshold():
    gen = torch.Generator().manual_seed(1)
    entropy = torch.rand(3, 6, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]], dtype=torch.float32)
    clean = torch.where(mask != 0, entropy, torch.zeros(()))
    for garbage in (NAN, float("inf"), 1e9, -1e9):
        dirty = torch.where(mask != 0, entropy, torch.full((), garbage))
        for q in (0.1, 0.2, 0.5, 0.9):
            keep = top_entropy_mask(dirty, mask, q)
            assert keep[mask == 0].sum() == 0
            assert torch.equal(keep, top_entropy_mask(clean, mask, q))


def _ref_top_entropy(entropy, mask, quantile):
    values = sorted(float(entropy[i, t]) for i in range(entropy.shape[0]) for t in range(entropy.shape[1])
                    if mask[i, t] != 0)
    out = torch.zeros(entropy.shape)
    if not values:
        return out
    position = (1 - quantile) * (len(values) - 1)
    lo = math.floor(position)
    hi = min(lo + 1, len(values) - 1)
    threshold = values[lo] + (position - lo) * (values[hi] - values[lo])
    for i in range(entropy.shape[0]):
        for t in range(entropy.shape[1]):
            if mask[i, t] != 0 and float(entropy[i, t]) >= threshold:
                out[i, t] = 1.0
    return out


@pytest.mark.parametrize("quantile", [0.05, 0.2, 0.37, 0.5, 0.8, 0.99])
def test_matches_sorting_reference_and_trl_quantile(quantile):
    gen = torch.Generator().manual_seed(int(quantile * 100))
    entropy = torch.rand(8, 13, generator=gen, dtype=torch.float64) * 3
    lengths = torch.randint(0, 14, (8,), generator=gen)
    lengths[0], lengths[1] = 13, 0  # a full row and an all-masked row
    mask = (torch.arange(13).unsqueeze(0) < lengths.unsqueeze(1)).float()
    entropy = torch.where(mask != 0, entropy, torch.full((), NAN, dtype=torch.float64))
    keep = top_entropy_mask(entropy, mask, quantile)
    assert torch.equal(keep, _ref_top_entropy(entropy, mask, quantile))
    # TRL: threshold = torch.quantile(real entropies, 1 - quantile), keep entropy >= threshold
    threshold = torch.quantile(entropy[mask != 0], 1 - quantile)
    assert torch.equal(keep, ((entropy >= threshold) & (mask != 0)).float())
    # about a `quantile` share of the real tokens (no ties in continuous random values)
    n = int(mask.sum())
    assert math.floor(quantile * (n - 1)) <= keep.sum() <= math.ceil(quantile * (n - 1)) + 1


def test_empty_no_grad_and_validation():
    assert torch.equal(top_entropy_mask(torch.rand(2, 3), torch.zeros(2, 3), 0.2), torch.zeros(2, 3))
    assert top_entropy_mask(torch.zeros(0, 3), torch.zeros(0, 3), 0.2).shape == (0, 3)
    entropy = torch.rand(2, 3, requires_grad=True)
    keep = top_entropy_mask(entropy, torch.ones(2, 3), 0.5)
    assert not keep.requires_grad
    for bad in (0, 0.0, -0.1, 1.5, NAN, True):
        with pytest.raises(ValueError, match=r"^quantile=.* is invalid: must be in \(0, 1\]"):
            top_entropy_mask(torch.rand(2, 3), torch.ones(2, 3), bad)
    with pytest.raises(ValueError, match=r"\(N, T\)"):
        top_entropy_mask(torch.rand(2, 3), torch.ones(2, 4), 0.2)


# ---------------------------------------------------------------- adaptive entropy coefficient

def test_adaptive_coef_moves_towards_the_target():
    # entropy below the target: +step; above: -step; equal: unchanged
    assert adaptive_entropy_coef(0.01, entropy=0.1, target=0.2, step=0.005) == pytest.approx(0.015)
    assert adaptive_entropy_coef(0.01, entropy=0.3, target=0.2, step=0.005) == pytest.approx(0.005)
    assert adaptive_entropy_coef(0.01, entropy=0.2, target=0.2, step=0.005) == 0.01
    # a run of low-entropy steps accumulates: 0 -> 0.005 -> 0.010 -> 0.015
    coef = 0.0
    for _ in range(3):
        coef = adaptive_entropy_coef(coef, 0.05, 0.2, 0.005)
    assert coef == pytest.approx(0.015)


def test_adaptive_coef_is_clipped_to_zero_and_max():
    assert adaptive_entropy_coef(0.003, entropy=0.5, target=0.2, step=0.005) == 0.0  # 0.003 - 0.005 < 0
    assert adaptive_entropy_coef(0.0, entropy=0.5, target=0.2, step=0.005) == 0.0
    assert adaptive_entropy_coef(0.004, 0.1, 0.2, 0.005, max_coef=0.005) == 0.005  # 0.009 > max
    assert adaptive_entropy_coef(0.005, 0.1, 0.2, 0.005, max_coef=0.005) == 0.005
    assert adaptive_entropy_coef(0.02, 0.2, 0.2, 0.005, max_coef=0.005) == 0.005  # unchanged, but over max
    assert adaptive_entropy_coef(5.0, 0.1, 0.2, 1.0) == 6.0  # no max: no upper bound
    assert isinstance(adaptive_entropy_coef(0, 0.1, 0.2, 1), float)


def test_entropy_bonus_active_at_or_below_target():
    assert entropy_bonus_active(0.1, 0.2)
    assert entropy_bonus_active(0.2, 0.2)  # alpha_k = c_k * 1[e_k <= target]
    assert not entropy_bonus_active(0.21, 0.2)


def test_adaptive_coef_validation():
    with pytest.raises(ValueError, match=r"^step=-0\.1 is invalid: must be >= 0"):
        adaptive_entropy_coef(0.0, 0.1, 0.2, -0.1)
    with pytest.raises(ValueError, match=r"^max_coef=-1 is invalid"):
        adaptive_entropy_coef(0.0, 0.1, 0.2, 0.1, max_coef=-1)
    with pytest.raises(ValueError, match=r"^entropy=nan is invalid: must be a finite number"):
        adaptive_entropy_coef(0.0, NAN, 0.2, 0.1)
    with pytest.raises(ValueError, match=r"^target=inf is invalid"):
        entropy_bonus_active(0.1, float("inf"))
