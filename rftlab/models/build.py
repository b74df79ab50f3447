"""Building the policy network from its options: base weights, quantization, checkpointing, LoRA.

``PolicySpec`` is the policy half of an algorithm's hyper-parameters. The same spec builds the
policy at training time (``RFTModule.configure_model``) and again when a checkpoint is exported,
generated from or used as the starting point of another run (``init_checkpoint``), so all of them
see the same network.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rftlab.models.hf import set_checkpointing
from rftlab.models.loading import load_causal_lm, quantize_in_memory
from rftlab.models.policy import apply_lora
from rftlab.models.precision import check_dtype_runs, dtype_from_name
from rftlab.models.quantization import check_quantization


@dataclass(frozen=True)
class PolicySpec:
    """Everything that determines the policy network (see ``RFTModule`` for each option's meaning).

    Attributes:
        policy: "default", "tiny", a model folder or a hub id: the base model.
        dtype: parameter dtype name ("float32", "bfloat16", "float16").
        quantization: "none", "nf4", "fp4" or "int8" (bitsandbytes; needs ``lora``).
        compute_dtype: dtype name 4-bit layers compute in; None uses ``dtype``.
        lora: wrap the base in a LoRA adapter.
        lora_r: adapter rank.
        lora_alpha: adapter scale numerator.
        lora_dropout: adapter input dropout.
        lora_target_modules: "all-linear", module-name suffixes, or a regex.
        gradient_checkpointing: recompute activations in backward.
        seed: seeds the "tiny" policy's random weights.
        init_checkpoint: a Lightning checkpoint of any rftlab algorithm whose policy (adapter merged)
            replaces the base weights; ``policy`` must be the base model it was trained from.
    """

    policy: str = "default"
    dtype: str = "float32"
    quantization: str = "none"
    compute_dtype: str | None = None
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: Any = "all-linear"
    gradient_checkpointing: bool = False
    seed: int = 0
    init_checkpoint: str | None = None

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any], **overrides: Any) -> "PolicySpec":
        """The spec held in an algorithm's hyper-parameters (missing keys take the defaults).

        Args:
            hparams: ``module.hparams`` or a checkpoint's ``hyper_parameters``.
            **overrides: fields to replace (e.g. ``policy=`` a moved base model).
        """
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in dict(hparams).items() if k in names}
        return cls(**{**values, **overrides})

    def check(self) -> None:
        """Raise a clear error for options that cannot work (called at construction, no weights loaded)."""
        dtype_from_name(self.dtype, "dtype")
        if self.compute_dtype is not None:
            dtype_from_name(self.compute_dtype, "compute_dtype")
        check_quantization(self.quantization, self.lora)
        if self.lora and not self.lora_target_modules:
            raise ValueError(f"lora_target_modules={self.lora_target_modules!r} is empty: must be 'all-linear', "
                             "a list of module names such as ['q_proj', 'v_proj'], or a regex")
        if self.init_checkpoint is not None and not Path(self.init_checkpoint).is_file():
            raise FileNotFoundError(f"init_checkpoint={self.init_checkpoint!r} is not a file "
                                    "(a .ckpt written by any rftlab algorithm, e.g. rftlab.SFT)")

    def replace(self, **changes: Any) -> "PolicySpec":
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)


def load_base_model(spec: PolicySpec, vocab_size: int | None, device: torch.device | str | None = None) -> nn.Module:
    """The base network of ``spec``: weights (``init_checkpoint``'s when set), dtype, quantization.

    Args:
        spec: the policy options.
        vocab_size: the tokenizer's vocabulary size (for the "tiny" policy).
        device: the device training will run on: dtypes are checked against it and quantized
            weights placed on it (None: CPU, unchecked).
    """
    dtype = dtype_from_name(spec.dtype, "dtype")
    compute = dtype_from_name(spec.compute_dtype, "compute_dtype") if spec.compute_dtype else None
    if device is not None:
        check_dtype_runs(spec.dtype, device, "dtype")
        if spec.compute_dtype and spec.quantization != "none":
            check_dtype_runs(spec.compute_dtype, device, "compute_dtype")
    if spec.init_checkpoint is None:
        return load_causal_lm(spec.policy, dtype, vocab_size=vocab_size, seed=spec.seed,
                              quantization=spec.quantization, compute_dtype=compute, device=device)
    from rftlab.models.export import load_checkpoint_policy  # export builds policies with this module

    model = load_checkpoint_policy(spec.init_checkpoint, base=spec.policy, merge=True, dtype=spec.dtype).model
    if spec.quantization == "none":
        return model
    return quantize_in_memory(model, spec.quantization, dtype, compute, device)


def build_policy(spec: PolicySpec, vocab_size: int | None, device: torch.device | str | None = None) -> nn.Module:
    """The trainable policy of ``spec``: the base model, gradient checkpointing, then LoRA.

    Args:
        spec: the policy options.
        vocab_size: the tokenizer's vocabulary size (for the "tiny" policy).
        device: the device training will run on (see ``load_base_model``).
    """
    model = load_base_model(spec, vocab_size, device)
    if spec.gradient_checkpointing:
        set_checkpointing(model, True)
    if spec.lora:
        model = apply_lora(model, spec.lora_r, spec.lora_alpha, spec.lora_dropout, spec.lora_target_modules)
    # from_pretrained returns eval mode and Lightning (>= 2.2) keeps each submodule's mode, so without
    # this a loaded policy would train in eval mode (no dropout; 4-bit layers taking inference paths).
    return model.train()


#: Where the frozen reference copy of a fully fine-tuned policy lives (adapter runs need no copy):
#: "device" with the policy; "cpu" in CPU memory, its forward run there; "offload" in CPU memory,
#: moved to the policy's device for each forward and back after.
REFERENCE_PLACEMENTS = ("device", "cpu", "offload")


def check_reference_placement(placement: str) -> None:
    """Raise a ValueError naming ``placement`` and the valid ones when it is unknown.

    Args:
        placement: one of ``REFERENCE_PLACEMENTS``.
    """
    if placement not in REFERENCE_PLACEMENTS:
        raise ValueError(f"reference_placement={placement!r} is invalid: must be one of {', '.join(REFERENCE_PLACEMENTS)}")


def frozen_reference(model: nn.Module, placement: str) -> nn.Module:
    """A frozen eval-mode copy of ``model`` (the start policy) placed as ``placement`` says.

    Args:
        model: the policy before any update (not PEFT-wrapped: adapter runs switch the adapter off instead).
        placement: "device" (stays where ``model`` is), "cpu" or "offload" (both start in CPU memory).
    """
    import copy

    check_reference_placement(placement)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    return reference if placement == "device" else reference.to("cpu")


def module_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (CPU for a model without parameters)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")
