"""Slow reward functions for the timeout tests, in a module that imports neither rftlab nor torch,
so that spawned worker processes start in well under a second."""

from __future__ import annotations

import asyncio
import time


def sleepy(completions, **_):
    """Sleeps as many tenths of a second as the completion says; scores its length."""
    time.sleep(float(completions[0]) / 10)
    return [float(len(completions[0]))]


async def async_sleepy(completions, **_):
    await asyncio.sleep(float(completions[0]) / 10)
    return [float(len(completions[0]))]


class CountsOdd:
    """Scores 1; counts completions of odd length in its own counter, as CodeExecution counts
    forged reports."""

    counters = ("odd",)

    def __init__(self):
        self.odd = 0

    def __call__(self, completions, **_):
        self.odd += sum(len(c) % 2 for c in completions)
        return [1.0] * len(completions)
