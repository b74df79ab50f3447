"""Masked reductions shared by the losses, advantages and metrics.

``mask`` is 1 (or True) on real completion tokens and 0 on padding. Padded positions are excluded
with ``torch.where`` rather than multiplied by 0, so garbage there (NaN/inf from a padded log-prob)
cannot turn into NaN through ``0 * inf``. Every reduction with no real token returns 0, not NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x * mask`` over ``dim`` (all dims if None).

    Args:
        x: any shape.
        mask: same shape as ``x``; 0/1 (bool, int or float).
        dim: dimension to reduce, or None for all.
    """
    if x.shape != mask.shape:
        raise ValueError(f"x and mask must have the same shape, got {tuple(x.shape)} and {tuple(mask.shape)}")
    weighted = torch.where(mask != 0, x * mask.to(x.dtype), torch.zeros((), dtype=x.dtype, device=x.device))
    return weighted.sum() if dim is None else weighted.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """``sum(x m) / sum(m)`` over ``dim`` (all dims if None); 0 where ``sum(m) == 0``.

    Args:
        x: any shape, floating.
        mask: same shape as ``x``; 0/1.
        dim: dimension to reduce, or None for all.

    Returns:
        0-dim tensor (dim None) or ``x`` with ``dim`` removed.
    """
    num = masked_sum(x, mask, dim)
    den = mask.to(x.dtype).sum() if dim is None else mask.to(x.dtype).sum(dim)
    # Replacing an empty denominator by 1 (not adding an epsilon) keeps both the value (0 / 1 = 0)
    # and its gradient finite and exact; a where() over num / 0 would still backprop NaN.
    den = torch.where(den != 0, den, torch.ones_like(den))
    return num / den


def masked_var(x: Tensor, mask: Tensor) -> Tensor:
    """Biased (population) variance of ``x`` over the real positions: ``mean_m((x - mean_m(x))^2)``.

    Biased, i.e. divided by ``sum(m)`` and not ``sum(m) - 1``: it is what whitening and explained
    variance need (both are ratios or rescalings where the n/(n-1) factor is irrelevant or cancels),
    and it is 0 rather than NaN for a single real token.

    Args:
        x: any shape, floating.
        mask: same shape as ``x``; 0/1.

    Returns:
        0-dim tensor; 0 when there is no real position.
    """
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)
