"""Segment-level chain-of-thought RFT: credit per reasoning step instead of per answer.

A completion is cut into thought segments CL_1..CL_M (its non-empty lines but the last) and a
final-answer segment M+1 (its last non-empty line, plus the EOS). A critic scores the chain
(overall G) and each thought (thought score S_k, progress score P_k, all in [0, 1]); this module
turns those scores into segment rewards R_1..R_{M+1}, TD targets, and the segment-level PPO loss.

Source: the "RFT fine tuning" slides, sections "Reward Processing" and "Chain-of-Thought RFT
Objective"; every formula below is theirs.

Shapes: N chains (completions), T completion positions (right-padded), K segment slots
(right-padded: chain i has ``M_i + 1`` real segments, the answer segment last), V vocabulary.
``mask`` (N, T) is 1 on real completion tokens; ``segment_index`` (N, T) maps each real token to its
segment in ``[0, K)``; ``segment_mask`` (N, K) is 1 on real segments (a prefix of each row).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from rftlab.core.losses import aggregate, policy_loss, value_loss
from rftlab.core.options import OptionGroup
from rftlab.core.registry import Registry

SEGMENT_WHITENING = ("none", "chain", "batch")

#: ``fn(log_ratio_tokens, advantages, segment_index, mask, counts) -> (log_ratio, adv, unit_mask)``
#: with (N, T) token log-ratios, (N, K) segment advantages, (N, K) segment token counts. It returns
#: the "units" the PPO clip acts on: (N, K) segments for "sum"/"mean", (N, T) tokens for "token".
SEGMENT_RATIO_MODES: Registry[Callable[..., tuple[Tensor, Tensor, Tensor]]] = Registry("segment ratio mode")


# ---------------------------------------------------------------- cutting a completion into segments

def segment_spans(text: str) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of the M + 1 segments of ``text``; they tile the whole text.

    Thought segments are the non-empty lines but the last; the answer segment is the last non-empty
    line. A line owns its trailing newline (so a token ``".\\n"`` stays in its line); whitespace-only
    lines join the segment before them (leading ones the first segment); the answer segment runs to
    the end of the text. A text without a non-empty line is one (answer) segment: M = 0.

    Args:
        text: the completion text (special tokens removed).

    Returns:
        M + 1 (start, end) pairs, contiguous, from 0 to ``len(text)``.
    """
    starts: list[int] = []
    position = 0
    for line in text.splitlines(keepends=True):
        if line.strip():
            starts.append(position)
        position += len(line)
    if not starts:
        return [(0, len(text))]
    starts[0] = 0  # leading blank lines belong to the first segment
    ends = starts[1:] + [len(text)]
    return list(zip(starts, ends))


def split_segments(text: str) -> list[str]:
    """The M + 1 segment texts of ``text`` (stripped): M thought lines, then the answer line.

    >>> split_segments("3 + 4 = 7\\n\\n7 * 2 = 14\\nAnswer: 14")
    ['3 + 4 = 7', '7 * 2 = 14', 'Answer: 14']
    """
    return [text[s:e].strip() for s, e in segment_spans(text)]


def segment_ids(offsets: Sequence[Sequence[int]] | Tensor, text: str) -> tuple[Tensor, int]:
    """Token-to-segment map: each token belongs to the segment holding its first character.

    Mapping by character offsets (not by token ids) is needed because BPE merges a newline with its
    neighbours (``".\\n"``, ``"\\n  "``). A token with no character of its own at the end of the text
    (EOS, any special token) starts at ``len(text)`` and falls in the last (answer) segment.

    Args:
        offsets: (T, 2) ``(start, end)`` character offsets of the T completion tokens in ``text``
            (only ``start`` is used); starts >= ``len(text)`` mean "after the text".
        text: the completion text the offsets refer to.

    Returns:
        ``(ids, num_segments)``: (T,) long segment index in ``[0, M]`` per token (non-decreasing
        for non-decreasing starts), and M + 1.
    """
    spans = segment_spans(text)
    starts = torch.as_tensor([int(o[0]) for o in offsets], dtype=torch.long).reshape(-1)
    if (starts < 0).any():
        raise ValueError(f"offsets must be >= 0, got starts {starts.tolist()}")
    # The segment of character c is the number of segment starts <= c, minus one.
    boundaries = torch.tensor([s for s, _ in spans[1:]], dtype=torch.long)
    ids = torch.bucketize(starts, boundaries, right=True)
    return ids, len(spans)


