"""Sequence-level and soft-clipped policy losses: GSPO, GSPO-token, CISPO, SAPO and GMPO.

Importing this module registers five entries of ``POLICY_LOSSES``, selected with
``GRPO(loss="name")`` like the built-in ``"ppo_clip"``:

- ``"gspo"``: one importance ratio per sequence (the geometric mean of its token ratios), clipped
  once per sequence (Group Sequence Policy Optimization, Zheng et al. 2025, arXiv 2507.18071).
- ``"gspo_token"``: the same ratio with per-token advantages and gradients (GSPO-token, same paper).
- ``"cispo"``: REINFORCE weighted by a truncated, stop-gradient importance weight, so no token's
  gradient is ever dropped (MiniMax-M1, arXiv 2506.13585, Eq. 4-5).
- ``"sapo"``: a smooth sigmoid gate in place of the hard clip (Soft Adaptive Policy Optimization,
  Gao et al. 2025, arXiv 2511.20347).
- ``"gmpo"``: the geometric mean over a sequence of per-token clipped ratios (Geometric-Mean Policy
  Optimization, Zhao et al. 2025, arXiv 2507.20673).

Every loss follows the contract of ``rftlab.core.losses``: ``fn(logp, old_logp, advantages, mask,
**options) -> (loss, metrics)``, ``logp``/``old_logp``/``mask`` (N, T), ``advantages`` (N,) or
(N, T). The losses that aggregate per-token terms take the algorithm's ``agg``; the two
sequence-level ones (``"gspo"``, ``"gmpo"``) average one term per sequence over the N rows (a row
without a real token contributes 0 but counts). Their own clip ranges are named apart from the
clip group the algorithm supplies (``eps_low``/``eps_high``), because their scales differ by
orders of magnitude (GSPO's 3e-4 against PPO's 0.2). Padded positions are removed with
``torch.where`` before any arithmetic, and log-ratios are clamped to [-20, 20] before ``exp``, so
garbage on padding or an exploding ratio never turns the loss or its gradient into NaN/inf.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rftlab.core.losses import (
    _LOG_RATIO_CLAMP,
    _broadcast_advantages,
    _mean_over_rows,
    _zero_if_padded,
    aggregate,
    register_policy_loss,
)
from rftlab.core.masked import masked_mean


def _check_shapes(logp: Tensor, old_logp: Tensor, mask: Tensor) -> None:
    if not logp.shape == old_logp.shape == mask.shape or logp.dim() != 2:
        raise ValueError(
            "logp, old_logp and mask must all be (N, T), got "
            f"{tuple(logp.shape)}, {tuple(old_logp.shape)}, {tuple(mask.shape)}"
        )


def _token_inputs(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(real, log_ratio, adv)``: the real-token mask, the clamped log-ratio and the (N, T) advantages,
    both zero on padding."""
    _check_shapes(logp, old_logp, mask)
    real = mask != 0
    adv = _zero_if_padded(_broadcast_advantages(advantages, logp).to(logp.dtype), real)
    # Clamp before exp (see ``_LOG_RATIO_CLAMP``): a token beyond +-20 keeps a finite ratio and gets
    # zero gradient through the clamp, as in ``ppo_clip``.
    log_ratio = _zero_if_padded(logp - old_logp, real).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return real, log_ratio, adv


def _approx_kl(log_ratio: Tensor, mask: Tensor) -> Tensor:
    # k3 estimate of KL(old || new) per token, (r - 1) - log r, as ``ppo_clip`` reports it.
    return masked_mean(torch.exp(log_ratio) - 1.0 - log_ratio, mask)


def _row_mean(values: Tensor, has_tokens: Tensor) -> Tensor:
    # mean over the rows that have a real token; 0 when there is none
    count = has_tokens.sum().clamp_min(1).to(values.dtype)
    return torch.where(has_tokens, values, torch.zeros_like(values)).sum() / count


def _detached(metrics: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in metrics.items()}


# ---------------------------------------------------------------- GSPO


