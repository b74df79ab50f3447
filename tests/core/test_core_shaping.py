"""overlong_penalty (DAPO arXiv 2503.14476 Eq. 13)."""

import pytest
import torch
from torch.testing import assert_close

from rftlab.core import overlong_penalty


def _ref_overlong(lengths, max_len, cache_len):
    out = []
    for length in lengths.tolist():
        if length <= max_len - cache_len:
            out.append(0.0)
        elif length <= max_len:
            out.append(((max_len - cache_len) - length) / cache_len)
        else:
            out.append(-1.0)
    return torch.tensor(out)


def test_overlong_penalty_at_each_boundary():
    # max_len 10, cache_len 4 -> soft limit S = 6
    lengths = torch.tensor([0, 5, 6, 7, 8, 9, 10, 11, 100])
    # L <= 6: 0 | 7: (6-7)/4 = -0.25 | 8: -0.5 | 9: -0.75 | 10: (6-10)/4 = -1 | > 10: -1
    expected = torch.tensor([0.0, 0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0])
    assert_close(overlong_penalty(lengths, 10, 4), expected)
    # float lengths between the boundaries: 6.5 -> -0.125; just above max_len -> -1
    assert_close(overlong_penalty(torch.tensor([6.0, 6.5, 10.0, 10.5]), 10, 4),
                 torch.tensor([0.0, -0.125, -1.0, -1.0]))


def test_overlong_penalty_matches_reference():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 600, (64,), generator=gen)
    out = overlong_penalty(lengths, 512, 128)
    assert out.dtype == torch.float32 and out.shape == (64,)
    assert_close(out, _ref_overlong(lengths, 512, 128))
    assert (out <= 0).all() and (out >= -1).all()
    assert overlong_penalty(lengths.double(), 512, 128).dtype == torch.float64


def test_overlong_penalty_validation():
    for max_len, cache_len in [(10, 0), (10, 10), (10, 12), (10, -1)]:
        with pytest.raises(ValueError, match="cache_len.*max_len"):
            overlong_penalty(torch.tensor([1]), max_len, cache_len)
    with pytest.raises(ValueError, match="1-D"):
        overlong_penalty(torch.ones(2, 2), 10, 4)
