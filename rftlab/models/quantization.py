"""Quantized base weights with bitsandbytes: 4-bit NF4/FP4 (QLoRA) and 8-bit (LLM.int8()) loading.

QLoRA (Dettmers et al. 2023, arXiv 2305.14314) freezes the base weights in 4 bits and trains a LoRA
adapter on top; LLM.int8() (Dettmers et al. 2022, arXiv 2208.07339) is the 8-bit variant. Either way
only the adapter trains, so a quantized policy always needs ``lora=True``.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

#: "none" (plain weights), "nf4"/"fp4" (4-bit, QLoRA), "int8" (8-bit LLM.int8()).
QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
_INSTALL_HINT = "pip install 'bitsandbytes>=0.45'"


def require_bitsandbytes(purpose: str) -> Any:
    """Import bitsandbytes, or raise an ImportError saying which option needs it and how to install it.

    Args:
        purpose: what needs it, e.g. "quantization='nf4'" (named in the error).
    """
    try:
        return importlib.import_module("bitsandbytes")
    except Exception as err:  # a broken CUDA setup raises more than ImportError
        raise ImportError(f"{purpose} needs bitsandbytes, which cannot be imported ({type(err).__name__}: {err}); "
                          f"install it with `{_INSTALL_HINT}`, or use quantization='none'") from err


def check_quantization(quantization: str, lora: bool) -> None:
    """Validate a quantization choice at construction: a known name, an adapter, bitsandbytes present.

    Args:
        quantization: one of ``QUANTIZATIONS``.
        lora: whether a LoRA adapter is trained (quantized weights cannot be trained themselves).
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r} is invalid: must be one of {', '.join(QUANTIZATIONS)}")
    if quantization == "none":
        return
    if not lora:
        raise ValueError(f"quantization={quantization!r} needs lora=True: quantized base weights are frozen, "
                         "only an adapter on top of them can train (QLoRA); use quantization='none' for full fine-tuning")
    require_bitsandbytes(f"quantization={quantization!r}")


def bitsandbytes_config(quantization: str, compute_dtype: torch.dtype) -> Any:
    """The ``transformers.BitsAndBytesConfig`` of ``quantization`` ("nf4", "fp4" or "int8").

    Args:
        quantization: "nf4", "fp4" or "int8".
        compute_dtype: dtype 4-bit layers dequantize to for their matmuls.
    """
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization in ("nf4", "fp4"):
        # Double quantization (QLoRA sec. 3) saves ~0.4 bit per parameter at no measurable cost.
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization,
                                  bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_use_double_quant=True)
    raise ValueError(f"quantization={quantization!r} is invalid: must be one of {', '.join(QUANTIZATIONS[1:])}")


def linear4bit_layers(model: nn.Module) -> list[nn.Module]:
    """The ``bitsandbytes.nn.Linear4bit`` layers of ``model`` (empty when bitsandbytes is absent)."""
    try:
        import bitsandbytes as bnb
    except Exception:
        return []
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def keep_cpu_4bit_trainable(model: nn.Module) -> int:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference, which silently kills training.

    On CPUs with AVX512-BF16, bitsandbytes (0.48-0.50, ``Linear4bit.forward``) repacks a layer's
    weight into a CPU inference layout the first time it runs in eval mode on an input without
    grad, i.e. during sampling. From then on its matmul runs ``bitsandbytes::gemv_4bit``, an op with
    no autograd kernel: the backward pass yields zero gradients through every repacked layer, so the
    LoRA adapters stop learning while losses look normal (the only sign is a UserWarning about
    ``gemv_4bit`` autograd). Clearing ``support_avx512bf16_for_cpu`` on every ``Linear4bit`` keeps
    the trainable layout. Idempotent; call it after loading.

    Args:
        model: a model whose 4-bit layers (if any) are patched in place.

    Returns:
        The number of ``Linear4bit`` layers patched.
    """
    layers = linear4bit_layers(model)
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def release_checkpoint_map(model: nn.Module) -> int:
    """Copy the unquantized weights of a freshly quantized model out of the checkpoint's memory map.

    transformers loads safetensors through a memory map, and the layers that stay unquantized
    (embeddings, norms) are views of it. Quantizing read every page of the file, so while one view
    lives the whole file stays resident in this process (about 500 MB for SmolLM2-135M: more than
    the 4-bit weights save). Copying those few tensors (about 110 MB) lets the map go.

    Args:
        model: a model loaded with a bitsandbytes quantization config; changed in place.

    Returns:
        The number of tensors copied.
    """
    seen: set[int] = set()  # a tied weight is one Parameter reached from two modules: copy it once
    with torch.no_grad():
        for module in model.modules():
            for tensor in [*module._parameters.values(), *module._buffers.values()]:
                if tensor is not None and tensor.dtype.is_floating_point and id(tensor) not in seen:
                    seen.add(id(tensor))
                    # Assigning .data keeps the Parameter object, so tied weights stay tied.
                    tensor.data = tensor.data.clone()
    return len(seen)


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` holds bitsandbytes 4-bit or 8-bit layers."""
    try:
        import bitsandbytes as bnb
    except Exception:
        return False
    return any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules())


def dequantized(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` with every bitsandbytes layer replaced by a plain ``nn.Linear`` in ``dtype``, in place.

    The weights are the dequantized ones the quantized model computed with, so an adapter trained on
    top of them can be merged exactly (up to the rounding of ``dtype``).

    Args:
        model: a HF model loaded with a bitsandbytes quantization config (not PEFT-wrapped).
        dtype: dtype of the dequantized weights.
    """
    if not is_quantized(model):
        return model
    model = model.dequantize(dtype=dtype) if _accepts_dtype(model.dequantize) else model.dequantize()
    return model.to(dtype)


def _accepts_dtype(fn: Any) -> bool:
    import inspect

    return "dtype" in inspect.signature(fn).parameters
