"""Policy helpers shared by every algorithm: LoRA, the reference policy, completion log-probs."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator, NamedTuple

import torch
from torch import Tensor, nn

from rftlab.models.hf import hf_model, is_checkpointing, position_ids_from_mask
from rftlab.models.packing import (PACKING, attention_pair_cost, check_packed_attention, is_prefix_mask, pack_groups,
                                   packable, packed_states, packing_pays)
from rftlab.models.sharding import root_is_sharded


def apply_lora(
    model: nn.Module,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.0,
    target_modules: str | list[str] = "all-linear",
) -> nn.Module:
    """Wrap ``model`` with a PEFT LoRA adapter (Hu et al. 2021, arXiv 2106.09685); base weights frozen.

    Args:
        model: a HF causal LM.
        r: adapter rank (>= 1).
        alpha: LoRA scaling numerator (the update is scaled by alpha / r).
        dropout: dropout on the adapter input, in [0, 1).
        target_modules: "all-linear", a list of module-name suffixes (e.g. ["q_proj", "v_proj"]), or a
            regex over full module names (PEFT's reading of any other string).
    """
    from peft import LoraConfig, get_peft_model

    linear = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    if isinstance(target_modules, list) and target_modules:
        names = {name.split(".")[-1] for name, _ in model.named_modules()}
        missing = [t for t in target_modules if t not in names]
        if missing:
            raise ValueError(f"lora_target_modules {missing} match no module of the model; linear layers: {linear}")
    elif isinstance(target_modules, str) and target_modules != "all-linear":
        import re

        # PEFT reads a string other than "all-linear" as a regex over full module names.
        if not any(re.fullmatch(target_modules, name) for name, _ in model.named_modules()):
            raise ValueError(f"lora_target_modules={target_modules!r} (a regex over full module names) matches no "
                             f"module of the model; use 'all-linear' or a list of these linear layers: {linear}")
    elif not target_modules:
        raise ValueError(f"lora_target_modules={target_modules!r} is empty; use 'all-linear' or some of these linear layers: {linear}")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        # PEFT still reads transformers' deprecated `is_gradient_checkpointing` (v5 renamed it).
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def is_adapter_model(model: nn.Module) -> bool:
    """True when ``model`` is a PEFT model whose adapter can be switched off."""
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


@contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[None]:
    """The reference policy of an adapter model: the same weights with the adapter switched off.

    Which parameters train is left as it was: PEFT re-enables an adapter by calling ``set_adapter``,
    which sets ``requires_grad`` on the active adapter only and silently freezes any other adapter
    (e.g. a critic's own LoRA adapter, see ``add_adapter``). Each adapter layer is switched directly:
    PEFT's ``disable_adapter`` first walks the model to report its status, about a tenth of a
    135M model's reference forward.
    """
    if not is_adapter_model(model):
        yield
        return
    layers = _adapter_layers(model)
    if layers is None:  # prompt learning and other non-layer adapters: PEFT's own switch
        with _trainable_kept(model), model.disable_adapter():
            yield
        return
    was_off = [layer.disable_adapters for layer in layers]
    with _trainable_kept(model):
        try:
            for layer in layers:
                layer.enable_adapters(False)
            yield
        finally:
            for layer, off in zip(layers, was_off):
                layer.enable_adapters(not off)


def _adapter_layers(model: nn.Module) -> list[nn.Module] | None:
    """The PEFT tuner layers of ``model`` (LoRA and kin), or None when its adapter is not layer-based."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    try:  # modules_to_save wrappers switch with the adapter (peft >= 0.15)
        from peft.utils.other import AuxiliaryTrainingWrapper
        kinds: tuple[type, ...] = (BaseTunerLayer, AuxiliaryTrainingWrapper)
    except ImportError:
        kinds = (BaseTunerLayer,)
    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None))
    if config is None or getattr(config, "is_prompt_learning", False) or getattr(config, "is_adaption_prompt", False):
        return None
    return [module for module in model.modules() if isinstance(module, kinds)]


@contextmanager
def _trainable_kept(model: nn.Module) -> Iterator[None]:
    params = list(model.parameters())  # one walk of the module tree, not one per phase
    trains = [p.requires_grad for p in params]
    try:
        yield
    finally:
        for p, flag in zip(params, trains):
            if p.requires_grad != flag:
                p.requires_grad_(flag)


def add_adapter(
    model: nn.Module,
    name: str,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.0,
    target_modules: str | list[str] = "all-linear",
) -> None:
    """Add a second, trainable LoRA adapter ``name`` to a PEFT model; the active adapter is unchanged.

    Both adapters share the one copy of the base weights (e.g. a critic's adapter next to the
    policy's). Run a forward with it inside ``adapter_active(model, name)``.

    Args:
        model: a PEFT model (from ``apply_lora``).
        name: the new adapter's name (not "default", which is the policy's).
        r: adapter rank (>= 1).
        alpha: LoRA scaling numerator (the update is scaled by alpha / r).
        dropout: dropout on the adapter input, in [0, 1).
        target_modules: "all-linear" or a list of module-name suffixes.
    """
    from peft import LoraConfig

    if not is_adapter_model(model):
        raise ValueError("add_adapter needs a PEFT model: apply_lora(model) first")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM")
    with _trainable_kept(model):
        model.add_adapter(name, config)
    # PEFT creates the new adapter frozen (only the active one trains): make it trainable.
    for param_name, p in model.named_parameters():
        if f".{name}." in param_name:
            p.requires_grad_(True)