def merge_environment_segments(ids: Tensor, num_segments: int, model_tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Fold every segment that holds none of the model's tokens into the segment before it.

    In a multi-turn episode the environment's text (a tool result, feedback) has lines of its own,
    which ``segment_ids`` would make segments. They carry no loss, and a segment is a step of the
    model's reasoning, so each joins the model's segment before it (a leading one, the next).

    Args:
        ids: (T,) non-decreasing segment index per token (``segment_ids``).
        num_segments: K, the number of segments ``ids`` indexes.
        model_tokens: (T,) bool, True on the model's tokens (False on the environment's).

    Returns:
        ``(ids, target)``: the (T,) merged, still non-decreasing, segment index per token, and the
        (K,) index of the merged segment each old segment went to. Without any model token
        nothing is merged.

    >>> merge_environment_segments(torch.tensor([0, 0, 1, 1, 2]), 3, torch.tensor([True, True, False, False, True]))
    (tensor([0, 0, 0, 0, 1]), tensor([0, 0, 1]))
    """
    has_model = torch.zeros(num_segments, dtype=torch.bool)
    has_model[ids[model_tokens.bool()]] = True
    if not has_model.any():
        return ids, torch.arange(num_segments)
    kept = torch.cumsum(has_model.long(), 0) - 1  # the last kept segment at or before each one
    target = kept.clamp_min(0)  # leading environment-only segments join the first kept one
    return target[ids], target


# ---------------------------------------------------------------- segment rewards

@dataclass(frozen=True)
class SegmentRewardParams(OptionGroup):
    """Hyper-parameters of ``segment_rewards``, type- and range-checked at construction (the slides' defaults).

    Attributes:
        alpha: boost of non-negative normalised thought scores (> 0).
        delta: dampening of negative normalised thought scores (>= 0).
        window: W, moving-average window of past progress (int >= 1).
        kappa_pos: kappa+, divisor of positive progress effects (> 0).
        kappa_neg: kappa-, divisor of negative progress effects (> 0).
        base: B, offset of the negative progress effect ``(B - P_k)``.
        progress_divisor: lambda, divisor of the progress multiplier ``m_k = S_k / lambda`` (> 0).
        rho: scale of the answer segment's reward ``R_{M+1} = rho * r_answer``.
        alpha_1: multiplier of the lower cap ``-alpha_1 * r_max`` (>= 0).
        alpha_2: additive offset of the upper cap ``r_max + alpha_2`` (>= 0).
        r_max: the highest critic score (1.0 for scores in [0, 1]).
        eps_std: added to the population variance inside the sqrt (> 0, keeps sqrt differentiable).
        whiten: whitening of the combined scores C: "none", "chain" or "batch".
    """

    alpha: float = 1.5
    delta: float = 0.5
    window: int = 3
    kappa_pos: float = 1.0
    kappa_neg: float = 1.0
    base: float = 1.0
    progress_divisor: float = 1.0
    rho: float = 2.0
    alpha_1: float = 2.0
    alpha_2: float = 1.0
    r_max: float = 1.0
    eps_std: float = 1e-8
    whiten: str = "none"

    group: ClassVar[str] = "segments.rewards"

    def validate(self) -> None:
        self.require(self.alpha > 0, "alpha", "> 0")
        self.require(self.delta >= 0, "delta", ">= 0")
        self.require(self.window >= 1, "window", "an integer >= 1")
        self.require(self.kappa_pos > 0, "kappa_pos", "> 0")
        self.require(self.kappa_neg > 0, "kappa_neg", "> 0")
        self.require(self.progress_divisor > 0, "progress_divisor", "> 0")
        self.require(self.alpha_1 >= 0, "alpha_1", ">= 0")
        self.require(self.alpha_2 >= 0, "alpha_2", ">= 0")
        self.require(self.eps_std > 0, "eps_std", "> 0")
        self.require(self.whiten in SEGMENT_WHITENING, "whiten", f"one of {', '.join(SEGMENT_WHITENING)}")


def _zscore(x: Tensor, eps_std: float) -> Tensor:
    # (x - mu) / sqrt(mean((x - mu)^2) + eps_std): population variance, eps inside the sqrt (the slides).
    centered = x - x.mean()
    return centered / torch.sqrt((centered**2).mean() + eps_std)


def progress_baseline(P: Tensor, window: int) -> Tensor:
    """Moving average of past progress: ``Pbar_1 = P_1``; ``Pbar_k = mean(P_j, j = max(1, k-W)..k-1)``.

    Args:
        P: (M,) progress scores.
        window: W >= 1.

    Returns:
        (M,) Pbar.
    """
    m = P.shape[0]
    csum = torch.cat([P.new_zeros(1), torch.cumsum(P, 0)])  # csum[k] = P_1 + ... + P_k (1-based)
    k = torch.arange(m, device=P.device)  # 0-based k; the window is j in [max(0, k - W), k - 1]
    lo = (k - window).clamp_min(0)
    count = (k - lo).clamp_min(1)  # 0 only at k = 0, replaced below
    past = (csum[k] - csum[lo]) / count.to(P.dtype)
    return torch.where(k == 0, P, past)


def progress_effect(P: Tensor, window: int, kappa_pos: float, kappa_neg: float, base: float) -> Tensor:
    """Base progress effect E_k of each thought segment.

    ``dP_k = P_k - Pbar_k``; ``E_k = sqrt(dP_k) P_k / kappa+`` if ``dP_k > 0``,
    ``-log(1 + |dP_k|) (B - P_k) / kappa-`` if ``dP_k < 0``, 0 if ``dP_k = 0``.
    ``torch.where`` differentiates both branches, so sqrt only ever sees positive inputs (1 where
    ``dP_k <= 0``): a sqrt of 0 or of a negative would put inf/NaN into the gradient.

    Args:
        P: (M,) progress scores in [0, 1].
        window: W.
        kappa_pos: kappa+.
        kappa_neg: kappa-.
        base: B.

    Returns:
        (M,) E.
    """
    dP = P - progress_baseline(P, window)
    positive, negative = dP > 0, dP < 0
    safe_pos = torch.where(positive, dP, torch.ones_like(dP))
    gain = torch.sqrt(safe_pos) * P / kappa_pos
    loss = -torch.log1p(torch.where(negative, -dP, torch.zeros_like(dP))) * (base - P) / kappa_neg
    return torch.where(positive, gain, torch.where(negative, loss, torch.zeros_like(dP)))


def combined_segment_scores(G: Tensor | float, S: Tensor, P: Tensor, params: SegmentRewardParams) -> Tensor:
    """C_k = G + S_hat_k + Q_k for the M thought segments of one chain (before whitening/clamping).

    ``S_hat_k = (S_k - mu_S) / sigma_S`` (population std, ``eps_std`` inside the sqrt), then times
    ``alpha`` if ``S_hat_k >= 0`` else ``delta``; ``Q_k = E_k * S_k / lambda`` (``progress_effect``).

    Args:
        G: 0-dim overall critic score.
        S: (M,) thought scores.
        P: (M,) progress scores.
        params: the hyper-parameters.

    Returns:
        (M,) C.
    """
    s_hat = _zscore(S, params.eps_std)
    s_hat = torch.where(s_hat >= 0, params.alpha * s_hat, params.delta * s_hat)
    E = progress_effect(P, params.window, params.kappa_pos, params.kappa_neg, params.base)
    return G + s_hat + E * (S / params.progress_divisor)


def _check_chain(G: Tensor, S: Tensor, P: Tensor, r_answer: Tensor) -> None:
    if S.dim() != 1 or S.shape != P.shape:
        raise ValueError(f"S and P must be 1-D of the same length M, got {tuple(S.shape)} and {tuple(P.shape)}")
    if G.dim() != 0 or r_answer.dim() != 0:
        raise ValueError(f"G and r_answer must be scalars, got shapes {tuple(G.shape)} and {tuple(r_answer.shape)}")
    for name, x in (("G", G), ("S", S), ("P", P)):
        if not torch.isfinite(x).all() or (x < 0).any() or (x > 1).any():
            raise ValueError(f"critic scores {name} must be in [0, 1], got {x.tolist()}")
    if not torch.isfinite(r_answer):
        raise ValueError(f"r_answer must be finite, got {r_answer.item()}")


def _as_tensors(G, S, P, r_answer) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    S = torch.as_tensor(S)
    dtype = torch.promote_types(S.dtype, torch.float32)
    S = S.to(dtype)
    return (torch.as_tensor(G, dtype=dtype, device=S.device), S, torch.as_tensor(P, dtype=dtype, device=S.device),
            torch.as_tensor(r_answer, dtype=dtype, device=S.device))


def _finish(C: Tensor, r_answer: Tensor, params: SegmentRewardParams) -> Tensor:
    # R_k = clamp(C_k, -alpha_1 r_max, r_max + alpha_2); R_{M+1} = rho * r_answer.
    R = C.clamp(-params.alpha_1 * params.r_max, params.r_max + params.alpha_2)
    return torch.cat([R, (params.rho * r_answer).reshape(1)])


def segment_rewards(G: Tensor | float, S: Tensor, P: Tensor, r_answer: Tensor | float, **params: Any) -> Tensor:
    """Rewards R_1..R_{M+1} of one chain's segments (the slides, "Segment rewards").

    Thought segments k = 1..M::

        mu_S = mean(S); sigma_S = sqrt(mean((S - mu_S)^2) + eps_std)
        S_hat_k = (S_k - mu_S) / sigma_S;  S_hat_k *= alpha if S_hat_k >= 0 else delta
        Pbar_1 = P_1;  Pbar_k = mean(P_j, j = max(1, k-W)..k-1);  dP_k = P_k - Pbar_k
        E_k = sqrt(dP_k) P_k / kappa+  (dP_k > 0);  -log(1 + |dP_k|) (B - P_k) / kappa-  (dP_k < 0);  0
        Q_k = E_k * S_k / lambda (``progress_divisor``);  C_k = G + S_hat_k + Q_k
        [whiten C: "chain" -> (C - mean(C)) / sqrt(var(C) + eps_std)]
        R_k = clamp(C_k, -alpha_1 r_max, r_max + alpha_2)

    and the answer segment ``R_{M+1} = rho * r_answer``. Source: "RFT fine tuning" slides, "Reward
    Processing". Whitening "chain" subtracts the chain's mean,
    which removes G (a constant of the chain) from every thought reward: only the relative quality
    of the steps is left. "batch" whitening needs several chains: use ``batch_segment_rewards``.
    Every input may require grad; all outputs and gradients stay finite for M = 1, equal S, and
    dP < 0 everywhere (``progress_effect`` explains the sqrt guard; ``eps_std > 0`` guards sigma).

    Args:
        G: 0-dim overall critic score in [0, 1].
        S: (M,) thought scores in [0, 1] (M may be 0: the chain is just an answer).
        P: (M,) progress scores in [0, 1].
        r_answer: 0-dim task verifier reward of the final answer.
        **params: fields of ``SegmentRewardParams`` (alpha=1.5, delta=0.5, window=3, kappa_pos=1,
            kappa_neg=1, base=1, progress_divisor=1, rho=2, alpha_1=2, alpha_2=1, r_max=1, eps_std=1e-8,
            whiten="none"); unknown names raise ``TypeError``.

    Returns:
        (M + 1,) R, float32 (float64 for float64 S).
    """
    p = SegmentRewardParams(**params)
    if p.whiten == "batch":
        raise ValueError("whiten='batch' needs several chains: use batch_segment_rewards")
    G, S, P, r_answer = _as_tensors(G, S, P, r_answer)
    _check_chain(G, S, P, r_answer)
    if S.numel() == 0:
        return (p.rho * r_answer).reshape(1)
    C = combined_segment_scores(G, S, P, p)
    if p.whiten == "chain":
        C = _zscore(C, p.eps_std)
    return _finish(C, r_answer, p)


def batch_segment_rewards(
    G: Tensor, S: Sequence[Tensor], P: Sequence[Tensor], r_answer: Tensor, **params: Any
) -> tuple[Tensor, Tensor]:
    """``segment_rewards`` of N chains of different lengths, padded to (N, K), K = max(M_i) + 1.

    With ``whiten="batch"`` the combined scores C of all thought segments of all chains are whitened
    together (one mean and std), which keeps G's effect across chains; "none" and "chain" equal
    ``segment_rewards`` chain by chain.

    Args:
        G: (N,) overall scores.
        S: N tensors (M_i,) of thought scores.
        P: N tensors (M_i,) of progress scores.
        r_answer: (N,) verifier rewards.
        **params: as ``segment_rewards``.

    Returns:
        ``(R, segment_mask)``: (N, K) rewards, answer segment at index M_i, 0 after it; (N, K) long
        mask, 1 on the M_i + 1 real segments.
    """
    p = SegmentRewardParams(**params)
    n = len(S)
    if not len(P) == n == G.shape[0] == r_answer.shape[0]:
        raise ValueError(f"need N values of G, S, P and r_answer, got {G.shape[0]}, {n}, {len(P)}, {r_answer.shape[0]}")
    chains = [_as_tensors(G[i], S[i], P[i], r_answer[i]) for i in range(n)]
    for chain in chains:
        _check_chain(*chain)
    if p.whiten == "batch":
        combined = [combined_segment_scores(g, s, pp, p) for g, s, pp, _ in chains]
        lengths = [len(c) for c in combined]
        flat = torch.cat(combined) if combined else torch.zeros(0)
        flat = _zscore(flat, p.eps_std) if flat.numel() else flat
        rows = [_finish(c, chain[3], p) for c, chain in zip(flat.split(lengths), chains)]
    else:
        rows = [segment_rewards(*chain, **asdict(p)) for chain in chains]
    k = max((len(r) for r in rows), default=1)
    dtype = rows[0].dtype if rows else torch.float32
    R = torch.zeros(n, k, dtype=dtype)
    segment_mask = torch.zeros(n, k, dtype=torch.long)
    for i, row in enumerate(rows):
        R[i, : len(row)] = row
        segment_mask[i, : len(row)] = 1
    return R, segment_mask


# ---------------------------------------------------------------- targets and losses

def segment_sum(x: Tensor, segment_index: Tensor, mask: Tensor, num_segments: int) -> Tensor:
    """Per-segment sums of a per-token quantity: ``out[i, k] = sum_t x[i, t] [segment_index[i, t] = k]``.

    Padded tokens are excluded with ``torch.where`` (garbage there never leaks). Differentiable.

    Args:
        x: (N, T) per-token values.
        segment_index: (N, T) long, in ``[0, num_segments)`` on real tokens (anything on padding).
        mask: (N, T) 1 on real completion tokens.
        num_segments: K.

    Returns:
        (N, K).
    """
    if not x.shape == segment_index.shape == mask.shape or x.dim() != 2:
        raise ValueError(
            "x, segment_index and mask must all be (N, T), got "
            f"{tuple(x.shape)}, {tuple(segment_index.shape)}, {tuple(mask.shape)}"
        )
    real = mask != 0
    idx = torch.where(real, segment_index.long(), torch.zeros_like(segment_index, dtype=torch.long))
    if real.any() and (idx[real].min() < 0 or idx[real].max() >= num_segments):
        raise ValueError(f"segment_index must be in [0, {num_segments}) on real tokens, got {idx[real].unique().tolist()}")
    values = torch.where(real, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return values.new_zeros(x.shape[0], num_segments).scatter_add(1, idx, values)


def segment_index_from_starts(starts: Tensor, segment_mask: Tensor, length: int) -> Tensor:
    """Token-to-segment map from each segment's first token: token t is in the last real segment
    whose start is <= t (an empty segment shares its start with the next one and gets no token).

    Args:
        starts: (N, K) long, index of each segment's first completion token (non-decreasing over
            real segments; the first is 0); anything on padded segments.
        segment_mask: (N, K) 1 on real segments, a prefix of each row.
        length: T, completion positions.

    Returns:
        (N, T) long in ``[0, K)``.
    """
    if starts.shape != segment_mask.shape or starts.dim() != 2:
        raise ValueError(f"starts and segment_mask must both be (N, K), got {tuple(starts.shape)} and {tuple(segment_mask.shape)}")
    positions = torch.arange(length, device=starts.device)
    begun = (starts.unsqueeze(1) <= positions.view(1, -1, 1)) & (segment_mask != 0).unsqueeze(1)  # (N, T, K)
    return (begun.sum(-1) - 1).clamp_min(0)


def segment_value_targets(
    rewards: Tensor, next_values: Tensor, segment_mask: Tensor, gamma: float = 1.0, td_lambda: float = 0.0
) -> Tensor:
    """Segment lambda-returns; with ``td_lambda = 0`` the TD targets ``Y_k = R_k + gamma V_rollout(s_{k+1})``.

    ``Y_k = R_k + gamma [(1 - lambda) V_rollout(s_{k+1}) + lambda Y_{k+1}]``, and V (and Y) of the
    terminal state = 0. ``td_lambda = 0`` is the slides' target: a thought segment sees the answer's
    reward only through V, so with an untrained critic it sees only its own critic reward.
    ``td_lambda = 1`` is the Monte-Carlo return (every later reward, no bootstrapping), which is what
    PPO's GAE with lambda = 1 gives per token (Schulman et al. 2016, arXiv 1506.02438).
    ``next_values`` are the rollout-time values of the states before each segment, V(s_1)..V(s_K);
    position k + 1 is read for segment k, and 0 after the last real segment of a chain.

    Args:
        rewards: (N, K) segment rewards R.
        next_values: (N, K) V_rollout(s_k), the state before segment k (no grad).
        segment_mask: (N, K) 1 on real segments, a prefix of each row.
        gamma: discount in [0, 1].
        td_lambda: weight in [0, 1] of the later rewards against the bootstrapped value.

    Returns:
        (N, K) Y, 0 on padded segments.
    """
    if not rewards.shape == next_values.shape == segment_mask.shape or rewards.dim() != 2:
        raise ValueError(
            "rewards, next_values and segment_mask must all be (N, K), got "
            f"{tuple(rewards.shape)}, {tuple(next_values.shape)}, {tuple(segment_mask.shape)}"
        )
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if not 0.0 <= td_lambda <= 1.0:
        raise ValueError(f"td_lambda must be in [0, 1], got {td_lambda}")
    real = segment_mask != 0
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    v = torch.where(real, next_values.to(rewards.dtype), zero)
    r = torch.where(real, rewards, zero)
    targets = torch.zeros_like(r)
    v_next = y_next = r.new_zeros(r.shape[0])  # past the last segment: the terminal state, 0
    for k in range(r.shape[1] - 1, -1, -1):  # K is a handful of segments: a plain backward loop
        targets[:, k] = torch.where(real[:, k], r[:, k] + gamma * ((1 - td_lambda) * v_next + td_lambda * y_next), zero)
        v_next, y_next = v[:, k], targets[:, k]
    return targets


def _check_advantages(advantages: Tensor, segment_index: Tensor) -> None:
    if advantages.dim() != 2 or advantages.shape[0] != segment_index.shape[0]:
        raise ValueError(f"advantages must be (N, K) with N = {segment_index.shape[0]}, got {tuple(advantages.shape)}")


@SEGMENT_RATIO_MODES.register("sum")
def _ratio_sum(log_ratio: Tensor, advantages: Tensor, segment_index: Tensor, mask: Tensor, counts: Tensor):
    # rho_k = exp(sum_j [log pi_theta(t_kj) - log pi_rollout(t_kj)]): the segment is one action.
    return segment_sum(log_ratio, segment_index, mask, advantages.shape[1]), advantages, counts > 0


@SEGMENT_RATIO_MODES.register("mean")
def _ratio_mean(log_ratio: Tensor, advantages: Tensor, segment_index: Tensor, mask: Tensor, counts: Tensor):
    # Length-normalised: rho_k = exp(mean_j [...]), the geometric mean of the token ratios, as GSPO
    # (Zheng et al. 2025, arXiv 2507.18071, Eq. 7) does per sequence; long lines are not clipped more.
    total = segment_sum(log_ratio, segment_index, mask, advantages.shape[1])
    return total / counts.clamp_min(1).to(total.dtype), advantages, counts > 0


@SEGMENT_RATIO_MODES.register("token")
def _ratio_token(log_ratio: Tensor, advantages: Tensor, segment_index: Tensor, mask: Tensor, counts: Tensor):
    # Per-token ratios carrying A_k, averaged within the segment: A_k / N_k per token gives
    # L_k = (1/N_k) sum_j max(-A_k r_j, -A_k clip(r_j)), since the clipped loss is linear in A.
    idx = torch.where(mask != 0, segment_index.long(), torch.zeros_like(segment_index, dtype=torch.long))
    per_token_adv = (advantages / counts.clamp_min(1).to(advantages.dtype)).gather(1, idx)
    return log_ratio, per_token_adv, mask != 0


def segment_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    segment_index: Tensor,
    mask: Tensor,
    ratio_mode: str = "sum",
    eps_low: float = 0.2,
    eps_high: float | None = None,
    dual_clip: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Segment-level clipped surrogate, ``mean_i sum_k L_k^CLIP`` (the slides, "Objective").

    ``L_k = max(-A_k rho_k, -A_k clip(rho_k, 1 - eps_low, 1 + eps_high))``, and with a dual clip ``c > 1``,
    for ``A_k < 0``: ``L_k = min(L_k, -c A_k)`` (Ye et al. 2020, arXiv 1912.09729). ``ratio_mode``
    (a name in ``SEGMENT_RATIO_MODES``): "sum" ``rho_k = exp(sum_j log-ratio)`` (as specified),
    "mean" ``exp(mean_j log-ratio)`` (GSPO-style), "token" per-token ratios carrying A_k, averaged
    over the segment's tokens. The log of the ratio is clamped to [-20, 20] before ``exp``
    (by ``policy_loss``), so a summed log-ratio of 200 stays finite (and has zero gradient).
    A segment without tokens has no action, so it adds no policy loss. With ``logp == old_logp``
    every ratio is 1 and the loss is ``-mean_i sum_k A_ik`` in every mode.

    Args:
        logp: (N, T) current-policy log-probs of the completion tokens (with grad).
        old_logp: (N, T) log-probs under the rollout policy (no grad).
        advantages: (N, K) segment advantages A_k (detached); padded segments are ignored.
        segment_index: (N, T) long segment of each token.
        mask: (N, T) 1 on real completion tokens.
        ratio_mode: "sum", "mean", "token" (or a user-registered name).
        eps_low: lower clip range, >= 0.
        eps_high: upper clip range, >= eps_low; None uses ``eps_low`` (the symmetric clip).
        dual_clip: None, or c > 1.

    Returns:
        ``(loss, metrics)``: 0-dim loss; detached metrics ``segments/ratio_clip_ratio`` (fraction of
        segments, or tokens for "token", where the clip binds), ``segments/max_abs_log_ratio``
        (largest |log rho| before the clamp: of the segment for sum/mean, of a token for "token"),
        and ``segments/dual_clip_ratio`` with a dual clip.
    """
    fn = SEGMENT_RATIO_MODES.get(ratio_mode)
    if not logp.shape == old_logp.shape == mask.shape == segment_index.shape or logp.dim() != 2:
        raise ValueError(
            "logp, old_logp, segment_index and mask must all be (N, T), got "
            f"{tuple(logp.shape)}, {tuple(old_logp.shape)}, {tuple(segment_index.shape)}, {tuple(mask.shape)}"
        )
    _check_advantages(advantages, segment_index)
    real = mask != 0
    token_log_ratio = torch.where(real, logp - old_logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
    counts = segment_sum(torch.ones_like(logp), segment_index, mask, advantages.shape[1])
    log_ratio, unit_adv, unit_mask = fn(token_log_ratio, advantages.to(logp.dtype), segment_index, mask, counts)
    # policy_loss on "units" (segments or tokens) with old = 0: exp(clamp(log_ratio)) is the ratio,
    # and "seq-mean-token-sum" is mean over chains of the sum over units.
    loss, inner = policy_loss(
        log_ratio, torch.zeros_like(log_ratio), unit_adv, unit_mask.to(logp.dtype),
        eps_low=eps_low, eps_high=eps_low if eps_high is None else eps_high, agg="seq-mean-token-sum",
        dual_clip=dual_clip,
    )
    with torch.no_grad():
        abs_lr = torch.where(unit_mask, log_ratio.abs(), torch.zeros_like(log_ratio))
        metrics = {
            "segments/ratio_clip_ratio": inner["clip_ratio/low"] + inner["clip_ratio/high"],
            "segments/max_abs_log_ratio": abs_lr.max() if abs_lr.numel() else abs_lr.new_zeros(()),
        }
        if dual_clip is not None:
            metrics["segments/dual_clip_ratio"] = inner["clip_ratio/dual"]
    return loss, {k: v.detach() for k, v in metrics.items()}


def segment_value_loss(
    values: Tensor, old_values: Tensor, targets: Tensor, segment_mask: Tensor, clip: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """``mean_i sum_k L_k^VF``, ``L^VF = 1/2 max((V - Y)^2, (V_clip - Y)^2)`` (the slides, "Objective").

    ``V_clip = V_rollout + clip(V_theta - V_rollout, -c_v, c_v)`` when ``clip = c_v > 0``, else
    ``1/2 (V - Y)^2``. The per-segment term is ``value_loss``'s; its token-mean is rescaled by
    (number of real segments / N) into the sum over segments averaged over chains.

    Args:
        values: (N, K) V_theta(s_k) (with grad).
        old_values: (N, K) V_rollout(s_k).
        targets: (N, K) Y_k.
        segment_mask: (N, K) 1 on real segments.
        clip: c_v; <= 0 disables clipping.

    Returns:
        ``(loss, metrics)`` with ``value/clip_ratio`` (fraction of segments where the clip binds).
    """
    loss, metrics = value_loss(values, old_values, targets, segment_mask, clip=clip)
    n_segments = (segment_mask != 0).sum().to(loss.dtype)
    return loss * n_segments / max(values.shape[0], 1), metrics


def exact_kl(logits: Tensor, ref_logits: Tensor, chunk_size: int = 128) -> Tensor:
    """Exact ``KL(pi || pi_ref)`` over the vocabulary at each position, in chunks of rows.

    ``KL = sum_v softmax(l)_v (log_softmax(l)_v - log_softmax(l_ref)_v)``; exact (no sampling
    noise) but it needs the reference logits, (N, T, V): affordable for small models.

    Args:
        logits: (N, T, V) current-policy logits (temperature-scaled, with grad).
        ref_logits: (N, T, V) reference-policy logits (no grad).
        chunk_size: rows of the flattened (N*T, V) logits per chunk (>= 1).

    Returns:
        (N, T) KL in nats, >= 0, float32 (float64 for float64 input).
    """
    if logits.shape != ref_logits.shape or logits.dim() < 2:
        raise ValueError(f"logits and ref_logits must both be (N, T, V), got {tuple(logits.shape)} and {tuple(ref_logits.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    flat, ref_flat = logits.reshape(-1, logits.shape[-1]), ref_logits.reshape(-1, logits.shape[-1])
    if flat.shape[0] == 0:
        return logits.new_zeros(logits.shape[:-1], dtype=dtype)
    chunks = []
    for a, b in zip(flat.split(chunk_size), ref_flat.split(chunk_size)):
        logp = F.log_softmax(a.to(dtype), dim=-1)
        ref_logp = F.log_softmax(b.to(dtype), dim=-1)
        chunks.append((logp.exp() * (logp - ref_logp)).sum(-1))
    return torch.cat(chunks).reshape(logits.shape[:-1])


def segment_kl_loss(kl: Tensor, mask: Tensor) -> Tensor:
    """``mean_i sum_k sum_{j in k} KL_j``: the segments tile the completion, so this is the
    per-chain token sum (``aggregate`` "seq-mean-token-sum") of any per-token KL.

    Args:
        kl: (N, T) per-token KL (``kl_penalty`` k1/k2/k3, or ``exact_kl``).
        mask: (N, T) 1 on real completion tokens.
    """
    return aggregate(kl, mask, "seq-mean-token-sum")
