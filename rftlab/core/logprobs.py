"""Per-token log-probabilities and entropies from logits, without the (N, T, V) log-softmax.

With V ~ 50k-150k, a full float32 log-softmax of an (N, T, V) batch is the largest tensor of an RL
step. Both functions below work on one slice at a time so peak extra memory is one slice's worth.
The approach follows TRL's ``selective_log_softmax`` (``trl/trainer/utils.py``).

Callers must divide logits by the sampling temperature first (see DESIGN.md, "Known traps").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_FULL_PRECISION = (torch.float32, torch.float64)


def _check_logits_and_ids(logits: Tensor, ids: Tensor) -> None:
    """Raise unless ``logits`` is floating (N, T, V) (any leading dims) and ``ids`` is (N, T)."""
    if logits.dim() < 2 or logits.shape[:-1] != ids.shape:
        raise ValueError(
            f"expected logits (N, T, V) and ids (N, T), got {tuple(logits.shape)} and {tuple(ids.shape)}"
        )
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")


def selective_log_softmax(logits: Tensor, ids: Tensor) -> Tensor:
    """``log_softmax(logits, -1).gather(-1, ids)`` without materialising the full log-softmax.

    For float32/float64 it uses ``log p(id) = logit[id] - logsumexp(logits)``, one row of the batch
    at a time. For bfloat16/float16, ``logsumexp`` in low precision is inaccurate (its sum of
    exponentials rounds to ~3 significant digits), so each row is upcast to float32 and passed
    through ``log_softmax`` instead, still one row at a time.

    Args:
        logits: (N, T, V) (any leading dims with at least 2 dims total), floating.
        ids: (N, T) integer token ids in ``[0, V)``; ``logits.shape[:-1]`` must equal ``ids.shape``.

    Returns:
        (N, T) log-probabilities. Same dtype as ``logits`` for float32/float64; float32 for
        lower-precision logits, because they feed ``exp(logp - old_logp)`` where bf16 rounding
        would be of the order of the PPO clip range itself. Differentiable w.r.t. ``logits``.
    """
    _check_logits_and_ids(logits, ids)
    ids = ids.long()
    full = logits.dtype in _FULL_PRECISION
    out_dtype = logits.dtype if full else torch.float32
    if logits.shape[0] == 0:
        return logits.new_zeros(ids.shape, dtype=out_dtype)
    rows = []
    # The loop over the first dim bounds the temporary to one (T, V) row instead of (N, T, V).
    for row_logits, row_ids in zip(logits, ids):
        if full:
            picked = row_logits.gather(-1, row_ids.unsqueeze(-1)).squeeze(-1)
            rows.append(picked - torch.logsumexp(row_logits, dim=-1))
        else:
            row_logp = F.log_softmax(row_logits.float(), dim=-1)
            rows.append(row_logp.gather(-1, row_ids.unsqueeze(-1)).squeeze(-1))
    return torch.stack(rows)


def entropy_from_logits(logits: Tensor, chunk_size: int = 128) -> Tensor:
    """Entropy of the categorical distribution at each position: ``-(softmax * log_softmax).sum(-1)``.

    Rows of the flattened (N*T, V) logits are processed ``chunk_size`` at a time, in float32 (or
    float64 for float64 input), so the extra memory is O(chunk_size * V). Logits of ``-inf`` (tokens
    removed by top-k/top-p filtering) contribute 0, as ``0 * log 0 = 0`` in the definition.

    Args:
        logits: (N, T, V) (any leading dims), floating.
        chunk_size: rows per chunk, >= 1.

    Returns:
        (N, T) entropies in nats, float32 (float64 for float64 input). Differentiable.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if logits.dim() < 1 or not logits.is_floating_point():
        raise ValueError(
            f"logits must be a floating tensor (..., V), got {logits.dtype} {tuple(logits.shape)}"
        )
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    lead_shape = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])
    if flat.shape[0] == 0:
        return logits.new_zeros(lead_shape, dtype=compute_dtype)
    # Clamping -inf log-probs to the most negative finite value turns 0 * -inf (NaN) into
    # 0 * finite (0) in both the value and the gradient, without changing any finite term.
    floor = torch.finfo(compute_dtype).min
    chunks = []
    for chunk in flat.split(chunk_size):
        logp = F.log_softmax(chunk.to(compute_dtype), dim=-1)
        chunks.append(-(logp.exp() * logp.clamp_min(floor)).sum(-1))
    return torch.cat(chunks).reshape(lead_shape)


def selective_log_softmax_and_entropy(logits: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """``selective_log_softmax(logits, ids)`` and the detached ``entropy_from_logits(logits)``, in one pass.

    A training step that only monitors the entropy would otherwise normalise the (N, T, V) logits
    twice; here each row's normalisation serves both. The log-probs are the same numbers (and the
    same gradient) as ``selective_log_softmax``'s, the entropies those of ``entropy_from_logits``.

    Args:
        logits: (N, T, V) floating logits.
        ids: (N, T) integer token ids in ``[0, V)``.

    Returns:
        ``(logp, entropy)``: (N, T) log-probs as ``selective_log_softmax`` returns them
        (differentiable), and (N, T) entropies in nats without grad, float32 (float64 for float64 input).
    """
    _check_logits_and_ids(logits, ids)
    ids = ids.long()
    full = logits.dtype in _FULL_PRECISION
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    if logits.shape[0] == 0:
        return (logits.new_zeros(ids.shape, dtype=logits.dtype if full else torch.float32),
                logits.new_zeros(ids.shape, dtype=compute_dtype))
    floor = torch.finfo(compute_dtype).min
    rows, entropies = [], []
    for row_logits, row_ids in zip(logits, ids):
        if full:
            picked = row_logits.gather(-1, row_ids.unsqueeze(-1)).squeeze(-1)
            lse = torch.logsumexp(row_logits, dim=-1)
            rows.append(picked - lse)
            with torch.no_grad():  # the normaliser just computed serves the entropy too
                row_logp = row_logits.detach() - lse.detach().unsqueeze(-1)
        else:
            row_logp = F.log_softmax(row_logits.float(), dim=-1)
            rows.append(row_logp.gather(-1, row_ids.unsqueeze(-1)).squeeze(-1))
        with torch.no_grad():
            # As entropy_from_logits: -inf log-probs clamped so that 0 * log 0 counts as 0.
            detached = row_logp.detach()
            entropies.append(-(detached.exp() * detached.clamp_min(floor)).sum(-1))
    return torch.stack(rows), torch.stack(entropies)
