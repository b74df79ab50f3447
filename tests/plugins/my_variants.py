"""A user's own variant pieces, defined outside the rftlab package (imported by the plug-in tests).

A leave-one-out baseline and a ratio-weighted REINFORCE loss, registered the way a user would;
the tests train with them from Python, from ``rftlab fit`` with a YAML that names them, and inside
``rftlab compare``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rftlab.core import aggregate, register_advantage, register_policy_loss


@register_advantage("test_leave_one_out")
def leave_one_out(rewards: Tensor, group_size: int, mask: Tensor, scale: float = 1.0) -> Tensor:
    """``scale * (r_i - mean_{j != i} r_j)`` within each group of ``group_size`` (Kool et al. 2019)."""
    grouped = rewards.view(-1, group_size)
    others = (grouped.sum(-1, keepdim=True) - grouped) / (group_size - 1)
    return (scale * (grouped - others)).reshape(-1)


@register_policy_loss("test_clipped_reinforce")
def clipped_reinforce(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, agg: str = "token-mean",
                      max_weight: float = 2.0) -> tuple[Tensor, dict[str, Tensor]]:
    """``-min(ratio, max_weight).detach() * A * logp``: REINFORCE with a capped importance weight."""
    weight = torch.exp(logp.detach() - old_logp).clamp(max=max_weight)
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    loss = aggregate(-(weight * adv * logp), mask, agg)
    capped = ((torch.exp(logp.detach() - old_logp) > max_weight).float() * mask).sum() / mask.sum().clamp(min=1)
    return loss, {"test_reinforce/capped_fraction": capped, "test_reinforce/max_weight": torch.tensor(max_weight)}
