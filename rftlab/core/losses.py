"""Policy and value losses, their aggregation over tokens, and per-token KL estimators.

Whole policy losses are registered by name in ``POLICY_LOSSES`` and chosen with
``GRPO(loss="name")``. Every policy loss is called as

    fn(logp, old_logp, advantages, mask, **options) -> (loss, metrics)

with ``logp`` (N, T) the current log-probs (with grad), ``old_logp`` (N, T) the sampling policy's
(equal to ``logp.detach()`` when a rollout feeds a single update: no extra forward is run then),
``advantages`` (N,) or (N, T), ``mask`` (N, T) 1 on the tokens that carry loss, and keyword options
(its own, or inputs the algorithm supplies when the loss names them: ``eps_low``, ``eps_high``,
``dual_clip`` from the clip group and ``agg``). ``metrics`` maps namespaced names to detached
0-dim tensors; they reach every logger. Register your own with ``@register_policy_loss("name")``.

Shapes: N sequences, T completion positions (right-padded); ``mask`` is 1 on real completion
tokens (EOS included), 0 on padding. Padded positions are excluded with ``torch.where`` so garbage
there (e.g. an inf log-ratio) never reaches the loss or its gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from rftlab.core.masked import masked_mean, masked_sum, masked_var
from rftlab.core.registry import Registry

#: ``fn(per_token, mask, max_len) -> 0-dim loss`` with per_token and mask (N, T).
AGGREGATIONS: Registry[Callable[[Tensor, Tensor, "int | None"], Tensor]] = Registry("aggregation")

#: ``fn(d) -> per-token estimate of KL(policy || ref)``, with ``d = ref_logp - logp`` (N, T).
KL_ESTIMATORS: Registry[Callable[[Tensor], Tensor]] = Registry("KL estimator")

#: Whole policy losses, ``fn(logp, old_logp, advantages, mask, **options) -> (loss, metrics)``.
POLICY_LOSSES: Registry[Callable[..., "tuple[Tensor, dict[str, Tensor]]"]] = Registry("policy loss")

#: The positional inputs every policy loss takes, in order.
POLICY_LOSS_CONTRACT = ("logp", "old_logp", "advantages", "mask")


def register_policy_loss(name: str, fn: Callable[..., "tuple[Tensor, dict[str, Tensor]]"] | None = None, *,
                         overwrite: bool = False):
    """Register a whole policy loss under ``name`` (usable as a decorator).

    The function is called as ``fn(logp, old_logp, advantages, mask, **options)`` (shapes in this
    module's docstring) and returns ``(loss, metrics)``: a 0-dim loss to minimise and a dict of
    namespaced, detached 0-dim metrics. Keyword parameters are its options, typed by their
    annotations and checked when an algorithm is built; the algorithm fills ``eps_low``,
    ``eps_high``, ``dual_clip`` (its clip group) and ``agg`` (its loss aggregation) when named.

    Args:
        name: the name algorithms select it by (``GRPO(loss=name)``).
        fn: the loss; omitted when used as ``@register_policy_loss(name)``.
        overwrite: replace an existing entry of that name.
    """
    return POLICY_LOSSES.register(name, fn, overwrite=overwrite)


# Log-ratios are clamped to this range before exp(): exp(20) ~ 4.9e8 is far outside any clip
# range, so no clipping decision changes, while exp(>88) would overflow float32 to inf and its
# gradient to NaN (verl clamps the same way in ``compute_policy_loss``).
_LOG_RATIO_CLAMP = 20.0


def _zero_if_padded(x: Tensor, real: Tensor) -> Tensor:
    return torch.where(real, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _mean_over_rows(row_values: Tensor) -> Tensor:
    # mean over N rows that is 0 (not NaN) for an empty batch
    return row_values.sum() / max(row_values.shape[0], 1)


@AGGREGATIONS.register("token-mean")
def _agg_token_mean(per_token: Tensor, mask: Tensor, max_len: int | None) -> Tensor:
    # DAPO arXiv 2503.14476 §3.3: every token of the batch weighs the same.
    return masked_mean(per_token, mask)


@AGGREGATIONS.register("seq-mean-token-mean")
def _agg_seq_mean_token_mean(per_token: Tensor, mask: Tensor, max_len: int | None) -> Tensor:
    # GRPO, DeepSeekMath arXiv 2402.03300 Eq. 3: (1/G) sum_i (1/|o_i|) sum_t.
    return _mean_over_rows(masked_mean(per_token, mask, dim=-1))


@AGGREGATIONS.register("seq-mean-token-sum")
def _agg_seq_mean_token_sum(per_token: Tensor, mask: Tensor, max_len: int | None) -> Tensor:
    return _mean_over_rows(masked_sum(per_token, mask, dim=-1))


@AGGREGATIONS.register("seq-mean-token-sum-norm")
def _agg_seq_mean_token_sum_norm(per_token: Tensor, mask: Tensor, max_len: int | None) -> Tensor:
    # Dr. GRPO arXiv 2503.20783 §3.2: divide by a constant instead of each length |o_i|, which
    # removes the length bias; the constant is the generation budget (the algorithms supply it). T,
    # the longest completion of the batch, would change the scale of the step from batch to batch.
    max_len = per_token.shape[-1] if max_len is None else max_len
    return masked_sum(per_token, mask) / (max(per_token.shape[0], 1) * max_len)


def aggregate(per_token: Tensor, mask: Tensor, mode: str, max_len: int | None = None) -> Tensor:
    """Reduce a per-token loss to a scalar, by the name of a mode in ``AGGREGATIONS``.

    With ``m`` the mask and i over the N sequences:

    - ``"token-mean"``: ``sum(l m) / sum(m)`` (DAPO arXiv 2503.14476 §3.3)
    - ``"seq-mean-token-mean"``: ``mean_i [sum_t l m / sum_t m]`` (GRPO, arXiv 2402.03300 Eq. 3)
    - ``"seq-mean-token-sum"``: ``mean_i sum_t l m``
    - ``"seq-mean-token-sum-norm"``: ``sum(l m) / (N * max_len)`` (Dr. GRPO arXiv 2503.20783 §3.2)

    Mode names follow verl's ``agg_loss`` (``verl/trainer/ppo/core_algos.py``). In the seq-mean
    modes a row with no real token contributes 0 but still counts in N; an all-masked (or empty)
    batch gives 0, never NaN.

    Args:
        per_token: (N, T) per-token loss.
        mask: (N, T) 1 on real tokens.
        mode: a name in ``AGGREGATIONS``.
        max_len: constant of ``"seq-mean-token-sum-norm"`` (>= 1), default T; ignored by the others.

    Returns:
        0-dim tensor.
    """
    fn = AGGREGATIONS.get(mode)
    if per_token.dim() != 2 or per_token.shape != mask.shape:
        raise ValueError(
            f"per_token and mask must both be (N, T), got {tuple(per_token.shape)} and {tuple(mask.shape)}"
        )
    if max_len is not None and max_len < 1:
        raise ValueError(f"max_len must be >= 1 or None, got {max_len}")
    return fn(per_token, mask, max_len)


def _broadcast_advantages(advantages: Tensor, like: Tensor) -> Tensor:
    if advantages.shape == like.shape:
        return advantages
    if advantages.dim() == 1 and advantages.shape[0] == like.shape[0]:
        return advantages.unsqueeze(-1).expand_as(like)  # one advantage per sequence
    raise ValueError(
        f"advantages must be (N,) or (N, T) = {tuple(like.shape)}, got {tuple(advantages.shape)}"
    )


def _check_clip_params(eps_low: float, eps_high: float, dual_clip: float | None) -> None:
    if eps_low < 0:
        raise ValueError(f"eps_low must be >= 0, got {eps_low}")
    if eps_high < eps_low:
        raise ValueError(f"eps_high must be >= eps_low, got eps_high={eps_high} < eps_low={eps_low}")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be None or > 1, got {dual_clip}")


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    agg: str = "token-mean",
    dual_clip: float | None = None,
    max_len: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate policy loss (PPO / GRPO / DAPO), aggregated by ``agg``.

    Per token, ``r = exp(logp - old_logp)`` and
    ``l = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)``
    (PPO ``L^CLIP``, Schulman et al. 2017 arXiv 1707.06347 Eq. 7; decoupled ``eps_low < eps_high``
    is DAPO's Clip-Higher, arXiv 2503.14476 §3.1). With ``dual_clip = c > 1``, for ``A < 0``:
    ``l = min(l, -c A)``, bounding the loss of a negative-advantage token whose ratio exploded
    (Ye et al. 2020 arXiv 1912.09729, dual-clip PPO). The log-ratio is clamped to [-20, 20] before
    ``exp`` so a huge difference stays finite (tokens beyond that get zero gradient).

    Args:
        logp: (N, T) log-probs of the sampled tokens under the current policy (with grad).
        old_logp: (N, T) log-probs under the sampling policy (no grad).
        advantages: (N, T), or (N,) per sequence, broadcast over T.
        mask: (N, T) 1 on real completion tokens.
        eps_low: >= 0, lower clip ``1 - eps_low``.
        eps_high: >= eps_low, upper clip ``1 + eps_high``.
        agg: a mode of ``aggregate`` / ``AGGREGATIONS``.
        dual_clip: None, or c > 1.
        max_len: the constant of ``agg="seq-mean-token-sum-norm"`` (the generation budget, supplied
            by the algorithm); None uses T.

    Returns:
        ``(loss, metrics)``: 0-dim loss; metrics are detached 0-dim tensors, masked token-means:
        ``"clip_ratio/low"`` fraction with ``A < 0 and r < 1 - eps_low``; ``"clip_ratio/high"``
        with ``A > 0 and r > 1 + eps_high``; ``"clip_ratio/dual"`` (only if ``dual_clip``) where
        the dual clip binds; ``"approx_kl"`` the k3 estimate of KL(old || new),
        ``(r - 1) - log r`` (Schulman, "Approximating KL divergence", 2020).
    """
    _check_clip_params(eps_low, eps_high, dual_clip)
    if not logp.shape == old_logp.shape == mask.shape or logp.dim() != 2:
        raise ValueError(
            "logp, old_logp and mask must all be (N, T), got "
            f"{tuple(logp.shape)}, {tuple(old_logp.shape)}, {tuple(mask.shape)}"
        )
    real = mask != 0
    adv = _zero_if_padded(_broadcast_advantages(advantages, logp).to(logp.dtype), real)
    log_ratio = _zero_if_padded(logp - old_logp, real).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    # -min(rA, clip(r)A) == max(-rA, -clip(r)A): when the clipped term wins, its clamp() has zero
    # gradient, which is the point of PPO's pessimistic bound.
    per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high))
    metrics: dict[str, Tensor] = {}
    if dual_clip is not None:
        cap = -adv * dual_clip
        negative = adv < 0
        metrics["clip_ratio/dual"] = masked_mean((negative & (per_token > cap)).to(logp.dtype), mask)
        per_token = torch.where(negative, torch.minimum(per_token, cap), per_token)
    loss = aggregate(per_token, mask, agg, max_len)
    with torch.no_grad():
        metrics["clip_ratio/low"] = masked_mean(((adv < 0) & (ratio < 1.0 - eps_low)).to(logp.dtype), mask)
        metrics["clip_ratio/high"] = masked_mean(((adv > 0) & (ratio > 1.0 + eps_high)).to(logp.dtype), mask)
        metrics["approx_kl"] = masked_mean((ratio - 1.0) - log_ratio, mask)
    return loss, {k: v.detach() for k, v in metrics.items()}


