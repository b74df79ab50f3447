"""masked_sum / masked_mean / masked_var helpers."""

import pytest
import torch
from torch.testing import assert_close

from rftlab.core import masked_mean, masked_sum, masked_var


def test_masked_hand_computed():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("nan"), float("inf")]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert_close(masked_sum(x, mask), torch.tensor(10.0))                       # 1+2+3+4
    assert_close(masked_mean(x, mask), torch.tensor(2.5))                       # 10 / 4
    assert_close(masked_mean(x, mask, dim=-1), torch.tensor([2.0, 4.0]))        # 6/3, 4/1
    assert_close(masked_var(x, mask), torch.tensor(1.25))                       # (2.25+.25+.25+2.25)/4
    assert_close(masked_mean(x, mask.bool()), torch.tensor(2.5))                # bool mask


def test_masked_matches_reference_and_empty():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    mask = (torch.rand(5, 7, generator=gen) < 0.6).double()
    mask[2] = 0
    vals = [float(x[i, t]) for i in range(5) for t in range(7) if mask[i, t]]
    mean = sum(vals) / len(vals)
    assert_close(masked_mean(x, mask), torch.tensor(mean, dtype=torch.float64))
    assert_close(masked_var(x, mask), torch.tensor(sum((v - mean) ** 2 for v in vals) / len(vals),
                                                   dtype=torch.float64))
    rows = masked_mean(x, mask, dim=1)
    assert rows[2].item() == 0.0
    z = torch.zeros(2, 2, requires_grad=True)
    out = masked_mean(z, torch.zeros(2, 2))
    out.backward()
    assert out.item() == 0.0 and torch.isfinite(z.grad).all()
    with pytest.raises(ValueError, match="same shape"):
        masked_sum(x, mask[:, :3])
