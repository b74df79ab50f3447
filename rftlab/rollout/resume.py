"""What a checkpoint needs beyond Lightning's defaults for a resumed run to equal an uninterrupted one.

Lightning saves weights, optimizers, schedulers, loop counters and the DataModule's ``state_dict``,
but not the random number generators, and the DataModule's pending minibatches are tensors of a
rollout sampled by a policy that no longer exists after the resume, so they are saved rather than
rebuilt. Everything here is plain tensors, numbers, strings, lists and dicts, which
``torch.load(weights_only=True)`` (the torch >= 2.6 default) accepts.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import torch

from rftlab.rollout.rollout import Rollout


def capture_rng_state() -> dict[str, Any]:
    """The state of torch's (CPU and CUDA), Python's and NumPy's global generators.

    Dropout (including LoRA dropout) draws from torch's global generator while training, so a
    resumed run without it would drop other units than the uninterrupted one.
    """
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
    except ImportError:  # numpy is optional for rftlab itself
        pass
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the global generators to a state returned by ``capture_rng_state``.

    Args:
        state: the captured state; missing entries (e.g. CUDA on a CPU resume) are skipped.
    """
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def rollout_to_state(rollout: Rollout) -> dict[str, Any]:
    """A Rollout as a dict of its fields (tensors moved to the CPU).

    Args:
        rollout: any rollout (typically a pending minibatch).
    """
    return {f.name: _cpu(getattr(rollout, f.name)) for f in dataclasses.fields(rollout)}


def rollout_from_state(state: dict[str, Any]) -> Rollout:
    """The Rollout saved by ``rollout_to_state``.

    Args:
        state: field name -> value; unknown names (from a newer rftlab) raise a clear error.
    """
    state = _from_untyped_layout(dict(state))
    known = {f.name for f in dataclasses.fields(Rollout)}
    unknown = sorted(set(state) - known)
    if unknown:
        raise ValueError(f"checkpoint holds a pending rollout with unknown fields {unknown}; was it saved by another rftlab version?")
    return Rollout(**state)


def _from_untyped_layout(state: dict[str, Any]) -> dict[str, Any]:
    """A pending rollout saved when annotations travelled in ``extras``/``seq_extras`` dicts, in typed fields."""
    extras = state.pop("extras", None) or {}
    seq_extras = state.pop("seq_extras", None) or {}
    if "metrics" in extras:
        state["metrics"] = dict(extras["metrics"])
    if "first_of_rollout" in extras:
        state["first_of_rollout"] = bool(extras["first_of_rollout"])
    if "max_new_tokens" in extras:
        state["max_new_tokens"] = int(extras["max_new_tokens"])
    for key in ("starts", "mask", "rewards", "targets", "old_values"):
        if key in seq_extras:
            state[f"segment_{key}"] = seq_extras[key]
    return state


def _cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    return value
