"""How the policy runs: the forward layout, the sampling copy, cached casts, oneDNN kernels, the reference.

``PolicyRuntime`` is the one object an algorithm asks to run its policy (and its reference). It
holds no trainable weights (the LightningModule registers the networks, so Lightning moves,
shards and checkpoints them); it holds what is derived from them and never saved: the
low-precision sampling copy, the cast and prepacked weight caches.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from rftlab.core.options import OptionGroup
from rftlab.models.build import module_device
from rftlab.models.cast_cache import FrozenCastCache
from rftlab.models.onednn import OneDNNLinears
from rftlab.models.policy import CompletionOutput, adapter_disabled, completion_forward
from rftlab.models.sampling_copy import SamplingCopy


@dataclass(frozen=True)
class ForwardOptions(OptionGroup):
    """The forward group: how the policy's forwards are laid out and run (same numbers, less time).

    Attributes:
        share_prompt: encode each prompt once per group in the training and scoring forwards (its
            key/value cache serves the G completions; same result, ~40% less work at 36-token prompts
            and 8 x 32-token completions).
        packing: with ``share_prompt``, lay out each group as one row of real tokens only (the
            prompt once, then its completions back to back, a 4D attention mask keeping them apart):
            no padding, and prompt sharing also under gradient checkpointing. "auto" packs when it is
            estimated cheaper (attention over a packed row grows with the square of its length),
            "always" whenever the model's attention takes the mask (SDPA or eager), "never" keeps
            the padded layout.
        packed_attention: the attention kernel of packed rows. "auto" (the default) runs explicit
            attention (transformers' "eager": two matmuls and a float32 softmax, as the sampler's
            decoding loop computes it) on a CPU when every layer's attention weights fit in 256 MiB
            (rows of up to ~350 tokens for a 135M model), and the model's own (SDPA) otherwise or on
            a GPU: torch's CPU flash-attention backward is the slower one for short rows (the
            backward of a bf16 LoRA step at 8 x 32 tokens, one thread: 245 against 340 ms). "sdpa"
            or "eager" always uses that kernel. The explicit form rounds the scores to bf16 under
            bf16 autocast, as the sampler does.
        sampling_dtype: "auto" (the default) samples from a bfloat16 copy when the run computes in
            bfloat16 (a "bf16-mixed" or "bf16-true" Trainer, or bf16 autocast around ``evaluate``)
            and the policy is neither quantized nor sharded, else from the policy itself; None
            always samples with the policy itself; "bfloat16" (or "float16") always from a copy of
            its weights in that dtype. The copy has the adapter merged and is refreshed after every
            update: half the memory traffic per generated token, and a Llama-family copy decodes
            through the static-cache loop (``rftlab.rollout.static_decode``), 3.5x the tokens/s
            of the LoRA policy under autocast here (~540 MB of tensors for the 135M model: the copy
            and its matrices prepacked for oneDNN). Held-out
            evaluation decodes with it too; training and log-probs stay in the policy's precision
            (``loss.correction`` can reweight for the difference). Not with a quantized policy.
        cache_weight_casts: under bf16/fp16 autocast, cast the frozen float32 linear weights (a LoRA
            run's base model) once and keep the copies instead of casting them at every call and
            decoded token. Bit-identical; 2 bytes per frozen weight. No effect in float32.
        onednn_kernels: on a CPU in float32, run the linear layers with oneDNN instead of torch's
            default BLAS; frozen weights are prepacked once (+4 bytes per frozen weight). Float32
            math in another summation order (within ~1e-5 relative); no effect under autocast or on
            a GPU; only sampling uses it under gradient checkpointing.
        logprob_batch_size: sequences per forward when scoring a rollout without grad (a memory bound).
    """

    group: ClassVar[str] = "forward"
    share_prompt: bool = True
    packing: Literal["auto", "always", "never"] = "auto"
    packed_attention: Literal["auto", "sdpa", "eager"] = "auto"
    sampling_dtype: Literal["auto", "bfloat16", "float16"] | None = "auto"
    cache_weight_casts: bool = True
    onednn_kernels: bool = True
    logprob_batch_size: int = 64

    def validate(self) -> None:
        self.require(self.logprob_batch_size >= 1, "logprob_batch_size", ">= 1")


class PolicyRuntime:
    """Runs a policy and its reference with the forward group's tricks.

    Args:
        options: the forward group.
        reference_placement: where a frozen reference copy lives ("device", "cpu" or "offload").
    """

    def __init__(self, options: ForwardOptions, reference_placement: str = "device") -> None:
        self.options = options
        self.reference_placement = reference_placement
        self._sampling_copy: SamplingCopy | None = None
        self._sampling_copy_step = -1
        self._cast_cache = FrozenCastCache()  # frozen linear weights cast to the autocast dtype
        self._onednn = OneDNNLinears()  # prepacked frozen weights

    # ---- contexts -------------------------------------------------------------------------
    def kernels(self, model: nn.Module | None, sampling: bool = False, prepack: bool = True) -> Any:
        """Run ``model``'s float32 linears with oneDNN on a CPU (``onednn_kernels``; see ``rftlab.models.onednn``).

        Args:
            model: the network about to run (None: nothing to do).
            sampling: the no-grad decoding loop.
            prepack: keep prepacked copies of frozen weights.
        """
        if model is None or not self.options.onednn_kernels:
            return nullcontext()
        return self._onednn.active(model, sampling=sampling, prepack=prepack)

    def weight_casts(self, policy: nn.Module | None) -> Any:
        """Serve frozen linear weights from the cast cache while autocast is on (``cache_weight_casts``)."""
        if policy is None or not self.options.cache_weight_casts:
            return nullcontext()
        return self._cast_cache.active(policy)

    @contextmanager
    def precision(self, policy: nn.Module | None, forward_context: Any = None) -> Iterator[None]:
        """The Trainer's forward context (autocast under ``*-mixed``), cached weight casts, oneDNN linears.

        Args:
            policy: the policy.
            forward_context: the precision plugin's ``forward_context()`` (None outside a Trainer).
        """
        with forward_context or nullcontext(), self.weight_casts(policy), self.kernels(policy):
            yield

    # ---- forwards -------------------------------------------------------------------------
    def forward(self, model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                completion_mask: Tensor, temperature: float, logits: bool = True, hidden: bool = False) -> CompletionOutput:
        """``completion_forward`` with this group's layout (``share_prompt``, ``packing``).

        Args:
            model: the policy (or a critic trunk).
            prompt_ids: (N, P) left-padded.
            prompt_mask: (N, P).
            completion_ids: (N, T) right-padded.
            completion_mask: (N, T).
            temperature: the sampling temperature (logits are divided by it).
            logits: return the (N, T, V) logits.
            hidden: return the (N, T + 1, H) last hidden states.
        """
        return completion_forward(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature,
                                  logits=logits, hidden=hidden, share_prompt=self.options.share_prompt,
                                  packing=self.options.packing, packed_attention=self.options.packed_attention)

    def logits(self, policy: nn.Module, reference: nn.Module | None, use_reference: bool, prompt_ids: Tensor,
               prompt_mask: Tensor, completion_ids: Tensor, completion_mask: Tensor, temperature: float) -> Tensor:
        """(N, T, V) temperature-scaled logits of the policy, or of the reference when ``use_reference``.

        The reference is the frozen copy when there is one, else the policy with its adapter switched off.

        Args:
            policy: the policy.
            reference: the frozen reference copy, or None.
            use_reference: compute the reference's logits.
            prompt_ids: (N, P) left-padded.
            prompt_mask: (N, P).
            completion_ids: (N, T) right-padded.
            completion_mask: (N, T).
            temperature: the sampling temperature.
        """
        batch = (prompt_ids, prompt_mask, completion_ids, completion_mask)
        if use_reference and reference is not None:
            return self._reference_logits(reference, module_device(policy), batch, temperature)
        with adapter_disabled(policy) if use_reference else nullcontext():
            return self.forward(policy, *batch, temperature).logits

    def _reference_logits(self, reference: nn.Module, device: torch.device, batch: tuple[Tensor, ...],
                          temperature: float) -> Tensor:
        placement = self.reference_placement
        if placement == "offload":
            reference.to(device)
        where = module_device(reference)
        try:
            # oneDNN on the copy's own weights: prepacking would keep a second copy of the model.
            with self.kernels(reference, prepack=False):
                logits = self.forward(reference, *(t.to(where) for t in batch), temperature).logits
        finally:
            if placement == "offload":
                reference.to("cpu")
        return logits.to(device)

    # ---- sampling -------------------------------------------------------------------------
    def sampling_model(self, policy: nn.Module, step: int | None, dtype: str | None) -> nn.Module:
        """The model that decodes: the policy, or its low-precision copy, up to date.

        Args:
            policy: the policy.
            step: the optimizer step count (weights change only at steps); None refreshes always.
            dtype: the copy's dtype ("bfloat16" or "float16"; ``sampling_dtype`` with "auto"
                resolved by the caller), or None to sample with the policy itself.
        """
        if dtype is None:
            return policy
        if self._sampling_copy is None:
            self._sampling_copy = SamplingCopy(policy, dtype)
        elif step is None or self._sampling_copy_step != step:
            self._sampling_copy.refresh(policy)
        self._sampling_copy_step = -1 if step is None else step
        return self._sampling_copy.model
