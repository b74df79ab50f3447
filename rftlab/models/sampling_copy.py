"""A low-precision copy of the policy that only samples (``sampling_dtype="bfloat16"``).

Decoding one token reads every weight of the model, so on a CPU sampling is bound by memory
traffic. Under fp32 weights, ``bf16-mixed`` autocast makes it worse: each matmul first casts its
fp32 weight to bf16, reading 4 bytes and writing 2 per weight at every new token. A bf16 copy
of the weights reads 2 bytes per weight instead. RL systems that sample with an inference engine
(vLLM in verl and OpenRLHF) sample from such a bf16 copy while training keeps full-precision
weights; this is the same split on one machine.

The copy is refreshed from the policy before each rollout: a LoRA adapter is merged into it
(W + scale * B @ A, computed from the fp32 weights, never written back), so the policy's own
weights are untouched. With one update per rollout the training loss still uses the training
forward's log-probs as the old ones; the copy's rounding only changes which tokens are drawn.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from rftlab.models.fused import pack_fused_weights, unsupported_reason
from rftlab.models.policy import is_adapter_model

#: dtypes the sampling copy may hold.
SAMPLING_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "get_delta_weight") and hasattr(module, "lora_A")


def _plain_model(policy: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The policy's structure as a plain HF model in ``dtype`` (the policy is not touched).

    Every floating-point weight is copied straight to ``dtype`` (through ``deepcopy``'s memo; a real
    copy even when it already is in ``dtype``, so the copy never shares storage with the policy), so
    building the copy never holds a second float32 model (540 MB for a 135M model, 6 GB at 1.5B);
    buffers are cast afterwards. An adapter is dropped, not merged: ``SamplingCopy`` writes every
    adapted weight from the policy's float32 merge right after.
    """
    memo: dict[int, object] = {}
    for param in policy.parameters():
        if param.is_floating_point():
            memo[id(param)] = nn.Parameter(param.detach().to(dtype, copy=True), requires_grad=False)
    model = copy.deepcopy(policy, memo)
    if is_adapter_model(model):
        model = model.unload()
    return model.to(dtype)


class SamplingCopy:
    """A copy of the policy's weights in ``dtype`` for decoding, refreshed with ``refresh``.

    Args:
        policy: the policy (a HF causal LM, PEFT-wrapped or not, not quantized).
        dtype: "bfloat16" or "float16".
    """

    def __init__(self, policy: nn.Module, dtype: str) -> None:
        if dtype not in SAMPLING_DTYPES:
            raise ValueError(f"sampling_dtype={dtype!r} is invalid: must be one of {', '.join(SAMPLING_DTYPES)} or None")
        self.dtype = SAMPLING_DTYPES[dtype]
        # Lightning validates under inference mode, and the first rollout may be a validation one:
        # tensors made there are inference tensors, which later refreshes could not write to.
        with torch.inference_mode(False), torch.no_grad():
            self.model = _plain_model(policy, self.dtype).eval()
        self.model.requires_grad_(False)
        self._copy_from(policy, adapted_too=True)
        if unsupported_reason(self.model) is None:
            # q/k/v and gate/up back to back: the static-cache loop fuses them without a copy, and
            # ``refresh`` writes through the module weights into the fused storage.
            with torch.inference_mode(False):
                pack_fused_weights(self.model)

    def refresh(self, policy: nn.Module) -> None:
        """Copy the policy's current weights (adapter merged) into the copy, rounding to its dtype.

        Only modules with trainable weights are copied: frozen ones cannot have changed since the
        copy was made (a LoRA run rewrites its adapted layers, a full fine-tune every layer).

        Args:
            policy: the policy the copy was made from.
        """
        self._copy_from(policy)

    def _copy_from(self, policy: nn.Module, adapted_too: bool = False) -> None:
        """``refresh``; ``adapted_too`` also writes adapted layers whose adapter is frozen (at creation)."""
        source = policy.get_base_model() if is_adapter_model(policy) else policy
        sources = dict(source.named_modules())
        with torch.inference_mode(False), torch.no_grad():
            for name, target in self.model.named_modules():
                own = dict(target.named_parameters(recurse=False))
                if not own:
                    continue
                src = sources.get(name)
                if src is None:
                    raise RuntimeError(f"sampling copy: the policy has no module {name!r} to copy from")
                if _is_lora_layer(src):
                    if not adapted_too and not any(p.requires_grad for p in src.parameters()):
                        continue
                    base = src.base_layer
                    merged = base.weight.detach().float()
                    for adapter in src.active_adapters:
                        if adapter in src.lora_A:
                            merged = merged + src.get_delta_weight(adapter).float()
                    own["weight"].copy_(merged)
                    if "bias" in own and base.bias is not None:
                        own["bias"].copy_(base.bias)
                    continue
                params = dict(src.named_parameters(recurse=False))
                if not any(p.requires_grad for p in params.values()):
                    continue  # frozen: still equal to what the copy holds
                for pname, value in own.items():
                    value.copy_(params[pname])
