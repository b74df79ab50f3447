"""Building the policy network from its options: base weights, quantization, checkpointing, LoRA.

``PolicySpec`` is the policy half of an algorithm's hyper-parameters. The same spec builds the
policy at training time (``RFTModule.configure_model``) and again when a checkpoint is exported,
generated from or used as the starting point of another run (``init_checkpoint``), so all of them
see the same network.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from rftlab.core.options import OptionGroup, as_group
from rftlab.models.hf import set_checkpointing
from rftlab.models.loading import load_causal_lm, quantize_in_memory
from rftlab.models.policy import apply_lora
from rftlab.models.precision import check_dtype_runs, dtype_from_name
from rftlab.models.quantization import check_quantization


#: Where the frozen reference copy of a fully fine-tuned policy lives (adapter runs need no copy):
#: "device" with the policy; "cpu" in CPU memory, its forward run there; "offload" in CPU memory,
#: moved to the policy's device for each forward and back after.
REFERENCE_PLACEMENTS = ("device", "cpu", "offload")

DTYPE_NAMES = Literal["float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class PolicySpec(OptionGroup):
    """The policy group: everything that determines the policy network.

    An algorithm's ``policy`` argument is a model name (shorthand for ``PolicySpec(model=name)``) or
    this group; its ``lora`` argument, when given, overrides ``lora`` here.

    Attributes:
        model: "default" (the bundled SmolLM2-135M-Instruct), "tiny" (a random 2-layer Llama with
            the real tokenizer, for tests), a local model folder, or a hub id (downloaded only
            because you named it).
        dtype: parameter dtype (use the Trainer's precision for autocast).
        quantization: "none", "nf4"/"fp4" (4-bit base weights, QLoRA) or "int8" (8-bit loading);
            needs ``lora`` and bitsandbytes.
        compute_dtype: dtype 4-bit layers compute in; None uses ``dtype``.
        lora: train a LoRA adapter instead of all weights; the reference policy is then the same
            model with the adapter disabled (no second copy).
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha (update scale alpha / r).
        lora_dropout: LoRA dropout, in [0, 1).
        lora_target_modules: "all-linear", module-name suffixes such as ["q_proj", "v_proj"], or a regex.
        gradient_checkpointing: recompute activations in backward (switched off while sampling).
        reference_placement: where the frozen reference copy of a fully fine-tuned policy (with a
            KL term) lives: "device" (with the policy), "cpu" (CPU memory, its forward runs there) or
            "offload" (CPU memory, moved to the device for each forward). Adapter runs have no copy.
        init_checkpoint: a Lightning checkpoint of any rftlab algorithm (e.g. ``SFT``) whose policy,
            adapter merged, is the starting policy (and the reference); ``model`` names its base.
        seed: seeds the random initialisation of the "tiny" model and of value heads.
    """

    group: ClassVar[str] = "policy"
    model: str = "default"
    dtype: DTYPE_NAMES = "float32"
    quantization: Literal["none", "nf4", "fp4", "int8"] = "none"
    compute_dtype: DTYPE_NAMES | None = None
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: str | list[str] = "all-linear"
    gradient_checkpointing: bool = False
    reference_placement: Literal["device", "cpu", "offload"] = "device"
    init_checkpoint: str | None = None
    seed: int = 0

    def validate(self) -> None:
        self.require(self.model != "", "model", "a non-empty model name or path")
        self.require(self.lora_r >= 1, "lora_r", ">= 1")
        self.require(self.lora_alpha > 0, "lora_alpha", "> 0")
        self.require(0.0 <= self.lora_dropout < 1.0, "lora_dropout", "in [0, 1)")
        self.require(not self.lora or bool(self.lora_target_modules), "lora_target_modules",
                     "'all-linear', a list of module names such as ['q_proj', 'v_proj'], or a regex")
        self.require(self.quantization == "none" or self.lora, "quantization",
                     "'none' unless lora=True (4-bit/8-bit base weights can only be trained through an adapter)")
        self.require(0 <= self.seed <= 2**32 - 1, "seed", "in [0, 2**32 - 1] (as Lightning's seed_everything)")

    @classmethod
    def resolve(cls, policy: "str | os.PathLike[str] | PolicySpec | Mapping[str, Any]", lora: bool | None = None, **overrides: Any) -> "PolicySpec":
        """The group an algorithm's ``policy`` and ``lora`` arguments describe.

        Args:
            policy: a model name or folder, a ``PolicySpec``, or a mapping of its fields.
            lora: overrides the group's ``lora`` when not None.
            **overrides: other fields to replace (e.g. ``model=`` a moved base model).
        """
        if lora is not None:
            overrides["lora"] = lora
        if isinstance(policy, (str, os.PathLike)):
            return cls(**{"model": os.fspath(policy), **overrides})
        if isinstance(policy, Mapping):  # the overrides join the fields before the group is checked
            return as_group({**policy, **overrides}, cls)
        spec = as_group(policy, cls)
        return dataclasses.replace(spec, **overrides) if overrides else spec

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any], **overrides: Any) -> "PolicySpec":
        """The group held in an algorithm's hyper-parameters (``policy`` and ``lora``).

        Args:
            hparams: ``module.hparams`` or a (migrated) checkpoint's ``hyper_parameters``.
            **overrides: fields to replace (e.g. ``model=`` a moved base model).
        """
        return cls.resolve(hparams.get("policy", "default"), hparams.get("lora"), **overrides)

    def check(self) -> None:
        """Checks that need the machine (bitsandbytes present, the init checkpoint on disk); no weights load."""
        check_quantization(self.quantization, self.lora)
        if self.init_checkpoint is not None and not Path(self.init_checkpoint).is_file():
            raise FileNotFoundError(f"policy.init_checkpoint={self.init_checkpoint!r} is not a file "
                                    "(a .ckpt written by any rftlab algorithm, e.g. rftlab.SFT)")


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
        return load_causal_lm(spec.model, dtype, vocab_size=vocab_size, seed=spec.seed,
                              quantization=spec.quantization, compute_dtype=compute, device=device)
    from rftlab.models.export import load_checkpoint_policy  # export builds policies with this module

    model = load_checkpoint_policy(spec.init_checkpoint, base=spec.model, merge=True, dtype=spec.dtype).model
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
