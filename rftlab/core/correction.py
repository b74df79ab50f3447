"""Rollout correction: per-token importance weights for the sampler / trainer mismatch.

The completions are sampled by one implementation of the policy (vLLM, a bf16 sampling copy) and
trained by another (the trainer's own forward), which assign slightly different probabilities to
the same tokens, so an "on-policy" update is in fact off-policy (Yao et al. 2025, "Your Efficient
RL Framework Secretly Brings You Off-Policy RL Training", https://fengyao.notion.site/off-policy-rl).
The fix is importance sampling with the ratio ``pi_train / pi_sampler`` of each sampled token, made
safe by truncating or masking extreme ratios. With

    d = old_logp - sampler_logp        (N, T), the log of pi_train / pi_sampler per token

a correction is a non-negative weight ``w`` (N, T), without gradient, that multiplies each token's
policy-gradient term. Modes are registered by name in ``ROLLOUT_CORRECTIONS``; each is called as

    fn(log_ratio, mask, cap, low, high) -> (weights, corrected)

with ``log_ratio`` and ``mask`` (N, T), and returns the weights (0 on padding) and a bool (N, T)
marking the real tokens whose weight was truncated or masked. Register your own with
``@ROLLOUT_CORRECTIONS.register("name")``; ``correction_weights`` is the entry point.

Shapes: N sequences, T completion positions (right-padded); ``mask`` is 1 on real completion tokens.
Padded positions are excluded with ``torch.where``, so garbage there (NaN/inf log-probs) never
reaches a weight or a metric. Log-ratios are clamped to [-20, 20] before ``exp`` (as verl's
``SAFETY_BOUND``), so every weight is finite.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
from torch import Tensor

from rftlab.core.losses import _LOG_RATIO_CLAMP, _zero_if_padded
from rftlab.core.masked import masked_mean
from rftlab.core.registry import Registry

#: ``fn(log_ratio, mask, cap, low, high) -> (weights, corrected)``, all (N, T); see the module docstring.
ROLLOUT_CORRECTIONS: Registry[Callable[[Tensor, Tensor, float, float, float], "tuple[Tensor, Tensor]"]] = Registry(
    "rollout correction"
)

#: The configuration value that applies no correction (not a registered mode).
NO_CORRECTION = "none"

# Upper bound C of the ratio. 2 is verl's ``rollout_is_threshold`` default and TRL's first
# ``vllm_importance_sampling_cap`` (TRL PR #3867, token-level TIS); TRL's current
# ``vllm_importance_sampling_clip_max`` default is 3.0, chosen with its sequence-level default mode.
_DEFAULT_CAP = 2.0
# IcePop's acceptance region [alpha, beta] = [0.5, 5] (Ring-1T, arXiv 2510.18855; the pair TRL's
# tests use for IcePop and INTELLECT-3's defaults).
_DEFAULT_LOW = 0.5
_DEFAULT_HIGH = 5.0

#: Defaults of ``cap``, ``low`` and ``high`` (sources above), shared with the configuration.
CORRECTION_DEFAULTS: dict[str, float] = {"cap": _DEFAULT_CAP, "low": _DEFAULT_LOW, "high": _DEFAULT_HIGH}

_PREFIX = "rollout_correction/"


def _real(mask: Tensor) -> Tensor:
    return mask != 0


def _safe_exp(log_ratio: Tensor) -> Tensor:
    # The losses' bound (verl's SAFETY_BOUND too): exp(20) ~ 4.9e8 is far beyond any sensible cap,
    # while exp(>88) overflows float32 to inf.
    return torch.exp(log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))


def _cap_weight(like: Tensor, cap: float) -> Tensor:
    # The weight a truncated ratio gets; bounded like the ratios themselves, since a cap beyond the
    # float32 range (a valid "never truncate in practice") would otherwise become inf.
    return torch.full_like(like, min(cap, math.exp(_LOG_RATIO_CLAMP)))


def _row_log_ratio(log_ratio: Tensor, real: Tensor) -> Tensor:
    # log of the sequence ratio prod_t pi_train / pi_sampler = sum of the real tokens' log-ratios
    # (TRL sums ``per_token_logps_diff`` over the completion; verl's ``rollout_is="sequence"`` too).
    return _zero_if_padded(log_ratio, real).sum(dim=-1, keepdim=True)


# Every decision (is the ratio above the cap, inside [low, high]?) is taken in log space on the
# unclamped log-ratio, so it stays exact even where exp() would overflow; only the weight value
# itself goes through the clamped exp().


@ROLLOUT_CORRECTIONS.register("token_truncate")
def _token_truncate(log_ratio: Tensor, mask: Tensor, cap: float, low: float, high: float) -> tuple[Tensor, Tensor]:
    # TIS (Yao et al. 2025): w_t = min(r_t, C).
    real = _real(mask)
    d = _zero_if_padded(log_ratio, real)
    over = real & (d > math.log(cap))
    weights = torch.where(over, _cap_weight(d, cap), _safe_exp(d))
    return _zero_if_padded(weights, real), over


@ROLLOUT_CORRECTIONS.register("token_mask")
def _token_mask(log_ratio: Tensor, mask: Tensor, cap: float, low: float, high: float) -> tuple[Tensor, Tensor]:
    # MIS, token level: w_t = r_t if r_t <= C else 0.
    real = _real(mask)
    d = _zero_if_padded(log_ratio, real)
    over = real & (d > math.log(cap))
    return _zero_if_padded(_safe_exp(d), real & ~over), over


@ROLLOUT_CORRECTIONS.register("sequence_truncate")
def _sequence_truncate(log_ratio: Tensor, mask: Tensor, cap: float, low: float, high: float) -> tuple[Tensor, Tensor]:
    # Sequence-level TIS: w_i = min(prod_t r_t, C), the same weight on every token of row i.
    real = _real(mask)
    s = _row_log_ratio(log_ratio, real)
    over_row = s > math.log(cap)
    row_weight = torch.where(over_row, _cap_weight(s, cap), _safe_exp(s))
    return _zero_if_padded(row_weight.expand_as(real), real), real & over_row


@ROLLOUT_CORRECTIONS.register("sequence_mask")
def _sequence_mask(log_ratio: Tensor, mask: Tensor, cap: float, low: float, high: float) -> tuple[Tensor, Tensor]:
    # Sequence-level MIS: w_i = prod_t r_t if it is <= C, else the whole row gets 0.
    real = _real(mask)
    s = _row_log_ratio(log_ratio, real)
    over_row = s > math.log(cap)
    return _zero_if_padded(_safe_exp(s).expand_as(real), real & ~over_row), real & over_row


@ROLLOUT_CORRECTIONS.register("icepop")
def _icepop(log_ratio: Tensor, mask: Tensor, cap: float, low: float, high: float) -> tuple[Tensor, Tensor]:
    # IcePop (Ring-1T, arXiv 2510.18855): w_t = r_t if alpha <= r_t <= beta else 0, both ends kept.
    real = _real(mask)
    d = _zero_if_padded(log_ratio, real)
    outside = real & ((d < math.log(low)) | (d > math.log(high)))
    return _zero_if_padded(_safe_exp(d), real & ~outside), outside


def _is_number(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_correction_options(mode: str, cap: float, low: float, high: float, where: str | None = None) -> None:
    """Check a rollout-correction configuration before any training.

    Args:
        mode: ``"none"`` or a name in ``ROLLOUT_CORRECTIONS``.
        cap: upper bound C of the ratio for the truncate / mask modes, finite and > 0.
        low: IcePop's lower bound alpha, in (0, 1].
        high: IcePop's upper bound beta, finite and >= 1.
        where: the configuration key the options sit under (e.g. ``"loss.correction"``); it
            prefixes the field name in messages (``"loss.correction.cap=-1 is invalid: ..."``).

    Raises:
        ValueError: naming the field, its value and what it must be; an unknown mode lists the
            valid names.
    """
    prefix = f"{where}." if where else ""
    if mode != NO_CORRECTION and mode not in ROLLOUT_CORRECTIONS:
        valid = ", ".join([NO_CORRECTION, *ROLLOUT_CORRECTIONS.names()])
        raise ValueError(f"{prefix}mode={mode!r} is invalid: must be one of {valid}")
    if not (_is_number(cap) and math.isfinite(cap) and cap > 0):
        raise ValueError(f"{prefix}cap={cap!r} is invalid: must be > 0 and finite")
    if not (_is_number(low) and 0 < low <= 1):
        raise ValueError(f"{prefix}low={low!r} is invalid: must be in (0, 1]")
    if not (_is_number(high) and math.isfinite(high) and high >= 1):
        raise ValueError(f"{prefix}high={high!r} is invalid: must be >= 1 and finite")


def _check_shapes(old_logp: Tensor, sampler_logp: Tensor, mask: Tensor) -> None:
    if not old_logp.shape == sampler_logp.shape == mask.shape or old_logp.dim() != 2:
        raise ValueError(
            "old_logp, sampler_logp and mask must all be (N, T), got "
            f"{tuple(old_logp.shape)}, {tuple(sampler_logp.shape)}, {tuple(mask.shape)}"
        )


def _log_ratio(old_logp: Tensor, sampler_logp: Tensor, real: Tensor) -> Tensor:
    # At least float32: a bf16 difference of two log-probs would lose most of a small gap.
    dtype = torch.promote_types(torch.promote_types(old_logp.dtype, sampler_logp.dtype), torch.float32)
    return _zero_if_padded(old_logp.detach().to(dtype) - sampler_logp.detach().to(dtype), real)


def _gap_metrics(log_ratio: Tensor, mask: Tensor, real: Tensor) -> dict[str, Tensor]:
    gap = log_ratio.abs()  # already 0 on padding
    max_gap = gap.max() if gap.numel() else gap.new_zeros(())
    return {f"{_PREFIX}abs_gap": masked_mean(gap, mask), f"{_PREFIX}max_abs_gap": max_gap}


@torch.no_grad()
def correction_gap_metrics(old_logp: Tensor, sampler_logp: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Size of the sampler / trainer mismatch, for logging when no correction is applied.

    Same statistic as TRL's ``sampling/sampling_logp_difference/{mean,max}``.

    Args:
        old_logp: (N, T) the trainer's log-probs of the sampled tokens.
        sampler_logp: (N, T) the sampler's log-probs of the same tokens.
        mask: (N, T) 1 on real completion tokens.

    Returns:
        Detached 0-dim tensors: ``"rollout_correction/abs_gap"``, the masked mean of
        ``|old_logp - sampler_logp|``, and ``"rollout_correction/max_abs_gap"``, its maximum over
        real tokens; both 0 when there is no real token.
    """
    _check_shapes(old_logp, sampler_logp, mask)
    real = _real(mask)
    return _gap_metrics(_log_ratio(old_logp, sampler_logp, real), mask, real)


