"""Tiny models shared by tests (not a test module)."""

from __future__ import annotations

import torch
from torch import nn

from rftlab.models import apply_lora
from rftlab.models.loading import tiny_llama


def lora_policy() -> nn.Module:
    """The tiny Llama with a LoRA adapter on q/v whose B matrices are non-zero (as after training)."""
    model = apply_lora(tiny_llama(100, seed=0), r=4, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    return model
