"""Torch threads that follow the cores other processes leave free.

With one other CPU-bound process on a 2-core machine, two torch threads ran a training step many
times slower than one thread did: OpenMP threads wait for each other at the end of every parallel
region by spinning, and when one of them has lost its core to the other process, its partner spins
through that time instead of working. One thread per free core avoids the wait altogether, so a
shared machine costs the share of the cores it lost, not a multiple of the step time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

#: Set to "0" to keep torch's thread count as the fit found it.
ENV_SWITCH = "RFTLAB_ADAPTIVE_THREADS"

#: Columns of a /proc/stat cpu line that are time spent running something (user, nice, system,
#: irq, softirq, steal); idle and iowait are not. Guest time is already inside user time.
_BUSY_COLUMNS = (0, 1, 2, 5, 6, 7)


def busy_ticks(stat_text: str, cpus: Collection[int] | None = None) -> int:
    """Clock ticks the given CPUs spent running anything, from the text of ``/proc/stat``.

    Args:
        stat_text: the contents of ``/proc/stat``.
        cpus: CPU numbers to count (None: all of them, from the summary line).
    """
    total = 0
    for line in stat_text.splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu"):
            continue
        index = name[3:]
        if cpus is None:
            wanted = index == ""  # the summary line adds up every CPU
        else:
            wanted = index != "" and int(index) in cpus
        if not wanted:
            continue
        values = [int(v) for v in rest.split()]
        total += sum(values[i] for i in _BUSY_COLUMNS if i < len(values))
    return total


def own_ticks(self_stat_text: str) -> int:
    """Clock ticks this process ran, its threads and reaped children included, from ``/proc/self/stat``.

    Args:
        self_stat_text: the contents of ``/proc/self/stat``.
    """
    # The command name (field 2) is in parentheses and may hold spaces: count fields after it.
    fields = self_stat_text.rpartition(")")[2].split()
    return sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime (fields 14-17)


def others_busy_cores(busy_delta: float, own_delta: float, seconds: float, ticks_per_second: float) -> float:
    """Cores that other processes kept busy on average over a window.

    Args:
        busy_delta: busy ticks of the CPUs we may run on, over the window.
        own_delta: ticks this process ran over the window.
        seconds: the window's wall time.
        ticks_per_second: clock ticks per second (``os.sysconf("SC_CLK_TCK")``).
    """
    if seconds <= 0:
        return 0.0
    return max(0.0, (busy_delta - own_delta) / ticks_per_second / seconds)


def choose_threads(cores: int, others_busy: float, min_threads: int, max_threads: int) -> int:
    """One thread per core the other processes leave free, rounded to the nearest, within bounds.

    Args:
        cores: CPUs this process may run on.
        others_busy: cores other processes kept busy on average (``others_busy_cores``).
        min_threads: never fewer threads.
        max_threads: never more threads.
    """
    free = cores - others_busy
    return max(min_threads, min(max_threads, int(free + 0.5)))


class CpuWindow:
    """Reads how busy the machine and this process were between two calls (Linux only)."""

    def __init__(self, proc: Path = Path("/proc")) -> None:
        self.proc = proc
        self.cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        self.ticks_per_second = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0
        self._last: tuple[float, int, int] | None = None

    @property
    def available(self) -> bool:
        """Whether the counters can be read here (a Linux ``/proc``)."""
        return (self.proc / "stat").is_file() and (self.proc / "self" / "stat").is_file()

    def read(self) -> tuple[float, int, int]:
        return (time.monotonic(), busy_ticks((self.proc / "stat").read_text(), self.cpus),
                own_ticks((self.proc / "self" / "stat").read_text()))

    def start(self) -> None:
        """Open a window now."""
        self._last = self.read()

    def elapsed(self) -> float | None:
        """Seconds since the window opened (None: no window is open)."""
        return None if self._last is None else time.monotonic() - self._last[0]

    def close(self, min_seconds: float) -> float | None:
        """Cores other processes kept busy since the window opened, and open the next one; None if
        no window is open or it is shorter than ``min_seconds`` (it then stays open)."""
        if self._last is None:
            self.start()
            return None
        now = self.read()
        seconds = now[0] - self._last[0]
        if seconds < min_seconds:
            return None
        busy = others_busy_cores(now[1] - self._last[1], now[2] - self._last[2], seconds, self.ticks_per_second)
        self._last = now
        return busy


class AdaptiveThreads(L.Callback):
    """Sets torch's thread count to the cores that other processes leave free, at every step.

    A default callback of every rftlab algorithm (``rftlab.core.plugins.DEFAULT_CALLBACKS``). It
    never goes above the thread count the fit started with (torch's default of one per core, or
    what ``torch.set_num_threads`` or ``OMP_NUM_THREADS`` set), and restores that count when the fit
    ends. Decisions are made from ``/proc`` counters (Linux; elsewhere the callback does nothing):
    over the last window, the CPU time of the cores this process may use minus its own. The first
    window runs from the fit's setup (loading the model) to the first step, waited out to
    ``min_window`` if it is shorter, so the first step already runs with the right count. Logs
    ``cpu/threads`` and ``cpu/others_busy`` (cores kept busy by other processes).

    Off when the environment sets ``RFTLAB_ADAPTIVE_THREADS=0``: the thread count then stays as the
    fit found it. A fixed count also makes float results independent of the machine's load (a sum
    split over another number of threads rounds differently), which bit-for-bit reruns need. Bounds
    instead of an off switch: ``AdaptiveThreads(min_threads=n, max_threads=n)`` in the Trainer's
    callbacks.

    Args:
        min_threads: never fewer threads than this.
        max_threads: never more (None: the thread count when the fit starts).
        min_window: seconds a measurement window must last before it decides (clock ticks are 10 ms).
    """

    def __init__(self, min_threads: int = 1, max_threads: int | None = None, min_window: float = 0.5) -> None:
        if not isinstance(min_threads, int) or min_threads < 1:
            raise ValueError(f"min_threads must be an int >= 1, got {min_threads!r}")
        if max_threads is not None and (not isinstance(max_threads, int) or max_threads < min_threads):
            raise ValueError(f"max_threads must be None or an int >= min_threads ({min_threads}), got {max_threads!r}")
        if min_window <= 0:
            raise ValueError(f"min_window must be > 0 seconds, got {min_window!r}")
        self.min_threads, self.max_threads, self.min_window = min_threads, max_threads, min_window
        self.window = CpuWindow()
        self.others_busy: float | None = None
        self._initial: int | None = None  # the count the fit started with, restored at its end
        self._active = False
        self._ceiling = 1  # set when the fit starts

    def _decide(self) -> None:
        try:
            busy = self.window.close(self.min_window)
        except (OSError, ValueError, IndexError) as err:
            # A counter that cannot be read must not stop a run: keep the count from here on.
            rank_zero_warn(f"AdaptiveThreads: CPU counters unreadable ({err}); keeping {torch.get_num_threads()} threads")
            self._active = False
            return
        if busy is None:
            return
        self.others_busy = busy
        cores = len(self.window.cpus) if self.window.cpus else (os.cpu_count() or 1)
        threads = choose_threads(cores, busy, self.min_threads, self._ceiling)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or os.environ.get(ENV_SWITCH, "1").strip() == "0" or not self.window.available:
            return
        # Set by the strategy already: a DDP process on a CPU starts with its share of the cores.
        self._initial = torch.get_num_threads()
        self._ceiling = max(self.min_threads, self.max_threads or self._initial)
        self._active = True
        self.window.start()  # loading the model and the sanity checks are the first window

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active:
            return
        # The first step must already run with the right count: beside a busy process, a step with
        # one thread too many costs several steps. A window too short to tell is waited out.
        waited = self.window.elapsed()
        if waited is not None and waited < self.min_window:
            time.sleep(self.min_window - waited)
        self._decide()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._active:
            return
        self._decide()
        pl_module.log("cpu/threads", float(torch.get_num_threads()), on_step=True, batch_size=1)
        if self.others_busy is not None:
            pl_module.log("cpu/others_busy", self.others_busy, on_step=True, batch_size=1)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._active and not trainer.sanity_checking:
            self._decide()

    def _restore(self) -> None:
        if self._initial is not None and torch.get_num_threads() != self._initial:
            torch.set_num_threads(self._initial)
        self._initial, self._active = None, False

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()
