"""Entropy controls: training only on high-entropy tokens, and an adaptive entropy-bonus coefficient.

``top_entropy_mask`` keeps the "forking" tokens, the highest-entropy fraction of a batch (Wang et
al. 2025, "Beyond the 80/20 Rule", arXiv 2506.01939). ``adaptive_entropy_coef`` and
``entropy_bonus_active`` are the adaptive entropy control of Skywork-OR1 (He et al. 2025, arXiv
2505.22312, §3.3), which raises the coefficient of an entropy bonus while the policy's entropy is
below a target and only applies the bonus then.

Shapes: N sequences, T completion positions (right-padded); ``mask`` is 1 on real completion
tokens. Padded positions never count, whatever they hold (NaN/inf included).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor


def _is_number(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


@torch.no_grad()
def top_entropy_mask(entropy: Tensor, mask: Tensor, quantile: float) -> Tensor:
    """Mask of the real tokens whose entropy is in the top ``quantile`` fraction of the batch.

    ``keep_t = 1[H_t >= tau]``, where tau is the ``(1 - quantile)`` quantile of the entropies of all
    real tokens in the batch, with linear interpolation between order statistics (``torch.quantile``'s
    default): sorting the n values as ``v_0 <= ... <= v_{n-1}``, ``p = (1 - quantile)(n - 1)`` and
    ``tau = v_floor(p) + (p - floor(p)) (v_ceil(p) - v_floor(p))``. This is TRL's
    ``get_high_entropy_mask(entropies, mask, 1 - top_entropy_quantile)`` (``trl/trainer/grpo_trainer.py``):
    same quantile, same interpolation, same ``>=``. With 10 distinct values and quantile 0.2,
    p = 7.2, tau lies between v_7 and v_8, and exactly v_8 and v_9 are kept; ties at tau are all
    kept, so with ties the kept share can exceed ``quantile``. The paper trains on the top 20 %
    (quantile 0.2) of each batch's tokens (Wang et al. 2025, arXiv 2506.01939). The threshold is
    taken over this tensor only: in data-parallel training, gather the entropies first (as TRL does)
    for a global one.

    Args:
        entropy: (N, T) per-token entropy of the policy; detached, never receives gradient.
        mask: (N, T) 1 on real completion tokens.
        quantile: the share of real tokens to keep, in (0, 1]; 1 keeps every real token exactly.

    Returns:
        (N, T) float mask (``mask``'s dtype if floating, else float32): 1 on the kept real tokens,
        0 elsewhere; all zeros when there is no real token.
    """
    if not (_is_number(quantile) and 0 < quantile <= 1):
        raise ValueError(f"quantile={quantile!r} is invalid: must be in (0, 1]")
    if entropy.shape != mask.shape or entropy.dim() != 2:
        raise ValueError(
            f"entropy and mask must both be (N, T), got {tuple(entropy.shape)} and {tuple(mask.shape)}"
        )
    out_dtype = mask.dtype if mask.dtype.is_floating_point else torch.float32
    real = mask != 0
    if quantile == 1:
        # Every real token, without going through a quantile whose round-off could drop the minimum.
        return real.to(out_dtype)
    dtype = torch.promote_types(entropy.dtype, torch.float32) if entropy.dtype.is_floating_point else torch.float32
    entropy = entropy.detach().to(dtype)
    values = entropy[real]
    n = values.numel()
    if n == 0:
        return torch.zeros(mask.shape, dtype=out_dtype, device=mask.device)
    # Sort instead of torch.quantile, which refuses inputs above 2**24 elements (a large batch of
    # long completions reaches that); the interpolation below is torch.quantile's "linear".
    ordered = torch.sort(values).values
    position = (1.0 - quantile) * (n - 1)
    below = min(int(math.floor(position)), n - 1)
    above = min(below + 1, n - 1)
    threshold = torch.lerp(ordered[below], ordered[above], position - below)
    keep = real & (entropy >= threshold)
    return keep.to(out_dtype)


def _check_finite(name: str, value: float) -> None:
    if not (_is_number(value) and math.isfinite(value)):
        raise ValueError(f"{name}={value!r} is invalid: must be a finite number")


def adaptive_entropy_coef(
    coef: float, entropy: float, target: float, step: float, max_coef: float | None = None
) -> float:
    """Next entropy-bonus coefficient of Skywork-OR1's adaptive entropy control.

    ``c_{k+1} = c_k + step`` if ``e_k < target``, ``c_k - step`` if ``e_k > target``, ``c_k`` if
    equal, then clipped to ``[0, max_coef]`` (He et al. 2025, arXiv 2505.22312, §3.3). The bonus
    actually applied at step k is ``c_k * 1[e_k <= target]`` (see ``entropy_bonus_active``). The
    released code (``EntController`` in SkyworkAI/Skywork-OR1, ``verl/trainer/ppo/core_algos.py``)
    clips to ``[min_ent_coef, max_ent_coef]``; its training scripts start from ``c_0 = 0`` with
    target 0.2, step 1e-4 and bounds [0, 0.005]. At exact equality that code decreases the
    coefficient while TRL's ``use_adaptive_entropy`` increases it; here it stays put.

    Args:
        coef: the current coefficient ``c_k``.
        entropy: ``e_k``, the policy's mean per-token entropy on the current batch (nats).
        target: the target entropy.
        step: the adjustment ``Delta >= 0``.
        max_coef: upper bound of the coefficient, or None for no upper bound.

    Returns:
        ``c_{k+1}`` as a float in ``[0, max_coef]``.
    """
    for name, value in (("coef", coef), ("entropy", entropy), ("target", target), ("step", step)):
        _check_finite(name, value)
    if step < 0:
        raise ValueError(f"step={step!r} is invalid: must be >= 0")
    if max_coef is not None:
        _check_finite("max_coef", max_coef)
        if max_coef < 0:
            raise ValueError(f"max_coef={max_coef!r} is invalid: must be >= 0 or None")
    if entropy < target:
        coef = coef + step
    elif entropy > target:
        coef = coef - step
    coef = max(float(coef), 0.0)
    return coef if max_coef is None else min(coef, float(max_coef))


def entropy_bonus_active(entropy: float, target: float) -> bool:
    """Whether Skywork-OR1 applies the entropy bonus at this step: ``e_k <= target``.

    The loss carries ``-alpha_k H`` with ``alpha_k = c_k * 1[e_k <= target]`` (He et al. 2025, arXiv
    2505.22312, §3.3), so the bonus only props entropy up from below and never pushes it further
    above the target. TRL applies the same ``<=``; Skywork-OR1's released code uses ``<``.

    Args:
        entropy: ``e_k``, the policy's mean per-token entropy on the current batch (nats).
        target: the target entropy.

    Returns:
        True when the bonus applies.
    """
    _check_finite("entropy", entropy)
    _check_finite("target", target)
    return entropy <= target
