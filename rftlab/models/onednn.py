"""oneDNN kernels for float32 linear layers on a CPU (``onednn_kernels``).

torch's default CPU BLAS for float32 is slow at the shapes of RL fine-tuning here: on this
machine's AMD EPYC, 8 rows (a decoding step) times SmolLM2's 49152 x 576 output matrix take 13 ms,
oneDNN's linear 7 ms on the same weight and 3.5 ms on a copy prepacked in its blocked layout; 544
rows (a training forward) 286 ms vs 135 ms prepacked. So inside ``OneDNNLinears.active`` (sampling,
the scoring forwards and the training step) every float32 ``nn.Linear`` on the CPU runs
``torch.ops.mkldnn._linear_pointwise`` instead of ``F.linear``:

- a frozen weight (a LoRA run's base model) from a prepacked copy made once; with grad, its
  backward computes only the input gradient, with oneDNN too (``_FrozenLinear``);
- a trained weight as it is (it changes every step); with grad, the forward and all three
  gradients run oneDNN (``_TrainedLinear``).

Scoring and training run the same kernels, so old log-probs still equal the training forward's at
the first update. It is float32 arithmetic in another summation order, as with any other BLAS:
the error against float64 is 1.0e-6 relative vs torch's 5e-7 (bf16 would be 3.6e-3); on the real
model, full fine-tuning's parameter gradients err against float64 by at most 1.2e-5 relative
(torch's kernels: 7.8e-6), median 2.9e-6 (1.4e-6); on the tiny test model logits and gradients
agree with torch's kernels to ~1e-5 (tested). Off under autocast (its matmuls already
run in bf16), for non-float32 inputs, and outside sampling under gradient checkpointing (the
backward's recompute would run outside the context).

Measured (SmolLM2-135M-Instruct fp32, 2 threads, one process, alternated): decoding 8 rows, 66 ms
per token with torch's kernels, 44 ms with oneDNN on plain weights, 34 ms prepacked; forward and
backward of 8 x 68 tokens: LoRA r16 q/k/v/o (frozen base) 1.29 + 1.46 s -> 0.59 + 1.04 s, full
fine-tuning 1.06 + 2.04 s -> 0.64 + 1.37 s.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rftlab.models.cast_cache import DerivedWeights, float32_linear_weight


def onednn_linear_available() -> bool:
    """Whether this torch build has oneDNN's CPU linear kernels."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise")
            and hasattr(ops, "_reorder_linear_weight"))


def _float32_cpu_linear(module: nn.Module) -> bool:
    """A plain float32 ``nn.Linear`` on the CPU."""
    weight = float32_linear_weight(module)
    return weight is not None and weight.device.type == "cpu"


def _frozen(module: nn.Linear) -> bool:
    return not module.weight.requires_grad and (module.bias is None or not module.bias.requires_grad)


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight.T + bias`` with oneDNN; ``weight`` plain (out, in) or prepacked. No autograd.

    Args:
        x: (..., in) float32 input.
        weight: the (out, in) weight (a transposed view works too) or its ``_reorder_linear_weight`` packing.
        bias: (out,) or None.
    """
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [None], "")


class _FrozenLinear(torch.autograd.Function):
    """A linear layer whose weight and bias get no gradient: oneDNN forward, oneDNN input gradient."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(weight)
        return onednn_linear(x, packed, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        (weight,) = ctx.saved_tensors
        # d(x W^T + b)/dx applied to grad is grad @ W: a linear layer whose weight is W^T.
        return onednn_linear(grad.contiguous(), weight.t(), None), None, None, None


class _TrainedLinear(torch.autograd.Function):
    """A linear layer with oneDNN for the forward and all three gradients (input, weight, bias)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = onednn_linear(grad, weight.t(), None) if ctx.needs_input_grad[0] else None
        rows_grad, rows_x = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        # dL/dW = grad^T @ x, written as a linear layer: input grad^T (out, rows), weight x^T (in, rows).
        grad_w = onednn_linear(rows_grad.t(), rows_x.t(), None) if ctx.needs_input_grad[1] else None
        grad_b = rows_grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def _forward(module: nn.Linear, kernel_weight: Tensor, x: Tensor) -> Tensor:
    if torch.is_autocast_enabled("cpu") or x.dtype != torch.float32:
        return F.linear(x, module.weight, module.bias)
    if not torch.is_grad_enabled():
        return onednn_linear(x, kernel_weight, module.bias)
    if not _frozen(module):
        return _TrainedLinear.apply(x, module.weight, module.bias)
    if x.requires_grad:
        return _FrozenLinear.apply(x, module.weight, kernel_weight, module.bias)
    return onednn_linear(x, kernel_weight, module.bias)  # nothing here or upstream needs a gradient


class OneDNNLinears:
    """Routes a model's float32 CPU linear layers through oneDNN inside ``active``; keeps frozen weights prepacked."""

    def __init__(self) -> None:
        self._packed = DerivedWeights(lambda weight, _: torch.ops.mkldnn._reorder_linear_weight(weight))

    @contextmanager
    def active(self, model: nn.Module, sampling: bool = False, prepack: bool = True) -> Iterator[None]:
        """Route ``model``'s float32 CPU linear layers through oneDNN until exit.

        A no-op under autocast, where oneDNN is missing, and (unless ``sampling``) under gradient
        checkpointing. Nested uses never re-route a layer.

        Args:
            model: the model about to run.
            sampling: the no-grad decoding loop (sampling switches gradient checkpointing off).
            prepack: keep prepacked copies of frozen weights (faster; memory of one more copy).
        """
        from rftlab.models.hf import is_checkpointing

        if torch.is_autocast_enabled("cpu") or not onednn_linear_available():
            yield
            return
        if not sampling and is_checkpointing(model):
            # The backward's recompute would run outside this context, on torch's kernels; the
            # scoring forwards stay on them too, so old log-probs match the training forward's.
            yield
            return
        routed = []
        try:
            for module in model.modules():
                if not _float32_cpu_linear(module) or "forward" in module.__dict__:
                    continue
                kernel_weight = self._packed.get(module) if prepack and _frozen(module) else module.weight
                module.forward = functools.partial(_forward, module, kernel_weight)
                routed.append(module)
            yield
        finally:
            for module in routed:
                del module.forward

    def __len__(self) -> int:
        return len(self._packed)
