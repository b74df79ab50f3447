"""Packed forward: each group's prompt once, then its completions back to back, without padding.

A group of G completions of one prompt is laid out as one row,
``[prompt | completion 1 | completion 2 | ... | completion G]``, holding only real tokens. A 4D
attention mask lets each completion see the prompt and its own earlier tokens, never another
completion, and every completion's position ids restart right after the prompt, so each token sees
exactly what it saw when it was sampled. Rows of different groups are right-padded to the longest.

Compared with the padded forward (G rows of prompt + longest completion) this skips the padding
tokens and encodes the prompt once; compared with the shared-prompt cache (``completion_forward``'s
``share_prompt``) it also skips the padding and the per-row copies of the prompt's keys and values,
and it works under gradient checkpointing. Its cost: attention over a row of L tokens is L x L
(CPU attention kernels do not skip masked blocks), so long rows with little padding cost more than
they save. ``packing_pays`` weighs the two (``packing="auto"``). This is the CPU form of what verl
(``use_remove_padding``) and OpenRLHF (``packing_samples``) do with varlen flash attention.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rftlab.models.hf import hf_model, is_checkpointing

# Attention implementations that accept a custom 4D mask (boolean for SDPA, additive for eager).
PACKABLE_ATTENTION = ("sdpa", "eager")

# "auto": pack when the estimate says so; "always": whenever the layout allows; "never".
PACKING = ("auto", "always", "never")

# The attention kernel of a packed forward: "auto" picks explicit attention for rows on a CPU whose
# scores fit ``EXPLICIT_ATTENTION_BUDGET``, else the model's own; "sdpa" and "eager" force one.
PACKED_ATTENTION = ("auto", "sdpa", "eager")

# Explicit attention (transformers' "eager": two matmuls and a float32 softmax) keeps every layer's
# (B, heads, L, L) attention weights for the backward, about 8 bytes a score (the float32 softmax
# and its cast); SDPA keeps O(L). On a CPU, for the short rows of RL fine-tuning, the explicit form
# is the faster one: torch's CPU flash-attention backward is slow at these sizes. Measured for
# SmolLM2-135M under bf16 autocast, one thread, one row of L tokens, forward + backward of one
# layer's attention: L = 200 2.3 ms against SDPA's 4.2 ms, L = 325 5.5 ms against 9.2, L = 512
# 12.6 against 18.8, L = 1024 89 against 62. The budget keeps rows near and above the crossing,
# and long ones whose weights would take memory, on SDPA (256 MiB: rows up to ~350 tokens here).
EXPLICIT_ATTENTION_BUDGET = 256 * 2**20
EXPLICIT_ATTENTION_BYTES_PER_SCORE = 8


def check_packed_attention(attention: str) -> None:
    """Raise a ValueError naming ``packed_attention`` unless it is one of ``PACKED_ATTENTION``."""
    if attention not in PACKED_ATTENTION:
        raise ValueError(f"packed_attention={attention!r} is invalid: must be one of {', '.join(PACKED_ATTENTION)}")

# How much slower attention runs per flop than the rest of the model (mostly matmuls). Measured for
# SmolLM2-135M in float32 on 2 CPU threads: one query-key pair cost 1.26e-6 s (forward + backward)
# against 3.15e-3 s per token, 1.56x the flop ratio (see ``attention_pair_cost``). 2.0 leans to the
# padded layout where the estimates are close: wrongly packing a long row costs more than wrongly
# padding (G=16 x 64 ragged measured 0.92x and 1.10x packed/padded in two runs; 2.0 pads it).
ATTENTION_SLOWDOWN = 2.0


@dataclass
class PackedRows:
    """Groups laid out one per row, real tokens only.

    Attributes:
        input_ids: (B, L) long, right-padded with 0.
        position_ids: (B, L) long; each completion continues from the end of the prompt.
        segment: (B, L) long: 0 on prompt tokens, k on the k-th completion of the row, -1 on padding.
        state_index: (N, T + 1) long, index into the flattened (B * L) positions of the state after the
            prompt and t completion tokens of sequence n (t = 0 is the prompt's last token); -1
            where t is past the sequence's length.
    """

    input_ids: Tensor
    position_ids: Tensor
    segment: Tensor
    state_index: Tensor

    @property
    def width(self) -> int:
        """L, the length of the longest row."""
        return int(self.input_ids.shape[1])


def is_prefix_mask(mask: Tensor) -> bool:
    """True when every row of a (N, T) 0/1 mask is ones followed by zeros (real tokens, then padding)."""
    lengths = mask.sum(-1, keepdim=True)
    return bool(torch.equal(mask.bool(), torch.arange(mask.shape[1], device=mask.device) < lengths))


def packed_row_lengths(prompt_mask: Tensor, completion_mask: Tensor, group: Tensor) -> Tensor:
    """(groups,) tokens in each group's packed row: its prompt once plus all its completions.

    Args:
        prompt_mask: (N, P) 1 on real prompt tokens.
        completion_mask: (N, T) 1 on real completion tokens.
        group: (N,) index of each row's group (rows of a group share a prompt), 0..groups-1.
    """
    n_groups = int(group.max()) + 1
    prompt_len = torch.zeros(n_groups, dtype=torch.long, device=group.device)
    prompt_len = prompt_len.scatter_reduce(0, group, prompt_mask.sum(-1).long(), reduce="amax", include_self=False)
    completions = torch.zeros(n_groups, dtype=torch.long, device=group.device)
    completions = completions.index_add(0, group, completion_mask.sum(-1).long())
    return prompt_len + completions


def pack_groups(
    prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, completion_mask: Tensor, group: Tensor
) -> PackedRows:
    """Lay out each group as one row: its prompt's real tokens once, then its completions' real tokens.

    Args:
        prompt_ids: (N, P) left-padded prompts; rows of a group hold the same prompt.
        prompt_mask: (N, P) 1 on real prompt tokens.
        completion_ids: (N, T) right-padded completions.
        completion_mask: (N, T) 1 on real completion tokens; each row a prefix (see ``is_prefix_mask``).
        group: (N,) group of each row, 0..groups-1 (e.g. from ``prompt_groups``).
    """
    device = completion_ids.device
    N, T = completion_ids.shape
    lengths = completion_mask.sum(-1).long()
    rows = []
    state_index = torch.full((N, T + 1), -1, dtype=torch.long, device=device)
    steps = torch.arange(T + 1, device=device)
    for g in range(int(group.max()) + 1):
        members = (group == g).nonzero().squeeze(-1)
        prompt = prompt_ids[members[0]][prompt_mask[members[0]].bool()]
        p = len(prompt)
        lens = lengths[members]
        starts = p + lens.cumsum(0) - lens  # where each completion begins in the row
        tokens = completion_ids[members][completion_mask[members].bool()]  # row-major: member by member
        within = torch.arange(len(tokens), device=device) - (starts - p).repeat_interleave(lens)
        rows.append((
            torch.cat([prompt, tokens]),
            torch.cat([torch.arange(p, device=device), p + within]),
            torch.cat([torch.zeros(p, dtype=torch.long, device=device),
                       torch.arange(1, len(members) + 1, device=device).repeat_interleave(lens)]),
            members, starts, lens, p,
        ))
    width = max(len(r[0]) for r in rows)
    B = len(rows)
    input_ids = torch.zeros(B, width, dtype=completion_ids.dtype, device=device)
    position_ids = torch.zeros(B, width, dtype=torch.long, device=device)
    segment = torch.full((B, width), -1, dtype=torch.long, device=device)
    for b, (ids, pos, seg, members, starts, lens, p) in enumerate(rows):
        input_ids[b, : len(ids)] = ids
        position_ids[b, : len(ids)] = pos
        segment[b, : len(ids)] = seg
        # State t of a completion: the prompt's last token for t = 0, else its own token t - 1.
        index = b * width + torch.where(steps == 0, p - 1, starts[:, None] + steps - 1)
        state_index[members] = torch.where(steps <= lens[:, None], index, -1)
    return PackedRows(input_ids, position_ids, segment, state_index)


def packed_attention_mask(segment: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """(B, 1, L, L) mask: query i sees key j <= i of the prompt or of its own completion.

    Padding queries see only themselves (a row with nothing to attend to would give NaN).

    Args:
        segment: (B, L) from ``PackedRows``.
        dtype: None for a boolean mask (True = attend, as SDPA reads it); a float dtype for an
            additive mask (0 or the dtype's minimum, as eager attention adds it).
    """
    L = segment.shape[1]
    positions = torch.arange(L, device=segment.device)
    causal = positions[None, :] <= positions[:, None]
    query, key = segment[:, :, None], segment[:, None, :]
    allowed = causal & ((key == query) | (key == 0)) & (key >= 0) & (query >= 0)
    allowed = allowed | torch.eye(L, dtype=torch.bool, device=segment.device)
    allowed = allowed[:, None]
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=segment.device).masked_fill(~allowed, torch.finfo(dtype).min)


def attention_pair_cost(model: nn.Module) -> float:
    """Cost of one query-key pair of attention, in units of one token's pass through the model.

    Per pair and layer attention does ~4 x width flops (scores and the weighted sum); a token does
    ~2 flops per parameter: 2 x layers x width / parameters, times ``ATTENTION_SLOWDOWN``.

    Args:
        model: HF causal LM (PEFT-wrapped or not).
    """
    config = hf_model(model).config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    width = config.num_attention_heads * head_dim
    return ATTENTION_SLOWDOWN * 2 * config.num_hidden_layers * width / _parameter_count(model)


#: Parameter counts by model: counting walks the whole module tree (a few ms for a 135M model),
#: and the estimate above is asked for at every forward. Parameters added to a model after its first
#: forward (a LoRA adapter: well under 1%) are not counted; the estimate only picks a layout.
_PARAMETER_COUNTS: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()


def _parameter_count(model: nn.Module) -> int:
    count = _PARAMETER_COUNTS.get(model)
    if count is None:
        count = _PARAMETER_COUNTS[model] = sum(p.numel() for p in model.parameters())
    return count


def packing_pays(
    prompt_mask: Tensor, completion_mask: Tensor, group: Tensor, pair_cost: float, prompt_cache: bool = True
) -> bool:
    """Whether packed rows are estimated cheaper than the padded layout, in tokens + attention pairs.

    Packed: B rows of the longest row's length L, each attending L x L. Padded with the prompt's
    cache: each distinct prompt once (P wide) + N x T completion tokens, attending T x (P + T) per
    row; without it (gradient checkpointing): N rows of P + T, attending (P + T) squared. Both
    counted as full squares, as the CPU kernels compute them under a mask.

    Args:
        prompt_mask: (N, P) 1 on real prompt tokens.
        completion_mask: (N, T) 1 on real completion tokens.
        group: (N,) group of each row, 0..groups-1.
        pair_cost: one attention pair in tokens (``attention_pair_cost``).
        prompt_cache: whether the padded layout would share the prompt's key/value cache.
    """
    (N, P), T = prompt_mask.shape, completion_mask.shape[1]
    rows = packed_row_lengths(prompt_mask, completion_mask, group)
    B, L = len(rows), int(rows.max())
    packed = B * L + pair_cost * B * L * L
    if prompt_cache:
        padded = B * P + N * T + pair_cost * N * T * (P + T)
    else:
        padded = N * (P + T) + pair_cost * N * (P + T) ** 2
    return packed < padded


def packable(model: nn.Module) -> bool:
    """Whether ``model``'s attention takes the custom 4D mask a packed forward needs.

    SDPA or eager attention, and no sliding window (the mask would replace the window's, which
    transformers builds only for its own masks).
    """
    config = getattr(hf_model(model), "config", None)
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    return getattr(config, "_attn_implementation", None) in PACKABLE_ATTENTION


def explicit_attention_pays(model: nn.Module, packed: PackedRows, budget: int | None = None) -> bool:
    """Whether a packed forward should run explicit ("eager") attention rather than SDPA.

    On a CPU, when every layer's attention weights for the backward fit in ``budget`` bytes (see
    ``EXPLICIT_ATTENTION_BUDGET``); never on an accelerator, whose SDPA kernels are the fast ones.

    Args:
        model: HF causal LM (PEFT-wrapped or not).
        packed: the rows about to run.
        budget: bytes the attention weights of all layers may take (None: ``EXPLICIT_ATTENTION_BUDGET``).
    """
    budget = EXPLICIT_ATTENTION_BUDGET if budget is None else budget
    if packed.input_ids.device.type != "cpu":
        return False
    config = hf_model(model).config
    rows, width = packed.input_ids.shape
    scores = rows * config.num_attention_heads * width * width * config.num_hidden_layers
    return scores * EXPLICIT_ATTENTION_BYTES_PER_SCORE <= budget


def packed_states(model: nn.Module, packed: PackedRows, attention: str = "auto") -> Tensor:
    """(N, T + 1, H) last hidden states (after the final norm) at ``packed.state_index``; 0 past the end.

    Args:
        model: HF causal LM (PEFT-wrapped or not) whose ``packable`` is True.
        packed: the rows (``pack_groups``).
        attention: "auto", "sdpa" or "eager": the attention kernel (see ``PACKED_ATTENTION``); the
            model's own under gradient checkpointing, whose recompute runs outside this call.
    """
    check_packed_attention(attention)
    lm = hf_model(model)
    config = lm.config
    own = config._attn_implementation
    if attention == "auto":
        kernel = "eager" if own == "eager" or explicit_attention_pays(model, packed) else own
    else:
        kernel = attention
    if getattr(config, "sub_configs", None):
        kernel = own  # a composite model's sub-configs choose their own kernels: left as they are
    if torch.is_grad_enabled() and is_checkpointing(model):
        kernel = own  # the backward's recompute runs after the switch below is undone
    # Eager attention adds the mask to its scores; float32 keeps the minimum finite in any dtype.
    mask = packed_attention_mask(packed.segment, torch.float32 if kernel == "eager" else None)
    # Each attention layer reads the kernel's name from the shared config at every call; the mask
    # was built here for it, so transformers' own mask code never sees the switch.
    config._attn_implementation = kernel
    try:
        out = lm.get_decoder()(input_ids=packed.input_ids, attention_mask=mask, position_ids=packed.position_ids,
                               use_cache=False)
    finally:
        config._attn_implementation = own
    hidden = out.last_hidden_state  # the decoder applies the final norm, as hidden_states[-1] of the LM
    flat = hidden.reshape(-1, hidden.shape[-1])
    valid = packed.state_index >= 0
    states = flat[packed.state_index.clamp_min(0)]
    return states * valid[..., None].to(states.dtype)
