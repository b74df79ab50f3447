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
