"""Critic-free advantage estimators with other baselines: RLOO, REINFORCE++ (plain and with a group
baseline) and ReMax.

Each is registered in ``ADVANTAGE_ESTIMATORS`` (``rftlab.core.advantages``) and follows its contract,
``fn(rewards (N,), group_size, mask (N, T), **options) -> (N,) or (N, T)``:

- ``"rloo"``: leave-one-out baseline, ``r_i - mean_{j != i} r_j`` (Kool et al. 2019; Ahmadian et al. 2024).
- ``"reinforce_pp"``: REINFORCE++ (Hu et al. 2025): per-token rewards with the KL penalty, discounted
  reward-to-go, whitened over the whole batch.
- ``"reinforce_pp_baseline"``: the same after subtracting each prompt's mean reward.
- ``"remax"``: ReMax (Li et al. 2023): the reward of the prompt's greedy completion as the baseline.

``discounted_returns`` (the reward-to-go used by both REINFORCE++ forms) is public so it can be
reused and checked on its own. Each estimator declares ``min_group_size`` (the fewest completions per
prompt it makes sense with); ReMax also declares ``needs_greedy_baseline``, so the algorithm has the
DataModule draw one greedy completion per prompt and passes its reward as ``baseline_rewards``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rftlab.core.advantages import _center, register_advantage, token_level_rewards, whiten

__all__ = [
    "discounted_returns",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "remax_advantages",
    "rloo_advantages",
]


def _check_batch(name: str, rewards: Tensor, group_size: int, mask: Tensor, min_group_size: int,
                 why: str = "") -> Tensor:
    """Validate the contract's inputs for estimator ``name``; return the rewards as floats."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if mask.dim() != 2 or mask.shape[0] != rewards.shape[0]:
        raise ValueError(f"mask must be (N, T) with N = {rewards.shape[0]} rows (one per reward), "
                         f"got shape {tuple(mask.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < min_group_size:
        raise ValueError(f"group_size={group_size!r} is invalid for advantage {name!r}: must be an int "
                         f">= {min_group_size}{why}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"number of rewards ({rewards.numel()}) must be divisible by group_size ({group_size})")
    return rewards if rewards.is_floating_point() else rewards.float()


def _check_gamma(gamma: float) -> None:
    # ``not 0 <= gamma <= 1`` is also true for NaN, which is refused with the same message.
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma={gamma!r} is invalid: must be in [0, 1]")


def discounted_returns(token_rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """Discounted reward-to-go of each real token: ``G_t = sum_{s >= t} gamma^(s - t) r_s``.

    The REINFORCE return (Williams 1992) that REINFORCE++ (Hu et al. 2025, arXiv 2501.03262) uses as
    its un-normalised advantage, the sum running over the row's real tokens only: masked positions
    (trailing padding; the environment's tokens between the turns of a multi-turn episode) are
    skipped, so the return carries across an observation to the previous turn, and whatever
    ``token_rewards`` holds there (even NaN) never reaches a real token.

    Args:
        token_rewards: (N, T) per-token rewards (e.g. ``token_level_rewards``).
        mask: (N, T) 1 on the model's completion tokens, 0 on padding and environment tokens.
        gamma: discount in [0, 1]; 1 (the default, as in REINFORCE++) sums the rewards undiscounted.

    Returns:
        (N, T) returns (float32 at least), 0 on padding; a row with no real token is all zeros.
    """
    if token_rewards.dim() != 2 or token_rewards.shape != mask.shape:
        raise ValueError(f"token_rewards and mask must both be (N, T), got {tuple(token_rewards.shape)} "
                         f"and {tuple(mask.shape)}")
    _check_gamma(gamma)
    real = mask != 0
    dtype = torch.promote_types(token_rewards.dtype, torch.float32)
    zero = torch.zeros((), dtype=dtype, device=token_rewards.device)
    r = torch.where(real, token_rewards.to(dtype), zero)
    n, t_len = r.shape
    running = r.new_zeros(n)
    columns: list[Tensor] = [running] * t_len
    for t in reversed(range(t_len)):
        # A masked position is no step: the return passes over it unchanged (0 after the last real token).
        running = torch.where(real[:, t], r[:, t] + gamma * running, running)
        columns[t] = torch.where(real[:, t], running, zero)
    return torch.stack(columns, dim=1) if t_len else r.clone()


def _whitened_returns(scores: Tensor, mask: Tensor, kl: Tensor | None, kl_coef: float, gamma: float) -> Tensor:
    """REINFORCE++ from outcome ``scores`` (N,): KL-penalised token rewards, reward-to-go, batch whitening."""
    _check_gamma(gamma)
    if mask.shape[1] == 0:  # no completion position at all: nothing to reward
        return torch.zeros(mask.shape, dtype=torch.promote_types(scores.dtype, torch.float32), device=mask.device)
    returns = discounted_returns(token_level_rewards(scores, mask, kl, kl_coef), mask, gamma)
    return whiten(returns, mask)  # exactly 0 when every real return is equal


@register_advantage("rloo")
def rloo_advantages(rewards: Tensor, group_size: int, mask: Tensor) -> Tensor:
    """RLOO: each reward minus the mean reward of the other completions of its prompt.

    ``A_i = r_i - 1/(G-1) sum_{j != i} r_j = G/(G-1) (r_i - mean_g)``: the leave-one-out baseline
    of Kool et al. 2019 ("Buy 4 REINFORCE samples, get a baseline for free!"), used for LLMs as RLOO
    by Ahmadian et al. 2024 ("Back to Basics", arXiv 2402.14740). The baseline does not depend on
    the sample it is subtracted from, so the gradient estimate stays unbiased; Dr. GRPO's group mean
    includes ``r_i``, which shrinks the advantage by (G-1)/G. A group whose rewards are all equal gets
    exactly 0 (no float round-off leak). The paper's reward is the KL-penalised sequence reward; here
    it is the outcome reward only (keep the KL in the loss), as in verl's RLOO without KL in reward.

    Args:
        rewards: (N,) outcome rewards; N divisible by ``group_size``.
        group_size: G >= 2, completions per prompt (consecutive rows).
        mask: (N, T) completion mask (unused: one advantage per sequence).

    Returns:
        (N,) advantages (float32 at least).
    """
    rewards = _check_batch("rloo", rewards, group_size, mask, 2,
                           " (the leave-one-out baseline averages the other completions of the same prompt)")
    grouped = rewards.view(-1, group_size)
    return (_center(grouped) * (group_size / (group_size - 1))).reshape(-1)


@register_advantage("reinforce_pp")
def reinforce_pp_advantages(
    rewards: Tensor,
    group_size: int,
    mask: Tensor,
    kl: Tensor | None = None,
    kl_coef: float = 0.0,
    gamma: float = 1.0,
) -> Tensor:
    """REINFORCE++: discounted reward-to-go with the KL in the reward, normalised over the whole batch.

    REINFORCE++ (Hu et al. 2025, arXiv 2501.03262: token-level KL penalty, reward-to-go and global
    advantage normalisation): per-token rewards
    ``r_t = [t = last] r_i - kl_coef * kl_t`` (``token_level_rewards``), returns
    ``G_t = sum_{s >= t} gamma^(s-t) r_s`` (``discounted_returns``), then global advantage
    normalisation ``A = (G - mean) / std`` with mean and std over every real token of the batch, in
    place of a critic or a per-prompt baseline. The std is the biased one (``whiten``), as in
    OpenRLHF's "reinforce" estimator; verl's ``masked_whiten`` uses the unbiased one, a factor
    sqrt(n / (n-1)) apart, negligible over a batch's tokens. A batch whose real returns are all
    equal gets exactly 0.

    Args:
        rewards: (N,) outcome rewards.
        group_size: G >= 1 (no groups needed: the batch statistics are the baseline).
        mask: (N, T) 1 on the model's tokens (right padded).
        kl: (N, T) per-token KL estimate ``log pi_old - log pi_ref`` put into the reward, or None
            (supplied by the algorithm; padded positions are ignored).
        kl_coef: >= 0, its coefficient (supplied).
        gamma: discount in [0, 1] of the reward-to-go.

    Returns:
        (N, T) advantages, 0 on padding.
    """
    rewards = _check_batch("reinforce_pp", rewards, group_size, mask, 1)
    return _whitened_returns(rewards, mask, kl, kl_coef, gamma)


@register_advantage("reinforce_pp_baseline")
def reinforce_pp_baseline_advantages(
    rewards: Tensor,
    group_size: int,
    mask: Tensor,
    kl: Tensor | None = None,
    kl_coef: float = 0.0,
    gamma: float = 1.0,
) -> Tensor:
    """REINFORCE++ with a group baseline: REINFORCE++ on the group-centred rewards.

    REINFORCE++ w/ baseline (Hu et al. 2025, arXiv 2501.03262, for k > 1 samples per prompt): each
    outcome reward first loses its prompt's mean, ``r_i - mean_g`` (exactly 0 for a group whose
    rewards are all equal), which removes the prompt's difficulty; the rest is ``reinforce_pp``: the
    centred reward on the last real token minus ``kl_coef * kl_t`` on every token, the discounted
    reward-to-go, and normalisation over the whole batch's real tokens (not per group, which the
    paper shows to be biased).

    This follows the paper and OpenRLHF's "reinforce_baseline" estimator (centred reward into the
    per-token return with the KL). verl's ``reinforce_plus_plus_baseline`` differs: it sums each
    row's token rewards (outcome plus any KL penalty) into one score, centres that per group (so the
    KL enters the group mean), broadcasts it to every token with no reward-to-go or discount, and
    whitens with the unbiased std; without KL in the reward and with gamma = 1 the two agree up to
    that sqrt(n / (n-1)) factor. OpenRLHF forces gamma = 1 for this estimator; here it stays an option.

    Args:
        rewards: (N,) outcome rewards; N divisible by ``group_size``.
        group_size: G >= 2, completions per prompt (consecutive rows).
        mask: (N, T) 1 on the model's tokens (right padded).
        kl: (N, T) per-token KL estimate ``log pi_old - log pi_ref`` put into the reward, or None
            (supplied by the algorithm; padded positions are ignored).
        kl_coef: >= 0, its coefficient (supplied).
        gamma: discount in [0, 1] of the reward-to-go.

    Returns:
        (N, T) advantages, 0 on padding.
    """
    rewards = _check_batch("reinforce_pp_baseline", rewards, group_size, mask, 2,
                           " (the baseline is the mean reward of the prompt's completions; with one "
                           "completion it cancels the reward)")
    centred = _center(rewards.view(-1, group_size)).reshape(-1)
    return _whitened_returns(centred, mask, kl, kl_coef, gamma)


def _check_reinforce_pp_options(gamma: float = 1.0) -> None:
    _check_gamma(gamma)


reinforce_pp_advantages.check_options = _check_reinforce_pp_options
reinforce_pp_baseline_advantages.check_options = _check_reinforce_pp_options


@register_advantage("remax")
def remax_advantages(rewards: Tensor, group_size: int, mask: Tensor,
                     baseline_rewards: Tensor | None = None) -> Tensor:
    """ReMax: each reward minus the reward of the greedy completion of the same prompt.

    ReMax (Li et al. 2023, arXiv 2310.10505, Algorithm 1): REINFORCE with the baseline
    ``b(x) = r(x, greedy completion of x)``, so ``A_i = r_i - b_i`` for every token of completion i.
    The greedy completion is drawn separately by the DataModule (``needs_greedy_baseline``) and
    its reward is supplied as ``baseline_rewards``. This follows the paper (outcome reward only);
    verl's ``compute_remax_outcome_advantage`` subtracts the baseline from each token's reward-to-go
    instead, which differs only when a KL penalty is put into the token rewards.

    Args:
        rewards: (N,) outcome rewards of the sampled completions.
        group_size: G >= 1, completions per prompt (one is enough: the greedy reward is the baseline).
        mask: (N, T) completion mask (unused: one advantage per sequence).
        baseline_rewards: (N,) reward of the greedy completion of each row's prompt (supplied by the
            algorithm; required).

    Returns:
        (N,) advantages (float32 at least).

    Raises:
        ValueError: if ``baseline_rewards`` is None or not (N,).
    """
    rewards = _check_batch("remax", rewards, group_size, mask, 1)
    if baseline_rewards is None:
        raise ValueError("advantage 'remax' needs baseline_rewards (the reward of a greedy completion of each "
                         "row's prompt) and got None: the DataModule must draw one greedy sample per prompt, "
                         "which it does for an algorithm whose estimator sets needs_greedy_baseline")
    if baseline_rewards.shape != rewards.shape:
        raise ValueError(f"baseline_rewards must be (N,) = {tuple(rewards.shape)} like rewards, "
                         f"got {tuple(baseline_rewards.shape)}")
    dtype = torch.promote_types(rewards.dtype, baseline_rewards.dtype)
    return rewards.to(dtype) - baseline_rewards.to(dtype)


# The leave-one-out and group-mean baselines need a second completion of the prompt; REINFORCE++
# normalises over the batch and ReMax compares with the greedy completion, so one is enough.
rloo_advantages.min_group_size = 2
reinforce_pp_baseline_advantages.min_group_size = 2
reinforce_pp_advantages.min_group_size = 1
remax_advantages.min_group_size = 1
remax_advantages.needs_greedy_baseline = True