@contextmanager
def adapter_active(model: nn.Module, name: str) -> Iterator[None]:
    """Run ``model`` with adapter ``name`` active instead of the current one; restored on exit.

    Which parameters train is unchanged (PEFT's ``set_adapter`` would freeze the inactive adapter).
    """
    previous = model.active_adapter
    with _trainable_kept(model):
        model.set_adapter(name)
        try:
            yield
        finally:
            model.set_adapter(previous)


class CompletionOutput(NamedTuple):
    """What ``completion_forward`` returns.

    Attributes:
        logits: (N, T, V) temperature-scaled logits, row t predicts completion token t (float32, or
            the head's dtype at temperature 1: see ``_scaled``);
            None when not asked for.
        hidden: (N, T + 1, H) last-layer hidden states (after the final norm) of the T + 1 last
            positions: ``hidden[:, t]`` is the state after the prompt and t completion tokens
            (t = 0 the prompt alone, t = T the whole sequence); None when not asked for.
    """

    logits: Tensor | None
    hidden: Tensor | None


def prompt_groups(prompt_ids: Tensor, prompt_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Rows that share a prompt: (index of each distinct prompt's first row, (N,) group of each row).

    Args:
        prompt_ids: (N, P) left-padded prompts.
        prompt_mask: (N, P) 1 on real prompt tokens.
    """
    keys = torch.cat([prompt_ids, prompt_mask.to(prompt_ids.dtype)], dim=1)
    _, group = torch.unique(keys, dim=0, return_inverse=True)
    first = torch.full((int(group.max()) + 1,), len(group), dtype=torch.long, device=group.device)
    first = first.scatter_reduce(0, group, torch.arange(len(group), device=group.device), reduce="amin")
    return first, group


def completion_forward(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    temperature: float = 1.0,
    logits: bool = True,
    hidden: bool = False,
    share_prompt: bool = True,
    packing: str = "never",
    packed_attention: str = "auto",
) -> CompletionOutput:
    """One forward over prompt + completion giving the completion logits and/or last hidden states.

    Only the T + 1 last positions go through the LM head (``logits_to_keep``): the prompt positions'
    logits are never needed, and with V = 49k the head is a large part of the step (with
    ``logits=False`` a single position goes through it). Dividing by the temperature makes the
    log-probs those of the distribution that sampled (the trap reported against TRL in #4159).
    The hidden states are the ones a value head reads (a critic sharing the policy's forward).

    With ``share_prompt`` and rows that repeat a prompt (a group of G completions), each distinct
    prompt goes through the model once and the completions attend to its key/value cache, indexed
    per row; the cache keeps its autograd graph, so the backward also runs once per prompt and sums
    the G rows' gradients. Same result as the full forward up to float rounding, at roughly
    (P + G*T) / (G * (P + T)) of the cost. Not used under gradient checkpointing (recomputing a
    layer would read the cache after later layers extended it).

    With ``share_prompt`` and ``packing`` "always", or "auto" where ``packing_pays`` estimates it
    cheaper, each group runs as one packed row (the prompt once, then every completion's real
    tokens; ``rftlab.models.packing``): no padding, the prompt encoded once, also under gradient
    checkpointing. Long rows with little padding stay padded: attention over a packed row grows
    with the square of its length.

    Args:
        model: HF causal LM (PEFT-wrapped or not).
        prompt_ids: (N, P) left-padded.
        prompt_mask: (N, P).
        completion_ids: (N, T) right-padded.
        completion_mask: (N, T).
        temperature: sampling temperature (> 0).
        logits: return the (N, T, V) logits.
        hidden: return the (N, T + 1, H) last hidden states.
        share_prompt: encode each distinct prompt once (when some rows repeat one).
        packing: "auto", "always" or "never": lay out each group as one packed row (see above).
        packed_attention: "auto", "sdpa" or "eager": the attention kernel of packed rows ("auto":
            explicit attention on a CPU while the rows are short, see ``rftlab.models.packing``).
    """
    check_packed_attention(packed_attention)  # here too: a batch that does not pack never reaches packed_states
    T = completion_ids.shape[1]
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    positions = position_ids_from_mask(attention_mask)
    if share_prompt and T > 0:
        first, group = prompt_groups(prompt_ids, prompt_mask)
        if _packs(model, prompt_mask, completion_mask, group, len(first), packing):
            states = packed_states(model, pack_groups(prompt_ids, prompt_mask, completion_ids, completion_mask, group),
                                   packed_attention)
            scaled = _scaled(hf_model(model).get_output_embeddings()(states[:, :T]), temperature) if logits else None
            return CompletionOutput(scaled, states if hidden else None)
        if len(first) < len(group) and not _recomputes(model):
            return _shared_prompt_forward(model, prompt_ids, prompt_mask, completion_ids, attention_mask, positions,
                                          first, group, temperature, logits, hidden)
    out = model(
        input_ids=torch.cat([prompt_ids, completion_ids], dim=1),
        attention_mask=attention_mask,
        position_ids=positions,
        logits_to_keep=T + 1 if logits else 1,
        use_cache=False,
        output_hidden_states=hidden,
    )
    scaled = _scaled(out.logits[:, :-1, :], temperature) if logits else None  # position P+t-1 predicts token t
    # hidden_states[-1] is the final-norm output the LM head reads (checked in the tests).
    last = out.hidden_states[-1][:, -(T + 1) :] if hidden else None
    return CompletionOutput(scaled, last)


def _recomputes(model: nn.Module) -> bool:
    """Whether this forward's layers will be recomputed in backward (gradient checkpointing)."""
    return torch.is_grad_enabled() and is_checkpointing(model)


def _packs(model: nn.Module, prompt_mask: Tensor, completion_mask: Tensor, group: Tensor, groups: int,
           packing: str) -> bool:
    """Whether ``completion_forward`` runs packed rows (see there)."""
    if packing not in PACKING:
        raise ValueError(f"packing={packing!r} is invalid: must be one of {', '.join(PACKING)}")
    if packing == "never" or groups == len(group) or not packable(model) or not is_prefix_mask(completion_mask):
        return False
    if root_is_sharded(model):
        # Packed rows run the backbone and the head separately, outside the root unit's forward,
        # whose hooks gather the sharded embeddings and head (FSDP2).
        return False
    if not prompt_mask.any(-1).all():  # a completion's first token is predicted from its prompt's last
        return False
    return packing == "always" or packing_pays(prompt_mask, completion_mask, group, attention_pair_cost(model),
                                               prompt_cache=not _recomputes(model))


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    """Logits divided by the sampling temperature: float32, or as the head made them at temperature 1.

    At temperature 1 nothing is divided, and a bf16 head's logits stay bf16: the log-prob helpers
    (``rftlab.core.logprobs``) upcast them a row at a time, to the same float32 numbers, where a
    float32 copy of the whole (N, T, V) tensor (and its backward) cost about a twentieth of a bf16
    LoRA step. A division needs float32: bf16 would round the divided logits.
    """
    if temperature == 1.0:
        return logits
    return logits.float() / temperature


def _shared_prompt_forward(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    attention_mask: Tensor,
    positions: Tensor,
    first: Tensor,
    group: Tensor,
    temperature: float,
    logits: bool,
    hidden: bool,
) -> CompletionOutput:
    """``completion_forward`` with each distinct prompt encoded once (see there)."""
    from transformers import DynamicCache

    P = prompt_ids.shape[1]
    cache = DynamicCache()
    head = model(input_ids=prompt_ids[first], attention_mask=prompt_mask[first], position_ids=positions[first, :P],
                 past_key_values=cache, use_cache=True, logits_to_keep=1, output_hidden_states=hidden)
    cache = head.past_key_values
    cache.batch_select_indices(group)  # one cache row per completion; indexing keeps the graph
    tail = model(input_ids=completion_ids, attention_mask=attention_mask, position_ids=positions[:, P:],
                 past_key_values=cache, use_cache=True, logits_to_keep=completion_ids.shape[1] if logits else 1,
                 output_hidden_states=hidden)
    scaled = None
    if logits:
        # The prompt's last position predicts completion token 0; completion position t predicts t + 1.
        scaled = _scaled(torch.cat([head.logits[group, -1:], tail.logits[:, :-1]], dim=1), temperature)
    last = torch.cat([head.hidden_states[-1][group, -1:], tail.hidden_states[-1]], dim=1) if hidden else None
    return CompletionOutput(scaled, last)


def completion_logits(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    temperature: float = 1.0,
    share_prompt: bool = True,
    packing: str = "never",
    packed_attention: str = "auto",
) -> Tensor:
    """Logits that predicted each completion token, divided by the sampling temperature.

    See ``completion_forward`` (this is its logits-only form).

    Args:
        model: HF causal LM (PEFT-wrapped or not).
        prompt_ids: (N, P) left-padded.
        prompt_mask: (N, P).
        completion_ids: (N, T) right-padded.
        completion_mask: (N, T).
        temperature: sampling temperature (> 0).
        share_prompt: encode each distinct prompt once (see ``completion_forward``).
        packing: "auto", "always" or "never" (see ``completion_forward``).
        packed_attention: "auto", "sdpa" or "eager" (see ``completion_forward``).

    Returns:
        (N, T, V) logits (float32, or the head's dtype at temperature 1); row t predicts
        ``completion_ids[:, t]``.
    """
    return completion_forward(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature,
                              share_prompt=share_prompt, packing=packing, packed_attention=packed_attention).logits


def trainable_state_keys(module: nn.Module) -> set[str]:
    """Names (as in ``module.state_dict()``) of parameters that require grad, plus all buffers."""
    keys = {name for name, p in module.named_parameters() if p.requires_grad}
    keys |= {name for name, _ in module.named_buffers()}
    return keys