@torch.no_grad()
def correction_weights(
    old_logp: Tensor,
    sampler_logp: Tensor,
    mask: Tensor,
    mode: str,
    cap: float = _DEFAULT_CAP,
    low: float = _DEFAULT_LOW,
    high: float = _DEFAULT_HIGH,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token importance weights correcting for the sampler / trainer mismatch.

    With ``r_t = exp(d_t)``, ``d_t = old_logp_t - sampler_logp_t`` (d clamped to [-20, 20] before
    ``exp``) and C = ``cap``:

    - ``"token_truncate"``: ``w_t = min(r_t, C)``, truncated importance sampling (TIS; Yao et al.
      2025; TRL ``vllm_importance_sampling_mode="token_truncate"``, verl ``rollout_is="token"``).
    - ``"token_mask"``: ``w_t = r_t`` if ``r_t <= C`` else 0, masked importance sampling (MIS; TRL
      ``"token_mask"``).
    - ``"sequence_truncate"``: ``w_i = min(exp(sum_t d_t), C)`` on every token of row i (TRL
      ``"sequence_truncate"``, verl ``rollout_is="sequence"``).
    - ``"sequence_mask"``: ``w_i = exp(sum_t d_t)`` if it is ``<= C``, else 0 for the whole row
      (TRL ``"sequence_mask"``, its default mode).
    - ``"icepop"``: ``w_t = r_t`` if ``low <= r_t <= high`` else 0 (IcePop, Ring-1T arXiv
      2510.18855, with [alpha, beta] = [0.5, 5]).
    - ``"none"``: ``w_t = 1``.

    The sequence modes use the SUM of the log-ratio over the row's real tokens, i.e. the ratio
    of the two sequence probabilities, as TRL (``per_token_logps_diff.sum(-1)``) and verl do; the
    clamp to [-20, 20] applies to that sum. The truncate and mask modes bound the ratio from above
    only (TRL's ``vllm_importance_sampling_clip_min`` lower bound is not used); ``icepop`` is the
    two-sided token mask. Bounds are inclusive: a ratio equal to C is kept unchanged.

    Args:
        old_logp: (N, T) the trainer's log-probs of the sampled tokens (treated as constants).
        sampler_logp: (N, T) the sampler's log-probs of the same tokens.
        mask: (N, T) 1 on real completion tokens (any nonzero value counts as real).
        mode: ``"none"`` or a name in ``ROLLOUT_CORRECTIONS``.
        cap: C > 0, upper bound of the ratio in the truncate and mask modes.
        low: IcePop's alpha in (0, 1].
        high: IcePop's beta >= 1.

    Returns:
        ``(weights, metrics)``: weights (N, T), at least float32, >= 0, finite, 0 on padding and
        without gradient; metrics are detached 0-dim tensors: ``"rollout_correction/abs_gap"``
        (masked mean of ``|d|``), ``"rollout_correction/weight_mean"`` (masked mean of w) and
        ``"rollout_correction/corrected_share"`` (share of real tokens whose weight was truncated
        or masked); all 0 when there is no real token.
    """
    check_correction_options(mode, cap, low, high)
    _check_shapes(old_logp, sampler_logp, mask)
    real = _real(mask)
    log_ratio = _log_ratio(old_logp, sampler_logp, real)
    if mode == NO_CORRECTION:
        weights, corrected = real.to(log_ratio.dtype), torch.zeros_like(real)
    else:
        weights, corrected = ROLLOUT_CORRECTIONS.get(mode)(log_ratio, mask, float(cap), float(low), float(high))
        if weights.shape != real.shape or corrected.shape != real.shape:
            raise ValueError(
                f"rollout correction {mode!r} must return (N, T) = {tuple(real.shape)} weights and flags, got "
                f"{tuple(weights.shape)} and {tuple(corrected.shape)}"
            )
        # Enforced here too, so a user-registered mode cannot leak weight onto padding.
        weights = _zero_if_padded(weights.to(log_ratio.dtype), real)
        corrected = corrected.bool() & real
    metrics = {
        f"{_PREFIX}abs_gap": masked_mean(log_ratio.abs(), mask),
        f"{_PREFIX}weight_mean": masked_mean(weights, mask),
        f"{_PREFIX}corrected_share": masked_mean(corrected.to(log_ratio.dtype), mask),
    }
    return weights.detach(), {k: v.detach() for k, v in metrics.items()}
