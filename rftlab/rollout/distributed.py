"""The few collectives the RL pipeline needs across processes; each is a no-op in one process.

Under DDP every process samples, scores and trains on its own rollout (its own prompt groups, so
group advantages never mix ranks), and the gradients are averaged by DDP. What must still be agreed
is anything that decides whether a collective runs: skipping a non-finite step, giving up on a
short dynamic-sampling batch, the set of metric keys that are logged. A rank that decides alone
leaves the others waiting in the next all-reduce forever.
"""

from __future__ import annotations

import math
from typing import Any

import torch

# Metrics that are counts or running totals: summed over processes; every other one is averaged,
# weighted by the number of sequences each process logged it for.
SUMMED_SUFFIXES = ("_total", "/errors", "/timeouts")


def is_distributed() -> bool:
    """Whether a process group with more than one process is running."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every process, in rank order (``[obj]`` in a single process).

    Args:
        obj: any picklable object; every process must call this at the same point.
    """
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def any_rank(flag: bool) -> bool:
    """True on every process when ``flag`` is True on at least one.

    Args:
        flag: this process's decision; every process must call this at the same point.
    """
    return any(gather_objects(bool(flag)))


def max_over_ranks(value: int) -> int:
    """The largest ``value`` over all processes (``value`` in a single process).

    Args:
        value: this process's count; every process must call this at the same point.
    """
    return max(gather_objects(int(value)))


def reduce_metrics(metrics: dict[str, float], weight: float) -> dict[str, float]:
    """Step metrics combined over processes: totals summed, the rest a weighted mean.

    Processes may log different keys (a reward that only failed on one of them); each key is
    reduced over the processes that have it, so no process waits for a key another never logs.

    Args:
        metrics: this process's metric name -> value.
        weight: this process's weight in the means (its number of sequences).
    """
    if not is_distributed():
        return dict(metrics)
    everyone = gather_objects((metrics, float(weight)))
    out: dict[str, float] = {}
    for key in sorted({k for m, _ in everyone for k in m}):
        pairs = [(m[key], w) for m, w in everyone if key in m]
        if key.endswith(SUMMED_SUFFIXES) or "/count/" in key:  # counts add up over processes
            out[key] = float(sum(v for v, _ in pairs))
            continue
        finite = [(v, w) for v, w in pairs if not math.isnan(v)]
        total = sum(w for _, w in finite)
        out[key] = float(sum(v * w for v, w in finite) / total) if finite and total > 0 else math.nan
    return out
