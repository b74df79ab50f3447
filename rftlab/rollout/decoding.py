"""rftlab's own sampling loop: one prefill per prompt, a shared KV cache, finished rows dropped.

HF ``generate(num_return_sequences=G)`` repeats every prompt G times before the prefill, so the
prompt is encoded G times, and it keeps decoding finished sequences (as padding) until the longest
one ends. Here the prompt is encoded once, its KV cache is repeated G times
(``DynamicCache.batch_repeat_interleave``), and rows that sampled EOS leave the batch
(``batch_select_indices``), so later steps only pay for sequences still running.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from rftlab.models.hf import position_ids_from_mask
from rftlab.rollout.distributed import any_rank
from rftlab.rollout.sampler import SamplingParams


def filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Apply top-k then top-p (nucleus) filtering by setting removed logits to -inf.

    Same order and tie handling as transformers' TopK/TopP warpers (top-p keeps the smallest set of
    tokens whose probability mass reaches ``top_p``, and always the most likely token).

    Args:
        logits: (N, V) temperature-scaled logits, float32.
        top_k: keep the k largest (0 disables).
        top_p: nucleus mass in (0, 1] (1 disables).
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = cumulative <= (1 - top_p)
        remove_sorted[..., -1] = False  # never remove the most likely token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def inverse_cdf(probs: Tensor, uniform: Tensor) -> Tensor:
    """The token whose cumulative-probability interval holds ``uniform``: (N, V), (N,) -> (N,).

    Row n returns the first index i with cdf[i] > u * cdf[-1] (cdf in float64), so a token of zero
    probability (filtered out) is never returned, and P(i) = probs[i] / sum(probs) for u ~ U[0, 1).

    Args:
        probs: (N, V) non-negative probabilities (need not sum exactly to 1).
        uniform: (N,) numbers in [0, 1).
    """
    cdf = probs.double().cumsum(-1)
    target = uniform.double().unsqueeze(-1) * cdf[:, -1:]
    index = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    if bool((index >= probs.shape[-1]).any()):
        # u * total rounded up to total itself (probability ~2**-53): take the last token with
        # non-zero probability rather than one past the end. Checked first: the search over the
        # vocabulary runs only then, not at every decoded token.
        last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(-1)
        index = torch.minimum(index, last)
    return index


def next_tokens(logits: Tensor, params: SamplingParams) -> Tensor:
    """Greedy argmax, or a sample from softmax(filter(logits / temperature)); (N, V) -> (N,).

    Sampling inverts the CDF with one uniform number per row. ``torch.multinomial`` (what
    transformers' ``generate`` uses) draws an exponential variate for every vocabulary entry: for 8
    rows of SmolLM2's 49k-token vocabulary that was ~7 ms per decoded token on a CPU, a tenth of
    the whole decode step. Same distribution, a different stream of random numbers.
    """
    return sample_next(logits, params, logprobs=False)[0]


def sample_next(logits: Tensor, params: SamplingParams, logprobs: bool = True) -> tuple[Tensor, Tensor | None]:
    """The next tokens (as ``next_tokens``) and, when sampling, their log-probs under the sampler.

    The log-prob is ``log_softmax(logits / temperature)`` at the sampled token, before top-k/top-p
    filtering: the quantity the trainer computes for the same token, so the two can be compared
    (rollout correction). Greedy decoding returns None.

    Args:
        logits: (N, V) next-token logits.
        params: sampling parameters.
        logprobs: also return the log-probs (free without top-k/top-p; one more pass over the
            vocabulary with them).

    Returns:
        ``(tokens (N,), logprobs (N,) float32 or None)``.
    """
    if params.greedy:
        return logits.argmax(-1), None
    scaled = logits.float() / params.temperature
    filtered = filter_logits(scaled, params.top_k, params.top_p)
    uniform = torch.rand(scaled.shape[0], dtype=torch.float64, device=scaled.device)
    probs = filtered.softmax(-1)
    token = inverse_cdf(probs, uniform)
    if not logprobs:
        return token, None
    if filtered is scaled:
        # Nothing filtered: the sampled token's probability is already here (a sampled token has
        # probability > 0), so its log costs a gather, not another pass over the vocabulary.
        return token, probs.gather(-1, token.unsqueeze(-1)).squeeze(-1).log()
    # Filtered: the unfiltered distribution's normaliser, the quantity the trainer computes.
    return token, (scaled.gather(-1, token.unsqueeze(-1)) - scaled.logsumexp(-1, keepdim=True)).squeeze(-1)


def prefill(model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, num_generations: int) -> tuple[Any, Tensor, Tensor, Tensor]:
    """Encode each prompt once and repeat its KV cache for its ``num_generations`` rows.

    Args:
        model: a HF causal LM (or PEFT-wrapped one) that accepts ``past_key_values``.
        prompt_ids: (B, P) left-padded prompts.
        prompt_mask: (B, P) 1 on real prompt tokens.
        num_generations: rows per prompt (G); row ``b * G + g``.

    Returns:
        ``(cache, logits, attention, next_position)``: the ``DynamicCache`` of the B*G rows, the
        (B*G, V) next-token logits, the (B*G, P) attention mask and the (B*G, 1) next position ids.
    """
    from transformers import DynamicCache

    G = num_generations
    positions = position_ids_from_mask(prompt_mask)
    # Only the last position's logits are needed.
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions,
                past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    logits = out.logits[:, -1].repeat_interleave(G, dim=0)
    if G > 1:
        cache.batch_repeat_interleave(G)
    attention = prompt_mask.repeat_interleave(G, dim=0)
    next_position = positions[:, -1:].repeat_interleave(G, dim=0) + 1
    return cache, logits, attention, next_position


def decode(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    num_generations: int,
    params: SamplingParams,
    eos_token_ids: list[int],
    pad_token_id: int,
    logprobs: bool = False,
    lockstep: bool = False,
) -> Tensor | tuple[Tensor, Tensor | None]:
    """Sample ``num_generations`` continuations of each prompt; returns (B*G, T) tokens.

    Rows are grouped by prompt (row ``b * G + g``). After a row's EOS the rest of the row is
    ``pad_token_id``; T is the longest completion (at most ``params.max_new_tokens``). Call it
    under ``sampling_mode(model)`` (eval, no grad).

    Args:
        model: a HF causal LM (or PEFT-wrapped one) that accepts ``past_key_values``.
        prompt_ids: (B, P) left-padded prompts.
        prompt_mask: (B, P) 1 on real prompt tokens.
        num_generations: completions per prompt (G).
        params: sampling parameters.
        eos_token_ids: ids that end a completion.
        pad_token_id: filler after EOS.
        logprobs: also return the (B*G, T) float32 log-probs of the sampled tokens (``sample_next``;
            0 after the EOS, None when greedy).
        lockstep: the weights are sharded over processes (FSDP2), so each forward is a collective:
            a process whose rows are all finished keeps running forwards (on one placeholder row,
            without sampling, so its random stream is untouched) until every process is done.
    """
    G = num_generations
    device = prompt_ids.device
    cache, logits, attention, next_position = prefill(model, prompt_ids, prompt_mask, G)
    N = prompt_ids.shape[0] * G
    tokens = torch.full((N, params.max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    record = logprobs and not params.greedy
    token_logps = torch.zeros((N, params.max_new_tokens), dtype=torch.float32, device=device) if record else None
    rows = torch.arange(N, device=device)  # which output rows are still being decoded
    eos = torch.tensor(eos_token_ids, device=device)
    length = 0
    placeholder = False  # lockstep: this process is done and only keeps the others company
    for step in range(params.max_new_tokens):
        if placeholder:
            token, running = token[:1], torch.zeros(1, dtype=torch.bool, device=device)
        else:
            token, logp = sample_next(logits, params, logprobs=record)
            tokens[rows, step] = token
            if record:
                token_logps[rows, step] = logp
            length = step + 1
            running = ~torch.isin(token, eos)
        if step == params.max_new_tokens - 1:
            break
        if lockstep:
            if not any_rank(bool(running.any())):
                break
            if not running.any():
                placeholder, running = True, torch.zeros_like(running)
                running[0] = True  # one row keeps the forwards going; its tokens are not recorded
        elif not running.any():
            break
        if not running.all():
            # Drop finished rows from the batch and from the cache: later steps cost only what runs.
            keep = running.nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            rows, token, attention, next_position = rows[keep], token[keep], attention[keep], next_position[keep]
        attention = torch.cat([attention, attention.new_ones(len(rows), 1)], dim=1)
        out = model(input_ids=token.unsqueeze(-1), attention_mask=attention, position_ids=next_position,
                    past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits = out.logits[:, -1]
        next_position = next_position + 1
    if not logprobs:
        return tokens[:, :length]
    return tokens[:, :length], (token_logps[:, :length] if record else None)
