"""selective_log_softmax, entropy_from_logits and the two in one pass."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from rftlab.core import entropy_from_logits, selective_log_softmax, selective_log_softmax_and_entropy


def _ref_selective(logits, ids):
    # Slow reference: one (n, t) position at a time, log p = x_id - log sum_v exp(x_v).
    out = torch.empty(ids.shape, dtype=torch.float64)
    for n in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            row = logits[n, t].double()
            m = row.max()
            lse = m + torch.log(sum(torch.exp(row[v] - m) for v in range(row.shape[0])))
            out[n, t] = row[ids[n, t]] - lse
    return out


def _ref_entropy(logits):
    out = torch.empty(logits.shape[:-1], dtype=torch.float64)
    for n in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            p = torch.softmax(logits[n, t].double(), -1)
            out[n, t] = -sum(p[v] * math.log(p[v]) for v in range(p.shape[0]) if p[v] > 0)
    return out


def test_selective_hand_computed():
    # logits = log([1, 2, 3, 4]) -> softmax = [0.1, 0.2, 0.3, 0.4]
    logits = torch.log(torch.tensor([[[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]]]))
    ids = torch.tensor([[3, 2]])
    # position 0: log 0.4 = -0.916291; position 1: uniform over 4, log 0.25 = -1.386294
    assert_close(selective_log_softmax(logits, ids), torch.tensor([[math.log(0.4), math.log(0.25)]]))


def test_selective_matches_reference_and_log_softmax_fp32():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g) * 4
    ids = torch.randint(0, 11, (3, 5), generator=g)
    out = selective_log_softmax(logits, ids)
    assert out.dtype == torch.float32 and out.shape == (3, 5)
    assert_close(out.double(), _ref_selective(logits, ids), rtol=1e-5, atol=1e-5)
    direct = F.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    assert_close(out, direct)


def test_selective_fp64_keeps_dtype():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 7, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 7, (2, 4), generator=g)
    out = selective_log_softmax(logits, ids)
    assert out.dtype == torch.float64
    assert_close(out, _ref_selective(logits, ids))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_selective_low_precision(dtype):
    g = torch.Generator().manual_seed(2)
    logits32 = torch.randn(2, 6, 50, generator=g) * 3
    logits = logits32.to(dtype)
    ids = torch.randint(0, 50, (2, 6), generator=g)
    out = selective_log_softmax(logits, ids)
    assert out.dtype == torch.float32  # upcast: bf16 log-probs would be too coarse for ratios
    # exact w.r.t. the low-precision logits it was given ...
    direct = F.log_softmax(logits.float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    assert_close(out, direct)
    # ... and within input-rounding error (bf16: ~3 significant digits of |logit| <= ~10) of fp32
    ref32 = F.log_softmax(logits32, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    assert_close(out, ref32, rtol=2e-2, atol=1e-1)


def test_selective_gradient_matches_direct():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(2, 3, 5, generator=g)
    ids = torch.randint(0, 5, (2, 3), generator=g)
    a, b = base.clone().requires_grad_(), base.clone().requires_grad_()
    selective_log_softmax(a, ids).sum().backward()
    F.log_softmax(b, -1).gather(-1, ids.unsqueeze(-1)).sum().backward()
    assert_close(a.grad, b.grad)


def test_selective_edge_cases():
    # extreme logits stay finite: log p of the dominant token is ~0, the others ~ -1000
    logits = torch.tensor([[[1000.0, 0.0, -1000.0]]])
    out = selective_log_softmax(logits, torch.tensor([[0]]))
    assert torch.isfinite(out).all() and out.abs().item() < 1e-6
    assert selective_log_softmax(torch.zeros(0, 4, 3), torch.zeros(0, 4, dtype=torch.long)).shape == (0, 4)
    with pytest.raises(ValueError, match="expected logits"):
        selective_log_softmax(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="floating"):
        selective_log_softmax(torch.zeros(2, 3, 4, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))


def test_entropy_hand_computed():
    logits = torch.log(torch.tensor([[[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]]]))
    # p = [.1, .2, .3, .4]: 0.1*2.302585 + 0.2*1.609438 + 0.3*1.203973 + 0.4*0.916291
    #   = 0.2302585 + 0.3218876 + 0.3611919 + 0.3665163 = 1.2798543
    # uniform over 4: ln 4 = 1.3862944
    assert_close(entropy_from_logits(logits), torch.tensor([[1.2798543, 1.3862944]]))


def test_entropy_matches_reference_and_direct_formula():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 7, 13, generator=g) * 2
    for chunk_size in (1, 4, 128):  # chunks that divide, don't divide, and exceed N*T = 21
        out = entropy_from_logits(logits, chunk_size=chunk_size)
        assert out.shape == (3, 7) and out.dtype == torch.float32
        assert_close(out.double(), _ref_entropy(logits), rtol=1e-5, atol=1e-5)
        direct = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
        assert_close(out, direct)


def test_entropy_bf16_returns_fp32():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, 17, generator=g).to(torch.bfloat16)
    out = entropy_from_logits(logits, chunk_size=2)
    assert out.dtype == torch.float32
    assert_close(out.double(), _ref_entropy(logits.float()), rtol=1e-5, atol=1e-5)


def test_entropy_masked_vocab_and_gradient():
    # -inf logits (top-k filtered tokens) contribute 0: two equal survivors give ln 2, one gives 0
    logits = torch.tensor([[[0.0, 0.0, -math.inf, -math.inf], [5.0, -math.inf, -math.inf, -math.inf]]],
                          requires_grad=True)
    out = entropy_from_logits(logits)
    assert_close(out.detach(), torch.tensor([[math.log(2.0), 0.0]]))
    out.sum().backward()
    assert torch.isfinite(logits.grad).all()
    # gradient equals the direct formula's on finite logits
    x = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(6))
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    entropy_from_logits(a, chunk_size=4).sum().backward()
    (-(torch.softmax(b, -1) * torch.log_softmax(b, -1)).sum()).backward()
    assert_close(a.grad, b.grad)


def test_entropy_edge_cases():
    assert entropy_from_logits(torch.zeros(0, 3, 5)).shape == (0, 3)
    with pytest.raises(ValueError, match="chunk_size"):
        entropy_from_logits(torch.zeros(1, 1, 2), chunk_size=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_full_size_log_softmax_is_materialised(monkeypatch, dtype):
    # Record the size of every logsumexp / log_softmax input: none may be the whole (N, T, V) batch.
    seen = []
    real_lse, real_ls = torch.logsumexp, F.log_softmax

    def lse(x, *a, **k):
        seen.append(x.numel())
        return real_lse(x, *a, **k)

    def ls(x, *a, **k):
        seen.append(x.numel())
        return real_ls(x, *a, **k)

    monkeypatch.setattr(torch, "logsumexp", lse)
    monkeypatch.setattr(F, "log_softmax", ls)
    n, t, v = 4, 8, 16
    logits = torch.randn(n, t, v).to(dtype)
    selective_log_softmax(logits, torch.randint(0, v, (n, t)))
    assert seen and max(seen) <= t * v  # one row at a time
    seen.clear()
    entropy_from_logits(logits, chunk_size=5)
    assert seen and max(seen) <= 5 * v  # one chunk of flattened rows at a time


def test_fused_hand_computed():
    # softmax = [0.1, 0.2, 0.3, 0.4]; then a uniform row over 4 tokens
    logits = torch.log(torch.tensor([[[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]]]))
    logp, entropy = selective_log_softmax_and_entropy(logits, torch.tensor([[3, 2]]))
    assert_close(logp, torch.tensor([[math.log(0.4), math.log(0.25)]]))
    h0 = -sum(p * math.log(p) for p in (0.1, 0.2, 0.3, 0.4))  # 1.279854
    assert_close(entropy, torch.tensor([[h0, math.log(4)]]))
    assert not entropy.requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_fused_equals_the_two_functions_values_and_gradient(dtype):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(3, 6, 13, generator=g) * 3
    base[0, 1, :5] = float("-inf")  # tokens removed by top-k: 0 * log 0 = 0 in the entropy
    ids = torch.randint(5, 13, (3, 6), generator=g)
    a = base.to(dtype).requires_grad_(True)
    b = base.to(dtype).requires_grad_(True)
    logp, entropy = selective_log_softmax_and_entropy(a, ids)
    expected_logp = selective_log_softmax(b, ids)
    assert logp.dtype == expected_logp.dtype and torch.equal(logp, expected_logp)
    expected_entropy = entropy_from_logits(b.detach())
    assert entropy.dtype == expected_entropy.dtype
    assert_close(entropy, expected_entropy, rtol=1e-6, atol=1e-6)
    assert_close(entropy.double(), _ref_entropy(base.to(dtype)), rtol=1e-5, atol=1e-5)
    weights = torch.randn(3, 6, generator=g)
    (logp * weights).sum().backward()
    (expected_logp * weights).sum().backward()
    assert torch.equal(a.grad, b.grad)


def test_fused_edge_cases():
    logp, entropy = selective_log_softmax_and_entropy(torch.zeros(0, 4, 7), torch.zeros(0, 4, dtype=torch.long))
    assert logp.shape == entropy.shape == (0, 4)
    with pytest.raises(ValueError, match="expected logits"):
        selective_log_softmax_and_entropy(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="floating point"):
        selective_log_softmax_and_entropy(torch.zeros(2, 3, 5, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
