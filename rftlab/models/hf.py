"""Helpers for Hugging Face causal LMs: the model inside a PEFT wrapper, activation checkpointing, positions.

They live in ``models`` (not ``rollout``) so that models, rollout and algorithms can all use them
without models importing rollout.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids that follow the attention mask (left padding does not shift positions).

    Matches what HF ``generate`` uses for left-padded batches, so training-time log-probs see the
    same positions as sampling did.
    """
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp_min(0)


@contextmanager
def evaluation_mode(*modules: nn.Module | None) -> Iterator[None]:
    """Every module in eval mode (no dropout) inside; afterwards each submodule's own mode again.

    Restoring by the top-level flag (``model.train(was_training)``) would put back in train mode a
    submodule the user had frozen in eval mode; this keeps each submodule's flag as it was.

    Args:
        modules: the modules to switch (None entries are skipped).
    """
    modules = tuple(m for m in modules if m is not None)
    states = [(module.training, [(m, m.training) for m in module.modules()]) for module in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, (top, flags) in zip(modules, states):
            module.train(top)  # through train(), which a model class may extend (HF's does)
            for m, training in flags:  # then each submodule that differed from the top-level flag
                if m.training != training:
                    m.training = training


def set_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Switch activation (gradient) checkpointing of a HF model on or off, across transformers versions."""
    kwargs = {"use_reentrant": False}  # the reentrant variant needs inputs that require grad
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        if enabled:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.activation_checkpointing_disable()
    elif enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_disable()


def hf_model(model: nn.Module) -> nn.Module:
    """The HF causal LM inside a PEFT wrapper (its layers carry the adapter), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_checkpointing(model: nn.Module) -> bool:
    """Whether activation checkpointing is on (``is_gradient_checkpointing`` is deprecated in v5)."""
    model = getattr(model, "get_base_model", lambda: model)()  # a PEFT wrapper forwards it with a warning
    flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else "is_gradient_checkpointing"
    return bool(getattr(model, flag, False))


def stop_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """Token ids that end an answer: the tokenizer's EOS plus the model's generation-config EOS ids.

    Args:
        model: HF causal LM (PEFT-wrapped or not).
        tokenizer: its tokenizer.
    """
    ids = [tokenizer.eos_token_id]
    extra = getattr(getattr(hf_model(model), "generation_config", None), "eos_token_id", None)
    for token in extra if isinstance(extra, list) else [extra]:
        if token is not None and token not in ids:
            ids.append(token)
    return ids
