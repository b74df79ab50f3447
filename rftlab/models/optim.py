"""Optimizers by name: torch's AdamW and bitsandbytes' 8-bit and paged AdamW.

8-bit AdamW (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization", arXiv 2110.02861)
stores both moments in 8 bits with block-wise scales: about 2 bytes per parameter of optimizer state
instead of 8. bitsandbytes keeps 32-bit state for tensors under 4096 elements (its
``min_8bit_size``), so small tensors such as LoRA factors of tiny models train in 32 bits. It runs
on CPU tensors too (bitsandbytes >= 0.48 has CPU kernels). Paged variants move optimizer state
between GPU and CPU memory with CUDA unified memory, so they need a CUDA GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from rftlab.core.registry import Registry
from rftlab.models.quantization import require_bitsandbytes

#: name -> factory(param_groups, lr, weight_decay) -> torch.optim.Optimizer. Register your own the same way.
OPTIMIZERS: Registry[Callable[..., torch.optim.Optimizer]] = Registry("optimizer")
#: Names whose state lives in CUDA unified memory.
PAGED = ("paged_adamw", "paged_adamw8bit", "paged_adamw32bit")


@OPTIMIZERS.register("adamw")
def _adamw(params: Iterable[Any], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _bnb(class_name: str, optimizer_name: str) -> Callable[..., torch.optim.Optimizer]:
    def make(params: Iterable[Any], lr: float, weight_decay: float) -> torch.optim.Optimizer:
        bnb = require_bitsandbytes(f"optimizer={optimizer_name!r}")
        return getattr(bnb.optim, class_name)(params, lr=lr, weight_decay=weight_decay)

    return make


for _name, _class in (("adamw8bit", "AdamW8bit"), ("paged_adamw", "PagedAdamW"),
                      ("paged_adamw8bit", "PagedAdamW8bit"), ("paged_adamw32bit", "PagedAdamW32bit")):
    OPTIMIZERS.register(_name, _bnb(_class, _name))


def check_optimizer(name: str, parameter: str = "optimizer") -> None:
    """Validate an optimizer name at construction: registered, bitsandbytes importable, a GPU for paged ones.

    Args:
        name: a name registered in ``OPTIMIZERS``.
        parameter: the option that holds it, for error messages.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"{parameter}={name!r} is invalid: must be one of {', '.join(OPTIMIZERS)}")
    if name in ("adamw8bit", *PAGED):
        require_bitsandbytes(f"{parameter}={name!r}")
    if name in PAGED and not torch.cuda.is_available():
        raise ValueError(f"{parameter}={name!r} pages optimizer state between GPU and CPU memory and needs a CUDA "
                         "GPU, and none is visible; use optimizer='adamw8bit' (8-bit state, runs on CPU) or 'adamw'")


def build_optimizer(name: str, param_groups: Iterable[Any], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer called ``name`` over ``param_groups``.

    Args:
        name: a name registered in ``OPTIMIZERS`` ("adamw", "adamw8bit", "paged_adamw", ...).
        param_groups: parameters or parameter-group dicts (groups may set their own lr).
        lr: default learning rate.
        weight_decay: decoupled weight decay.
    """
    check_optimizer(name)
    return OPTIMIZERS.get(name)(param_groups, lr=lr, weight_decay=weight_decay)


def optimizer_with_warmup(name: str, param_groups: Iterable[Any], lr: float, weight_decay: float,
                          warmup_steps: int) -> dict[str, Any]:
    """``configure_optimizers``'s answer: the optimizer and a per-step linear warm-up (then constant).

    Args:
        name: a name registered in ``OPTIMIZERS``.
        param_groups: parameters or parameter-group dicts.
        lr: default learning rate.
        weight_decay: decoupled weight decay.
        warmup_steps: steps of linear warm-up from lr / (warmup_steps + 1); 0 disables it.
    """
    optimizer = build_optimizer(name, param_groups, lr=lr, weight_decay=weight_decay)
    ramp = (lambda step: min(1.0, (step + 1) / (warmup_steps + 1))) if warmup_steps else (lambda step: 1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, ramp)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
