"""The weight layout of Llama-family decoders that rftlab's static-cache loop reads.

``unsupported_reason`` says whether a model has that layout (a plain, unsharded, unquantized
Llama, Qwen2 or Mistral without a sliding window); ``pack_fused_weights`` stores each layer's
q/k/v and gate/up weights back to back, so ``fuse`` returns them as one matrix without copying.
The decoding loop itself is ``rftlab.rollout.static_decode``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

#: ``config.model_type`` values whose decoder layers this loop reproduces.
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


def unsupported_reason(model: nn.Module) -> str | None:
    """Why ``model`` cannot use the static-cache loop, or None when it can.

    Args:
        model: the model about to decode.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    if hasattr(model, "get_base_model") or hasattr(model, "peft_config"):
        return "an adapter-wrapped model (the sampling copy merges it)"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r}"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "not a decoder with .model.layers and .model.rotary_emb"
    for p in model.parameters():
        if not p.is_floating_point():
            return "quantized weights"
        if type(p.data).__name__ == "DTensor":
            return "sharded weights"
    return None


def fuse(weights: list[Tensor]) -> Tensor:
    """Concatenate weights along dim 0, as a view when they already lie back to back in memory.

    Args:
        weights: 2-D (or 1-D bias) tensors with equal trailing shape.
    """
    view = adjacent_view(weights)
    return view if view is not None else torch.cat(weights, dim=0)


def adjacent_view(weights: list[Tensor]) -> Tensor | None:
    """The weights concatenated along dim 0 as a view of their storage, or None if they are not back to back.

    Args:
        weights: 2-D (or 1-D bias) tensors with equal trailing shape.
    """
    first = weights[0]
    offset = first.storage_offset()
    adjacent = all(w.is_contiguous() for w in weights)
    for w in weights:
        adjacent = adjacent and w.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        adjacent = adjacent and w.storage_offset() == offset
        offset += w.numel()
    if not adjacent:
        return None
    rows = sum(w.shape[0] for w in weights)
    return first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


def pack_fused_weights(model: nn.Module) -> None:
    """Store each layer's q/k/v and gate/up weights back to back, the module weights as views into them.

    ``fuse`` then finds them adjacent and returns a view: the fused matmul needs no extra memory
    and sees every later in-place update of the module weights (the sampling copy's refresh).

    Args:
        model: a plain Llama-family HF model that only samples (its parameters need no grad).
    """
    with torch.no_grad():
        for layer in model.model.layers:
            for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj")), (layer.mlp, ("gate_proj", "up_proj"))):
                linears = [getattr(parent, n) for n in names]
                for attr in ("weight", "bias"):
                    tensors = [getattr(lin, attr) for lin in linears]
                    if tensors[0] is None:
                        continue
                    packed = torch.cat([t.detach() for t in tensors], dim=0)
                    start = 0
                    for lin, t in zip(linears, tensors):
                        view = packed[start : start + t.shape[0]]
                        setattr(lin, attr, nn.Parameter(view, requires_grad=False))
                        start += t.shape[0]