def _check_gspo_options(seq_eps_low: float = 3e-4, seq_eps_high: float = 4e-4) -> None:
    if not 0.0 <= seq_eps_low < 1.0:
        raise ValueError(f"seq_eps_low={seq_eps_low!r} is invalid: must be in [0, 1)")
    if seq_eps_high < 0.0:
        raise ValueError(f"seq_eps_high={seq_eps_high!r} is invalid: must be >= 0")


def _sequence_log_ratio(log_ratio: Tensor, mask: Tensor) -> Tensor:
    # log s_i = (1/|y_i|) sum_t log r_t (GSPO's length-normalised sequence ratio), a mask-weighted
    # mean; 0 (s_i = 1) for a row without a real token. The per-token log-ratios are already in
    # [-20, 20], so their mean is too and exp() stays finite.
    return masked_mean(log_ratio, mask, dim=-1)


@register_policy_loss("gspo")
def gspo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    seq_eps_low: float = 3e-4,
    seq_eps_high: float = 4e-4,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO: a clipped surrogate on one length-normalised importance ratio per sequence.

    Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv 2507.18071, §4 (the GSPO
    objective and its sequence ratio)::

        s_i = exp((1/|y_i|) sum_t (logp_t - old_logp_t))          over row i's real tokens
        l_i = -min(s_i A_i, clip(s_i, 1 - seq_eps_low, 1 + seq_eps_high) A_i)
        loss = (1/N) sum_i l_i

    ``A_i`` is the row's advantage; given (N, T) advantages it is their mask-weighted mean over the
    row's real tokens (the paper has one advantage per response). A row with no real token
    contributes 0 and still counts in N. Clipping a whole sequence at once is why the ranges are
    tiny: the paper trains with 3e-4 / 4e-4 (§5.1), the defaults here. Each token's log-ratio is
    clamped to [-20, 20] first (such a token gets zero gradient).

    Args:
        logp: (N, T) log-probs of the sampled tokens under the current policy (with grad).
        old_logp: (N, T) log-probs under the sampling policy (no grad).
        advantages: (N,) per sequence, or (N, T) (reduced to the row's masked mean).
        mask: (N, T) 1 on real completion tokens (a float loss mask weighs the token mean).
        seq_eps_low: in [0, 1), lower clip ``1 - seq_eps_low`` of the sequence ratio.
        seq_eps_high: >= 0, upper clip ``1 + seq_eps_high``.

    Returns:
        ``(loss, metrics)``: 0-dim loss; detached 0-dim metrics, shares over the rows that have a
        real token: ``"clip_ratio/low"`` rows with ``A_i < 0 and s_i < 1 - seq_eps_low``,
        ``"clip_ratio/high"`` rows with ``A_i > 0 and s_i > 1 + seq_eps_high``;
        ``"gspo/seq_ratio_mean"`` the mean ``s_i`` over those rows; ``"approx_kl"`` the masked token
        mean of ``(r - 1) - log r``.
    """
    _check_gspo_options(seq_eps_low, seq_eps_high)
    real, log_ratio, adv = _token_inputs(logp, old_logp, advantages, mask)
    has_tokens = real.any(dim=-1)
    seq_adv = masked_mean(adv, mask, dim=-1)
    seq_ratio = torch.exp(_sequence_log_ratio(log_ratio, mask))
    # -min(sA, clip(s)A) == max(-sA, -clip(s)A); where the clipped term wins its clamp() passes no
    # gradient, so the whole sequence stops pushing (the paper's sequence-level trust region).
    per_row = torch.maximum(-seq_adv * seq_ratio, -seq_adv * seq_ratio.clamp(1.0 - seq_eps_low, 1.0 + seq_eps_high))
    loss = _mean_over_rows(torch.where(has_tokens, per_row, torch.zeros_like(per_row)))
    with torch.no_grad():
        metrics = {
            "clip_ratio/low": _row_mean(((seq_adv < 0) & (seq_ratio < 1.0 - seq_eps_low)).to(logp.dtype), has_tokens),
            "clip_ratio/high": _row_mean(((seq_adv > 0) & (seq_ratio > 1.0 + seq_eps_high)).to(logp.dtype), has_tokens),
            "gspo/seq_ratio_mean": _row_mean(seq_ratio, has_tokens),
            "approx_kl": _approx_kl(log_ratio, mask),
        }
    return loss, _detached(metrics)


gspo_loss.check_options = _check_gspo_options


@register_policy_loss("gspo_token")
def gspo_token_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    agg: str = "seq-mean-token-mean",
    seq_eps_low: float = 3e-4,
    seq_eps_high: float = 4e-4,
    max_len: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO-token: GSPO's sequence ratio with a per-token advantage and a per-token gradient.

    Zheng et al. 2025, arXiv 2507.18071, §4 (GSPO-token)::

        s_{i,t} = sg[s_i] * pi(y_{i,t}) / sg[pi(y_{i,t})]   (value s_i, gradient of token t's own log-prob)
        l_{i,t} = -min(s_{i,t} A_{i,t}, clip(s_{i,t}, 1 - seq_eps_low, 1 + seq_eps_high) A_{i,t})

    aggregated with ``agg``. The paper averages ``(1/G) sum_i (1/|y_i|) sum_t``, i.e.
    ``"seq-mean-token-mean"``; with that aggregation and one advantage per sequence the value, the
    clipping decisions and the gradient all equal ``"gspo"``'s (the paper's remark after the
    GSPO-token objective). A token whose log-ratio is beyond +-20 gets zero gradient, as in
    ``"gspo"``.

    Args:
        logp: (N, T) log-probs of the sampled tokens under the current policy (with grad).
        old_logp: (N, T) log-probs under the sampling policy (no grad).
        advantages: (N,) per sequence, broadcast over T, or (N, T) per token.
        mask: (N, T) 1 on real completion tokens.
        agg: a mode of ``aggregate`` (supplied by the algorithm).
        max_len: the constant of ``agg="seq-mean-token-sum-norm"`` (supplied by the algorithm; None: T).
        seq_eps_low: in [0, 1), lower clip ``1 - seq_eps_low`` of the sequence ratio.
        seq_eps_high: >= 0, upper clip ``1 + seq_eps_high``.

    Returns:
        ``(loss, metrics)``: 0-dim loss; detached 0-dim metrics, masked token means:
        ``"clip_ratio/low"`` tokens with ``A < 0 and s_i < 1 - seq_eps_low``, ``"clip_ratio/high"``
        tokens with ``A > 0 and s_i > 1 + seq_eps_high``; ``"gspo/seq_ratio_mean"`` the mean ``s_i``
        over the rows that have a real token; ``"approx_kl"`` the masked token mean of
        ``(r - 1) - log r``.
    """
    _check_gspo_options(seq_eps_low, seq_eps_high)
    real, log_ratio, adv = _token_inputs(logp, old_logp, advantages, mask)
    has_tokens = real.any(dim=-1)
    seq_log_ratio = _sequence_log_ratio(log_ratio, mask)
    # log s_{i,t} = sg[log s_i] + log_ratio_t - sg[log_ratio_t]: the added term is exactly 0 in value
    # and carries d/dlogp_t through the same [-20, 20] clamp that ``"gspo"`` applies.
    token_log_ratio = seq_log_ratio.detach().unsqueeze(-1) + (log_ratio - log_ratio.detach())
    ratio = torch.exp(token_log_ratio)
    per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - seq_eps_low, 1.0 + seq_eps_high))
    loss = aggregate(per_token, mask, agg, max_len)
    with torch.no_grad():
        metrics = {
            "clip_ratio/low": masked_mean(((adv < 0) & (ratio < 1.0 - seq_eps_low)).to(logp.dtype), mask),
            "clip_ratio/high": masked_mean(((adv > 0) & (ratio > 1.0 + seq_eps_high)).to(logp.dtype), mask),
            "gspo/seq_ratio_mean": _row_mean(torch.exp(seq_log_ratio), has_tokens),
            "approx_kl": _approx_kl(log_ratio, mask),
        }
    return loss, _detached(metrics)


