"""Parameter dtypes by name, and whether a device can run one (checked before any weights load)."""

from __future__ import annotations

import functools
import warnings

import torch

#: The parameter/compute dtypes a policy can be loaded in, by the name used in configs.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_from_name(name: str, parameter: str = "dtype") -> torch.dtype:
    """The torch dtype called ``name``; a ValueError naming ``parameter`` and the valid names otherwise.

    Args:
        name: "float32", "bfloat16" or "float16".
        parameter: the option being checked, for the error message.
    """
    if name not in DTYPES:
        raise ValueError(f"{parameter}={name!r} is invalid: must be one of {', '.join(DTYPES)}")
    return DTYPES[name]


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); otherwise bf16 is emulated (slow)."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(probe()) if probe is not None else False


def _probe(dtype: torch.dtype, device: torch.device) -> None:
    # The operations a causal LM forward/backward needs: matmul, softmax, an embedding gather.
    # Fixed inputs, not torch.randn: a probe drawing from the global generator would make the first
    # model built in a process start from other random numbers (LoRA init) than the next, same seed.
    x = torch.linspace(-1, 1, 32, device=device).reshape(4, 8).to(dtype).requires_grad_(True)
    weight = torch.linspace(1, -1, 64, device=device).reshape(8, 8).to(dtype)
    y = torch.log_softmax(x @ weight, dim=-1)
    y = y + torch.nn.functional.embedding(torch.tensor([0, 1, 2, 3], device=device), weight)
    y.float().sum().backward()


@functools.lru_cache(maxsize=None)
def _runs(dtype: torch.dtype, device_type: str, device_index: int | None) -> str | None:
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
        # Pre-Ampere GPUs only emulate bf16 (very slowly) or fail in some kernels.
        return "this GPU has no native bfloat16 (needs compute capability >= 8.0)"
    try:
        _probe(dtype, device)
    except Exception as err:  # any failure means "cannot train in it here" (incl. a device torch lacks)
        return f"{type(err).__name__}: {err}"
    return None


def check_dtype_runs(name: str, device: torch.device | str, parameter: str = "dtype") -> None:
    """Raise a ValueError when ``device`` cannot train in the dtype called ``name``.

    Runs a tiny matmul/softmax/embedding forward and backward in that dtype on the device (cached),
    plus the capability query for bf16 on CUDA. bf16 on a CPU without native support runs, but
    emulated: that only warns.

    Args:
        name: "float32", "bfloat16" or "float16".
        device: the device the policy will run on.
        parameter: the option being checked, for the error message.
    """
    dtype = dtype_from_name(name, parameter)
    device = torch.device(device)
    problem = _runs(dtype, device.type, device.index)
    if problem is not None:
        working = [n for n, d in DTYPES.items() if d != dtype and _runs(d, device.type, device.index) is None]
        advice = f"use one of {', '.join(working)}" if working else "no dtype runs there: check the device"
        raise ValueError(f"{parameter}={name!r} cannot run on device {device}: {problem}; {advice}")
    if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_native_bf16():
        warnings.warn(f"{parameter}='bfloat16' on a CPU without AVX512-BF16/AMX is emulated and slow; "
                      "float32 is usually faster here", stacklevel=2)