POLICY_LOSSES.register("ppo_clip", policy_loss)


@KL_ESTIMATORS.register("k1")
def _kl_k1(d: Tensor) -> Tensor:
    return -d


@KL_ESTIMATORS.register("k2")
def _kl_k2(d: Tensor) -> Tensor:
    return 0.5 * d**2


@KL_ESTIMATORS.register("k3")
def _kl_k3(d: Tensor) -> Tensor:
    # exp(d) overflows float32 for d > 88 (and its gradient with it); clamping at +-20 (as verl's
    # "low_var_kl") only changes tokens whose policy and reference already disagree by e^20.
    d = d.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return torch.exp(d) - d - 1.0


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str = "k3") -> Tensor:
    """Per-token estimate of KL(policy || ref) from sampled-token log-probs (no masking, no mean).

    With ``d = ref_logp - logp`` (the log of ref/policy at a token sampled from the policy):
    ``k1 = -d`` (unbiased, high variance), ``k2 = d^2 / 2`` (biased, low variance),
    ``k3 = exp(d) - d - 1`` (unbiased, low variance, >= 0), from John Schulman, "Approximating KL
    divergence" (2020); k3 is the GRPO penalty, DeepSeekMath arXiv 2402.03300 Eq. 4. For k3, d is
    clamped to [-20, 20] before ``exp`` for numerical safety.

    Args:
        logp: (N, T) (any shape) current-policy log-probs.
        ref_logp: same shape, reference-policy log-probs.
        kind: a name in ``KL_ESTIMATORS``.

    Returns:
        Same shape as ``logp``; aggregate it with ``aggregate`` (or add it to rewards for PPO).
    """
    fn = KL_ESTIMATORS.get(kind)
    if logp.shape != ref_logp.shape:
        raise ValueError(
            "logp and ref_logp must have the same shape, got "
            f"{tuple(logp.shape)} and {tuple(ref_logp.shape)}"
        )
    return fn(ref_logp - logp)


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss (PPO critic), per token ``max`` of the unclipped and clipped squared errors.

    ``loss = 0.5 * token-mean(max((V - R)^2, (V_old + clamp(V - V_old, -clip, clip) - R)^2))``.

    Value clipping is not in the PPO paper (arXiv 1707.06347); it comes from OpenAI baselines
    ``ppo2/model.py`` and is studied in Engstrom et al. 2020 arXiv 2005.12729. ``clip <= 0`` gives
    the unclipped loss ``0.5 * token-mean((V - R)^2)``. When the clipped term is strictly larger,
    ``V - V_old`` is outside the clip range, so that token's gradient is zero.

    Args:
        values: (N, T) current value predictions (with grad).
        old_values: (N, T) predictions at rollout time.
        returns: (N, T) targets (e.g. from ``gae``).
        mask: (N, T) 1 on real completion tokens.
        clip: clip range of ``V - V_old``; <= 0 disables clipping.

    Returns:
        ``(loss, metrics)``: 0-dim loss; ``metrics["value/clip_ratio"]`` the masked fraction of
        tokens where the clipped term is strictly larger (0 when unclipped), detached.
    """
    if not values.shape == old_values.shape == returns.shape == mask.shape or values.dim() != 2:
        raise ValueError(
            "values, old_values, returns and mask must all be (N, T), got "
            f"{tuple(values.shape)}, {tuple(old_values.shape)}, {tuple(returns.shape)}, {tuple(mask.shape)}"
        )
    real = mask != 0
    values = _zero_if_padded(values, real)
    old_values = _zero_if_padded(old_values.to(values.dtype), real)
    returns = _zero_if_padded(returns.to(values.dtype), real)
    unclipped = (values - returns) ** 2
    if clip > 0:
        clipped_values = old_values + (values - old_values).clamp(-clip, clip)
        clipped = (clipped_values - returns) ** 2
        per_token = torch.maximum(unclipped, clipped)
        frac = masked_mean((clipped > unclipped).to(values.dtype), mask)
    else:
        per_token = unclipped
        frac = values.new_zeros(())
    loss = 0.5 * aggregate(per_token, mask, "token-mean")
    return loss, {"value/clip_ratio": frac.detach()}


@torch.no_grad()
def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 - var(R - V) / var(R)`` over real positions: 1 is a perfect critic, <= 0 a useless one.

    Variances are the biased masked ones (``masked_var``; the n/(n-1) factor cancels in the ratio).
    Returns 0 (not NaN/inf) when ``var(R)`` is 0 up to round-off (``var(R) <= eps * mean(R^2 + V^2)``,
    eps of the dtype), including when there is no real position.
    Diagnostic only: computed without grad. Same metric as CleanRL's ``losses/explained_variance``.

    Args:
        values: (N, T) value predictions.
        returns: (N, T) targets.
        mask: (N, T) 1 on real completion tokens.

    Returns:
        0-dim tensor.
    """
    if not values.shape == returns.shape == mask.shape:
        raise ValueError(
            f"values, returns and mask must have the same shape, got "
            f"{tuple(values.shape)}, {tuple(returns.shape)}, {tuple(mask.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(values.dtype, returns.dtype), torch.float32)
    values, returns = values.to(dtype), returns.to(dtype)
    var_returns = masked_var(returns, mask)
    # Returns constant up to round-off carry no variance to explain. GAE's ``returns = A + V``
    # cancels only approximately (all-zero rewards give returns ~1e-9, not 0), and dividing by
    # that variance would report ~ -1e14; so var(R) <= eps * mean(R^2 + V^2) counts as 0.
    scale = masked_mean(returns**2 + values**2, mask)
    if var_returns <= torch.finfo(dtype).eps * scale:
        return var_returns.new_zeros(())
    return 1.0 - masked_var(returns - values, mask) / var_returns