gspo_token_loss.check_options = _check_gspo_options


# ---------------------------------------------------------------- CISPO


def _check_cispo_options(is_eps_low: float | None = None, is_eps_high: float = 4.0) -> None:
    if is_eps_low is not None and is_eps_low < 0.0:
        raise ValueError(f"is_eps_low={is_eps_low!r} is invalid: must be None (no lower bound) or >= 0")
    if is_eps_high < 0.0:
        raise ValueError(f"is_eps_high={is_eps_high!r} is invalid: must be >= 0")


@register_policy_loss("cispo")
def cispo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    agg: str = "token-mean",
    is_eps_low: float | None = None,
    is_eps_high: float = 4.0,
    max_len: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO: REINFORCE with a truncated, stop-gradient importance weight on every token.

    MiniMax-M1, arXiv 2506.13585, Eq. 4-5::

        w_t = sg(clip(r_t, 1 - is_eps_low, 1 + is_eps_high)),   r_t = exp(logp_t - old_logp_t)
        l_t = -w_t A_t logp_t

    aggregated with ``agg`` (the paper normalises by the batch's token count, ``"token-mean"``).
    Unlike PPO's clip, which zeroes the gradient of a token whose ratio left the range, the
    truncation only bounds the weight, so every token keeps its ``-w A grad(logp)`` gradient (the
    point of CISPO: rare "fork" tokens with large ratios are not dropped). The loss value itself
    is only meaningful through its gradient.

    Defaults: the paper imposes no lower bound (it sets the lower range large) and tunes only the
    upper one, hence ``is_eps_low = None``. ``is_eps_high = 4.0`` caps the weight at 5: the
    ``epsilon_high = 5.0`` TRL recommends for ``loss_type="cispo"`` (a cap on the ratio itself, the
    ``epsilon_max`` of the ScaleRL recipe, Khatri et al. 2025, arXiv 2510.13786). Other
    implementations truncate lower (verl's CISPO example at 1.2, Tinker's default at 4), so tune it.

    Args:
        logp: (N, T) log-probs of the sampled tokens under the current policy (with grad).
        old_logp: (N, T) log-probs under the sampling policy (no grad).
        advantages: (N,) per sequence, broadcast over T, or (N, T) per token.
        mask: (N, T) 1 on real completion tokens.
        agg: a mode of ``aggregate`` (supplied by the algorithm).
        max_len: the constant of ``agg="seq-mean-token-sum-norm"`` (supplied by the algorithm; None: T).
        is_eps_low: None for no lower bound, or >= 0: weights below ``1 - is_eps_low`` are raised to it.
        is_eps_high: >= 0, weights above ``1 + is_eps_high`` are truncated to it.

    Returns:
        ``(loss, metrics)``: 0-dim loss; detached 0-dim masked token means:
        ``"cispo/truncated_share"`` tokens whose weight was truncated (either bound),
        ``"cispo/weight_mean"`` the weight ``w``, ``"approx_kl"`` ``(r - 1) - log r``.
    """
    _check_cispo_options(is_eps_low, is_eps_high)
    real, log_ratio, adv = _token_inputs(logp, old_logp, advantages, mask)
    ratio = torch.exp(log_ratio)
    low = None if is_eps_low is None else 1.0 - is_eps_low
    weight = ratio.clamp(min=low, max=1.0 + is_eps_high).detach()
    # logp itself enters the loss: zero it on padding so the per-token loss is 0 there, not NaN,
    # even for an aggregation that multiplies by the mask instead of selecting with it.
    per_token = -weight * adv * _zero_if_padded(logp, real)
    loss = aggregate(per_token, mask, agg, max_len)
    with torch.no_grad():
        metrics = {
            "cispo/truncated_share": masked_mean((weight != ratio).to(logp.dtype), mask),
            "cispo/weight_mean": masked_mean(weight, mask),
            "approx_kl": _approx_kl(log_ratio, mask),
        }
    return loss, _detached(metrics)


cispo_loss.check_options = _check_cispo_options


# ---------------------------------------------------------------- SAPO


def _check_sapo_options(tau_pos: float = 1.0, tau_neg: float = 1.05) -> None:
    for name, value in (("tau_pos", tau_pos), ("tau_neg", tau_neg)):
        if not value > 0.0:
            raise ValueError(f"{name}={value!r} is invalid: must be > 0")


@register_policy_loss("sapo")
def sapo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    agg: str = "seq-mean-token-mean",
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    max_len: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """SAPO: a temperature-controlled sigmoid gate on the token ratio instead of the hard clip.

    Gao et al. 2025, "Soft Adaptive Policy Optimization", arXiv 2511.20347 (the SAPO objective and
    its gate)::

        f(r) = sigmoid(tau (r - 1)) * 4 / tau,   tau = tau_pos if A > 0 else tau_neg
        l_t  = -f(r_t) A_t

    aggregated with ``agg`` (the paper averages per-sequence token means, ``"seq-mean-token-mean"``).
    The gradient is ``-w r A grad(logp)`` with ``w = 4 sigmoid (1 - sigmoid)``: 1 at ``r = 1``
    (where SAPO's gradient equals the unclipped surrogate's) and decaying smoothly as ``r`` leaves 1,
    faster for larger ``tau``. The paper takes ``tau_neg > tau_pos`` because negative-advantage
    updates spread probability mass over many unsampled tokens and destabilise training sooner;
    the defaults 1.0 / 1.05 are the paper's, as used by verl (``actor.tau_pos/tau_neg``) and TRL
    (``sapo_temperature_pos/neg``). ``A = 0`` takes ``tau_neg`` (its loss and gradient are 0 anyway).

    Args:
        logp: (N, T) log-probs of the sampled tokens under the current policy (with grad).
        old_logp: (N, T) log-probs under the sampling policy (no grad).
        advantages: (N,) per sequence, broadcast over T, or (N, T) per token.
        mask: (N, T) 1 on real completion tokens.
        agg: a mode of ``aggregate`` (supplied by the algorithm).
        max_len: the constant of ``agg="seq-mean-token-sum-norm"`` (supplied by the algorithm; None: T).
        tau_pos: > 0, gate temperature for tokens with ``A > 0``.
        tau_neg: > 0, gate temperature for tokens with ``A <= 0``.

    Returns:
        ``(loss, metrics)``: 0-dim loss; detached 0-dim masked token means:
        ``"sapo/gate_weight_mean"`` the gradient weight ``w = 4 sigmoid (1 - sigmoid)`` (1 on-policy),
        ``"approx_kl"`` ``(r - 1) - log r``.
    """
    _check_sapo_options(tau_pos, tau_neg)
    real, log_ratio, adv = _token_inputs(logp, old_logp, advantages, mask)
    ratio = torch.exp(log_ratio)
    tau = torch.where(adv > 0, torch.full_like(adv, tau_pos), torch.full_like(adv, tau_neg))
    gate = torch.sigmoid(tau * (ratio - 1.0))
    # The 4 / tau factor makes the gate's slope at r = 1 equal to 1 whatever tau is.
    per_token = -(gate * 4.0 / tau) * adv
    loss = aggregate(per_token, mask, agg, max_len)
    with torch.no_grad():
        metrics = {
            "sapo/gate_weight_mean": masked_mean(4.0 * gate * (1.0 - gate), mask),
            "approx_kl": _approx_kl(log_ratio, mask),
        }
    return loss, _detached(metrics)


sapo_loss.check_options = _check_sapo_options


# ---------------------------------------------------------------- GMPO


def _check_gmpo_options(log_eps_low: float = 0.4, log_eps_high: float = 0.4) -> None:
    for name, value in (("log_eps_low", log_eps_low), ("log_eps_high", log_eps_high)):
        if value < 0.0:
            raise ValueError(f"{name}={value!r} is invalid: must be >= 0")


@register_policy_loss("gmpo")
def gmpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    log_eps_low: float = 0.4,
    log_eps_high: float = 0.4,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GMPO: maximise the geometric mean of a sequence's per-token clipped ratios, times its advantage.

    Zhao et al. 2025, "Geometric-Mean Policy Optimization", arXiv 2507.20673 (the GMPO objective),
    computed in log space with ``g = sign(A_i)``::

        c_t  = clamp(log r_t, -log_eps_low, log_eps_high)
        u_t  = g * min(g log r_t, g c_t)         (pessimistic: clipped only where it helps the objective)
        R_i  = exp((1/|y_i|) sum_t u_t)
        loss = (1/N) sum_i -A_i R_i

    So for ``A_i > 0`` a token's log-ratio is capped at ``log_eps_high`` (zero gradient beyond),
    for ``A_i < 0`` floored at ``-log_eps_low``. ``A_i`` is the row's advantage; given (N, T)
    advantages it is their mask-weighted mean over the row's real tokens (the paper, like verl's
    ``geo_mean`` and TRL's GMPO, uses one advantage per sequence). A row with no real token
    contributes 0 and still counts in N. Defaults: the paper's clip range ``(e^-0.4, e^0.4)``, also
    the default of verl's GMPO example and of TRL's ``GMPOConfig``.

    Args:
        logp: (N, T) log-probs of the sampled tokens under the current policy (with grad).
        old_logp: (N, T) log-probs under the sampling policy (no grad).
        advantages: (N,) per sequence, or (N, T) (reduced to the row's masked mean).
        mask: (N, T) 1 on real completion tokens (a float loss mask weighs the token mean).
        log_eps_low: >= 0, per-token log-ratio floor ``-log_eps_low`` (for ``A_i < 0``).
        log_eps_high: >= 0, per-token log-ratio cap ``log_eps_high`` (for ``A_i > 0``).

    Returns:
        ``(loss, metrics)``: 0-dim loss; detached 0-dim metrics: ``"clip_ratio/low"`` masked token
        share with ``A_i < 0 and log r < -log_eps_low``, ``"clip_ratio/high"`` with
        ``A_i > 0 and log r > log_eps_high``; ``"gmpo/seq_ratio_mean"`` the mean ``R_i`` over the
        rows that have a real token; ``"approx_kl"`` the masked token mean of ``(r - 1) - log r``.
    """
    _check_gmpo_options(log_eps_low, log_eps_high)
    real, log_ratio, adv = _token_inputs(logp, old_logp, advantages, mask)
    has_tokens = real.any(dim=-1)
    seq_adv = masked_mean(adv, mask, dim=-1)
    sign = torch.sign(seq_adv).unsqueeze(-1)
    clipped = log_ratio.clamp(-log_eps_low, log_eps_high)
    # The min over sign-flipped terms is PPO's pessimistic bound in log space (the paper clips
    # token ratios before the geometric mean, unlike GSPO, which clips the mean).
    bounded = sign * torch.minimum(sign * log_ratio, sign * clipped)
    seq_ratio = torch.exp(masked_mean(bounded, mask, dim=-1))
    per_row = -seq_adv * seq_ratio
    loss = _mean_over_rows(torch.where(has_tokens, per_row, torch.zeros_like(per_row)))
    with torch.no_grad():
        row_adv = seq_adv.unsqueeze(-1).expand_as(log_ratio)
        metrics = {
            "clip_ratio/low": masked_mean(((row_adv < 0) & (log_ratio < -log_eps_low)).to(logp.dtype), mask),
            "clip_ratio/high": masked_mean(((row_adv > 0) & (log_ratio > log_eps_high)).to(logp.dtype), mask),
            "gmpo/seq_ratio_mean": _row_mean(seq_ratio, has_tokens),
            "approx_kl": _approx_kl(log_ratio, mask),
        }
    return loss, _detached(metrics)


gmpo_loss.check_options = _check_gmpo_options
