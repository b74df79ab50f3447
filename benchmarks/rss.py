"""Resident-memory measurement shared by the benchmark scripts (memory.py, scaling.py).

The scripts run as ``python benchmarks/<name>.py``, so this directory is on ``sys.path``;
tests/benchmark_scripts.py adds it for the tests that import them by file path.
"""

from __future__ import annotations

import os
import threading
import time


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssPeak(threading.Thread):
    """Samples this process's RSS every ``interval`` seconds; ``peak`` is the max since ``reset``.

    Args:
        interval: seconds between samples.
    """

    def __init__(self, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak, self._halt = interval, 0, threading.Event()

    def reset(self) -> None:
        self.peak = current_rss_bytes()

    def run(self) -> None:
        while not self._halt.is_set():
            self.peak = max(self.peak, current_rss_bytes())
            time.sleep(self.interval)

    def stop(self) -> None:
        self._halt.set()
