"""Reward shaping terms that depend only on completion statistics."""

from __future__ import annotations

import torch
from torch import Tensor


def overlong_penalty(lengths: Tensor, max_len: int, cache_len: int) -> Tensor:
    """DAPO's soft overlong punishment (arXiv 2503.14476 §3.4, Eq. 13), added to the task reward.

    With ``L`` a completion's length and the soft limit ``S = max_len - cache_len``::

        0                      if L <= S
        (S - L) / cache_len    if S < L <= max_len     (linear from 0 down to -1)
        -1                     if L > max_len

    Truncated completions are thereby penalised gradually instead of all at once, which DAPO found
    reduces reward noise from sequences cut off for length.

    Args:
        lengths: (N,) completion lengths in tokens (EOS included), integer or floating.
        max_len: L_max, the maximum completion length (> cache_len).
        cache_len: L_cache, the width of the soft-penalty interval (0 < cache_len < max_len).

    Returns:
        (N,) penalties in [-1, 0]; float32 (or the dtype of floating ``lengths``).
    """
    if not 0 < cache_len < max_len:
        raise ValueError(
            f"need 0 < cache_len < max_len, got cache_len={cache_len}, max_len={max_len}"
        )
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be 1-D (N,), got shape {tuple(lengths.shape)}")
    length = lengths if lengths.is_floating_point() else lengths.to(torch.float32)
    soft_limit = max_len - cache_len
    linear = (soft_limit - length) / cache_len
    penalty = torch.where(length <= max_len, linear, torch.full_like(length, -1.0))
    return torch.where(length <= soft_limit, torch.zeros_like(length), penalty)
