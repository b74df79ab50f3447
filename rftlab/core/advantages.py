"""Advantage estimators: group-relative (GRPO / DAPO / Dr. GRPO) and GAE (PPO), plus whitening.

Whole estimators are registered by name in ``ADVANTAGE_ESTIMATORS`` and chosen with
``GRPO(advantage="name")``. Every estimator is called as

    fn(rewards (N,), group_size, mask (N, T), **options) -> advantages (N,) or (N, T)

where ``rewards`` are the (shaped) outcome rewards, groups are consecutive blocks of
``group_size`` completions of one prompt, ``mask`` is 1 on the model's completion tokens, and the
keyword options are the estimator's own (set by the user, e.g. ``scale``) or inputs an algorithm
supplies when the estimator names them (PPO supplies ``values``, ``kl`` and ``kl_coef``).
Register your own with ``@register_advantage("name")``. An estimator may declare
``fn.min_group_size`` (the fewest completions per prompt it makes sense with, checked against the
DataModule before sampling) and ``fn.needs_greedy_baseline`` (the DataModule then draws one greedy
completion per prompt and supplies its reward as ``baseline_rewards``). More estimators (RLOO,
REINFORCE++, ReMax) are in ``rftlab.core.baselines``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from rftlab.core.masked import masked_mean, masked_var
from rftlab.core.registry import Registry

#: Whole advantage estimators, ``fn(rewards, group_size, mask, **options) -> (N,) or (N, T)``.
ADVANTAGE_ESTIMATORS: Registry[Callable[..., Tensor]] = Registry("advantage estimator")

#: The positional inputs every advantage estimator takes, in order.
ADVANTAGE_CONTRACT = ("rewards", "group_size", "mask")


def register_advantage(name: str, fn: Callable[..., Tensor] | None = None, *, overwrite: bool = False):
    """Register a whole advantage estimator under ``name`` (usable as a decorator).

    The function is called as ``fn(rewards, group_size, mask, **options)``: rewards (N,) float,
    group_size G (groups are consecutive blocks of G rows), mask (N, T) 1 on the model's tokens;
    it returns (N,) per-sequence advantages (broadcast over the tokens) or (N, T) per-token ones.
    Keyword parameters are its options, typed by their annotations and checked when an algorithm
    is built; an algorithm fills those it supplies (``values``, ``kl``, ``kl_coef`` in PPO).

    Args:
        name: the name algorithms select it by (``GRPO(advantage=name)``).
        fn: the estimator; omitted when used as ``@register_advantage(name)``.
        overwrite: replace an existing entry of that name.
    """
    return ADVANTAGE_ESTIMATORS.register(name, fn, overwrite=overwrite)


#: Scale functions of ``group_advantages``: ``fn(grouped, eps) -> advantages`` where ``grouped``
#: is (num_groups, group_size) rewards (one row per prompt) and the result has the same shape.
#: Register a new one (e.g. leave-one-out) with ``@ADVANTAGE_SCALES.register("name")``.
ADVANTAGE_SCALES: Registry[Callable[[Tensor, float], Tensor]] = Registry("advantage scale")


def _unbiased_std(x: Tensor, dim: int | None = None) -> Tensor:
    """Unbiased (n - 1) std as TRL and verl use; defined as 0 when n <= 1 (where it would be NaN)."""
    n = x.numel() if dim is None else x.shape[dim]
    if n <= 1:
        if dim is None:
            return x.new_zeros(())
        shape = list(x.shape)
        shape[dim] = 1
        return x.new_zeros(shape)
    return x.std() if dim is None else x.std(dim, keepdim=True)


def _center(grouped: Tensor) -> Tensor:
    """``r - mean_g`` per row, exactly 0 for rows whose rewards are all equal.

    In float32, ``mean([0.3] * 7)`` is not exactly 0.3: ``r - mean`` is ~3e-8 and so is the std, and
    ``3e-8 / (3e-8 + 1e-6)`` would give a spurious advantage of ~0.03. A constant group carries no
    learning signal (DAPO arXiv 2503.14476, §3.2 "Dynamic Sampling"), so its advantage is set to 0.
    """
    centered = grouped - grouped.mean(-1, keepdim=True)
    constant = grouped.amax(-1, keepdim=True) == grouped.amin(-1, keepdim=True)
    return torch.where(constant, torch.zeros_like(centered), centered)


@ADVANTAGE_SCALES.register("group")
def _scale_group(grouped: Tensor, eps: float) -> Tensor:
    # GRPO outcome supervision, DeepSeekMath arXiv 2402.03300 §4.1.2: (r_i - mean(r)) / std(r).
    return _center(grouped) / (_unbiased_std(grouped, dim=-1) + eps)


@ADVANTAGE_SCALES.register("batch")
def _scale_batch(grouped: Tensor, eps: float) -> Tensor:
    # Group baseline, batch-level std: one std for the whole batch, so easy (low-variance) prompts
    # are not up-weighted (Dr. GRPO arXiv 2503.20783 §3.1 discusses the question-level difficulty bias).
    return _center(grouped) / (_unbiased_std(grouped) + eps)


@ADVANTAGE_SCALES.register("none")
def _scale_none(grouped: Tensor, eps: float) -> Tensor:
    # Dr. GRPO arXiv 2503.20783 §3.2: drop the std normalisation, keep only the group baseline.
    return _center(grouped)


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-6) -> Tensor:
    """Group-relative advantages: each reward minus its group's mean, optionally divided by a std.

    Groups are consecutive blocks of ``group_size`` (the G completions of one prompt). With
    ``mean_g``/``std_g`` over the group and ``std_all`` over the whole batch (std unbiased, as TRL
    and verl):

    - ``"group"``: ``(r - mean_g) / (std_g + eps)`` (GRPO, DeepSeekMath arXiv 2402.03300 §4.1.2)
    - ``"batch"``: ``(r - mean_g) / (std_all + eps)``
    - ``"none"``:  ``r - mean_g`` (Dr. GRPO, arXiv 2503.20783 §3.2)

    A group whose rewards are all equal gets advantage exactly 0 (no float round-off leaks through
    the division). ``group_size == 1`` makes the unbiased std undefined (NaN); it is taken as 0 so
    every advantage is 0 (a lone sample has no group baseline to compare with).

    Args:
        rewards: (N,) scalar reward per completion; N divisible by ``group_size``.
        group_size: G >= 1, completions per prompt.
        scale: a name in ``ADVANTAGE_SCALES``.
        eps: >= 0, added to the std to avoid division by zero.

    Returns:
        (N,) advantages, floating (float32 for integer/bool rewards).
    """
    fn = ADVANTAGE_SCALES.get(scale)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"number of rewards ({rewards.numel()}) must be divisible by group_size ({group_size})"
        )
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    return fn(rewards.view(-1, group_size), eps).reshape(-1)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation over completion tokens (raw, not whitened).

    GAE, Schulman et al. 2016 arXiv 1506.02438, Eq. 16, computed backwards:
    ``delta_t = r_t + gamma V_{t+1} - V_t`` with ``V = 0`` after the last real token (the episode
    ends at EOS or truncation), ``A_t = delta_t + gamma lam A_{t+1}``, ``returns = A + V``.

    Positions where ``mask`` is 0 are not steps of the policy: trailing padding, and in a
    multi-turn episode the environment's tokens between two turns. The recursion passes over them,
    carrying ``V_{t+1}`` and ``A_{t+1}`` from the next real token to the previous one (verl's GAE
    does the same for observation tokens), so a turn's last token bootstraps from the value at the
    next turn's first token. Masked positions are zero in both outputs and never leak into real
    ones, whatever ``rewards``/``values`` hold there (even NaN).

    Args:
        rewards: (N, T) per-token rewards (typically the score on the last real token, minus a
            per-token KL penalty).
        values: (N, T) value estimates V(s_t), usually detached.
        mask: (N, T) 1 on the model's completion tokens (EOS included), 0 on padding and on
            environment tokens.
        gamma: discount in [0, 1].
        lam: GAE lambda in [0, 1].

    Returns:
        ``(advantages, returns)``, both (N, T).
    """
    if not rewards.shape == values.shape == mask.shape or rewards.dim() != 2:
        raise ValueError(
            "rewards, values and mask must all be (N, T), got "
            f"{tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(mask.shape)}"
        )
    for name, value in (("gamma", gamma), ("lam", lam)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    real = mask != 0
    dtype = torch.promote_types(torch.promote_types(rewards.dtype, values.dtype), torch.float32)
    zero = torch.zeros((), dtype=dtype, device=values.device)
    r = torch.where(real, rewards.to(dtype), zero)
    v = torch.where(real, values.to(dtype), zero)
    n, t_len = v.shape
    next_value = v.new_zeros(n)  # V after the last real token: 0 (the episode ends there)
    next_adv = v.new_zeros(n)
    columns: list[Tensor] = [next_adv] * t_len
    for t in reversed(range(t_len)):
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv_t = delta + gamma * lam * next_adv
        columns[t] = torch.where(real[:, t], adv_t, zero)
        # A masked position is skipped: the real token before it sees the next real token's V and A
        # (zeros after the last one, so trailing padding changes nothing).
        next_value = torch.where(real[:, t], v[:, t], next_value)
        next_adv = torch.where(real[:, t], adv_t, next_adv)
    advantages = torch.stack(columns, dim=1) if t_len else v.clone()
    returns = torch.where(real, advantages + v, zero)
    return advantages, returns


def whiten(x: Tensor, mask: Tensor) -> Tensor:
    """``(x - mean) / sqrt(var + 1e-8)`` on real positions, 0 elsewhere.

    Mean and variance are taken over the real positions of the whole tensor. The variance is the
    biased one (divided by the number of real positions n, see ``masked_var``); TRL's and verl's
    ``masked_whiten`` use the unbiased one (n - 1). The results differ by a factor sqrt(n / (n-1)),
    negligible at RL batch sizes, and the biased form is defined (0, not NaN) for n = 1.
    A constant ``x`` whitens to exactly 0: in float32 the mean of, e.g., 0.3s is off by ~3e-8, and
    dividing that by ``sqrt(var + 1e-8) ~ 1e-4`` would leak ~3e-4 (as ``_center`` guards groups).

    Args:
        x: (N, T) (any shape), floating.
        mask: same shape, 1 on real positions.

    Returns:
        Same shape as ``x``; all zeros if there is no real position.
    """
    real = mask != 0
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if x.numel():
        constant = x.masked_fill(~real, float("-inf")).amax() == x.masked_fill(~real, float("inf")).amin()
        real = real & ~constant
    return torch.where(real, out, torch.zeros_like(out))


@register_advantage("grpo")
def grpo_advantages(rewards: Tensor, group_size: int, mask: Tensor, scale: str = "group", eps: float = 1e-6) -> Tensor:
    """GRPO outcome supervision: ``group_advantages(rewards, group_size, scale, eps)`` per sequence.

    DeepSeekMath arXiv 2402.03300 §4.1.2: every token of completion i gets
    ``(r_i - mean_g) / (std_g + eps)``; ``scale`` as in ``group_advantages`` ("group", "batch", "none").

    Args:
        rewards: (N,) outcome rewards.
        group_size: G, completions per prompt.
        mask: (N, T) completion mask (unused: one advantage per sequence).
        scale: a name in ``ADVANTAGE_SCALES``.
        eps: >= 0, added to the std.

    Returns:
        (N,) advantages.
    """
    return group_advantages(rewards.float(), group_size, scale=scale, eps=eps)


@register_advantage("dr_grpo")
def dr_grpo_advantages(rewards: Tensor, group_size: int, mask: Tensor) -> Tensor:
    """Dr. GRPO (Liu et al. 2025, arXiv 2503.20783 §3.2): ``r_i - mean_g``, no std division.

    Args:
        rewards: (N,) outcome rewards.
        group_size: G, completions per prompt.
        mask: (N, T) completion mask (unused).

    Returns:
        (N,) advantages.
    """
    return group_advantages(rewards.float(), group_size, scale="none")


def _check_grpo_options(scale: str = "group", eps: float = 1e-6) -> None:
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale={scale!r} is invalid: must be one of {', '.join(ADVANTAGE_SCALES.names())}")
    if eps < 0:
        raise ValueError(f"eps={eps!r} is invalid: must be >= 0")


grpo_advantages.check_options = _check_grpo_options
# Group-relative baselines need two completions of a prompt to compare.
grpo_advantages.min_group_size = dr_grpo_advantages.min_group_size = 2


def token_level_rewards(scores: Tensor, mask: Tensor, kl: Tensor | None = None, kl_coef: float = 0.0) -> Tensor:
    """Per-token rewards of RLHF PPO: the outcome score on the last real token, minus a KL penalty.

    ``r_t = -kl_coef * kl_t + [t == t_i] * score_i`` on real tokens, 0 elsewhere, where t_i is
    row i's last real token (``L_i - 1`` for L_i real tokens when they are a prefix; in a multi-turn
    episode, the last token of the last turn). Summed over t this is Ziegler et al. 2019 (arXiv 1909.08593) eq. 2,
    ``R(x, y) = r(x, y) - beta log(pi(y|x) / rho(y|x))``, with the log-ratio spread over the tokens
    as in Stiennon et al. 2020 / Ouyang et al. 2022 (TRL's and OpenRLHF's ``compute_rewards`` do the same).

    Args:
        scores: (N,) outcome reward of each completion.
        mask: (N, T) 1 on the model's completion tokens.
        kl: (N, T) per-token KL estimate (k1 = logp - ref_logp in classic RLHF), or None.
        kl_coef: >= 0, weight of the KL penalty.

    Returns:
        (N, T) float rewards; a row with no real token is all zeros.
    """
    if scores.dim() != 1 or mask.dim() != 2 or scores.shape[0] != mask.shape[0]:
        raise ValueError(f"scores must be (N,) and mask (N, T), got {tuple(scores.shape)} and {tuple(mask.shape)}")
    if kl is not None and kl.shape != mask.shape:
        raise ValueError(f"kl must be (N, T) = {tuple(mask.shape)}, got {tuple(kl.shape)}")
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    real = mask != 0
    dtype = torch.promote_types(scores.dtype, torch.float32)
    rewards = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    if kl is not None and kl_coef:
        rewards = torch.where(real, -kl_coef * kl.to(dtype), rewards)
    lengths = real.sum(-1)
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(real, positions, -1).amax(-1, keepdim=True).clamp_min(0) if mask.shape[1] else lengths.unsqueeze(1)
    outcome = torch.where(lengths > 0, scores.to(dtype), torch.zeros((), dtype=dtype, device=mask.device))
    return rewards.scatter_add(1, last, outcome.unsqueeze(1))


@register_advantage("gae")
def gae_advantages(
    rewards: Tensor,
    group_size: int,
    mask: Tensor,
    values: Tensor,
    kl: Tensor | None = None,
    kl_coef: float = 0.0,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> Tensor:
    """GAE over token-level rewards (PPO): ``gae(token_level_rewards(rewards, mask, kl, kl_coef), values, ...)``.

    The outcome reward sits on each completion's last real token, minus ``kl_coef * kl`` on every
    token (KL in the reward, Ziegler et al. 2019 eq. 2); advantages are raw GAE (Schulman et al.
    2016, arXiv 1506.02438 eq. 16), not whitened. The value targets are ``advantages + values``.

    Args:
        rewards: (N,) outcome rewards.
        group_size: G (unused: GAE needs no groups).
        mask: (N, T) 1 on the model's tokens.
        values: (N, T) critic values V(s_t) at rollout time (supplied by the algorithm).
        kl: (N, T) per-token KL to the reference put into the reward, or None (supplied).
        kl_coef: >= 0, its coefficient (supplied).
        gamma: discount in [0, 1].
        lam: GAE lambda in [0, 1].

    Returns:
        (N, T) advantages, zero on padding.
    """
    token_rewards = token_level_rewards(rewards.float(), mask, kl, kl_coef)
    advantages, _ = gae(token_rewards, values, mask, gamma, lam)
    return advantages


def _check_gae_options(gamma: float = 1.0, lam: float = 0.95) -> None:
    for name, value in (("gamma", gamma), ("lam", lam)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}={value!r} is invalid: must be in [0, 1]")


gae_advantages.check_options = _check_gae_options
gae_advantages.min_group_size = 1  # the critic is the baseline: one completion per prompt is enough
