"""Policy helpers shared by every algorithm: LoRA, the reference policy, completion log-probs."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
from torch import Tensor, nn

from rftlab.rollout.sampler import position_ids_from_mask


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
        target_modules: "all-linear" or a list of module-name suffixes (e.g. ["q_proj", "v_proj"]).
    """
    from peft import LoraConfig, get_peft_model

    if isinstance(target_modules, list) and target_modules:
        names = {name.split(".")[-1] for name, _ in model.named_modules()}
        missing = [t for t in target_modules if t not in names]
        if missing:
            linear = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise ValueError(f"lora_target_modules {missing} match no module of the model; linear layers: {linear}")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def is_adapter_model(model: nn.Module) -> bool:
    """True when ``model`` is a PEFT model whose adapter can be switched off."""
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


@contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[None]:
    """The reference policy of an adapter model: the same weights with the adapter switched off."""
    ctx = model.disable_adapter() if is_adapter_model(model) else nullcontext()
    with ctx:
        yield


def completion_logits(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    temperature: float = 1.0,
) -> Tensor:
    """Logits that predicted each completion token, divided by the sampling temperature.

    Only the T + 1 last positions go through the LM head (``logits_to_keep``): the prompt positions'
    logits are never needed, and with V = 49k the head is a large part of the step.
    Dividing by the temperature makes the log-probs those of the distribution that sampled
    (the trap reported against TRL in #4159).

    Args:
        model: HF causal LM (PEFT-wrapped or not).
        prompt_ids: (N, P) left-padded.
        prompt_mask: (N, P).
        completion_ids: (N, T) right-padded.
        completion_mask: (N, T).
        temperature: sampling temperature (> 0).

    Returns:
        (N, T, V) float32 logits; row t predicts ``completion_ids[:, t]``.
    """
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    T = completion_ids.shape[1]
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        logits_to_keep=T + 1,
        use_cache=False,
    )
    logits = out.logits[:, :-1, :]  # position P+t-1 predicts completion token t
    return logits.float() / temperature if temperature != 1.0 or logits.dtype != torch.float32 else logits


def trainable_state_keys(module: nn.Module) -> set[str]:
    """Names (as in ``module.state_dict()``) of parameters that require grad, plus all buffers."""
    keys = {name for name, p in module.named_parameters() if p.requires_grad}
    keys |= {name for name, _ in module.named_buffers()}
    return keys
