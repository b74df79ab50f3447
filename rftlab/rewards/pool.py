"""Slow and async rewards: per-sample calls on threads, processes or an event loop, each with a timeout.

A reward function is normally called once per batch in the trainer's thread. When it has a timeout
(``WithTimeout``, or ``RewardSet(timeout=...)``) or is ``async``, ``RewardSet`` calls it once per
sample through ``call_per_sample`` instead, so one slow sample cannot hold up the others: a call
that overruns its timeout gets the configured value and is counted in ``reward/<fn>/timeouts``.

Threads cannot be killed: a timed-out thread call keeps running in the background (it is a daemon
thread and its result is dropped). Use ``executor="process"`` for CPU-bound rewards that can hang:
after a timeout its worker processes are killed and replaced. Process rewards must be picklable.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import multiprocessing
import pickle
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

from rftlab.rewards.checks import MAX_SECONDS, check_finite

EXECUTORS = ("thread", "process")


class Timeout:
    """Marker result of a call that overran its timeout."""

    def __repr__(self) -> str:
        return "Timeout"


TIMEOUT = Timeout()


def is_async(fn: Callable[..., Any]) -> bool:
    """Whether calling ``fn`` returns a coroutine (an ``async def`` function or ``__call__``)."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


class WithTimeout:
    """Run a (slow) reward function per sample with a timeout; RewardSet counts the timeouts.

    Args:
        fn: the reward function, sync or ``async``.
        timeout: seconds per sample call, in (0, ``checks.MAX_SECONDS``], or ``math.inf`` for no
            limit (per-sample concurrent calls without a timeout, as ``RewardSet`` runs ``async``
            functions).
        timeout_value: the score of a timed-out sample (finite).
        executor: "thread" (default; the call keeps running after a timeout) or "process" (the
            worker is killed; ``fn`` must be picklable). Ignored for ``async`` functions.
        max_workers: concurrent calls, an integer >= 1 (default: one per sample for threads, CPU
            count for processes).
        name: metric name (default: the wrapped function's).
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        timeout: float,
        timeout_value: float = 0.0,
        executor: str = "thread",
        max_workers: int | None = None,
        name: str | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        owner = type(self).__name__
        check_finite(owner, "timeout", timeout, gt=0, le=MAX_SECONDS, allow_inf=True)
        check_finite(owner, "timeout_value", timeout_value)
        if executor not in EXECUTORS:
            raise ValueError(f"executor={executor!r}; valid: {', '.join(EXECUTORS)}")
        check_finite(owner, "max_workers", max_workers, integer=True, ge=1, allow_none=True)
        self.fn = fn
        self.timeout = float(timeout)
        self.timeout_value = float(timeout_value)
        self.executor = executor
        self.max_workers = max_workers
        if name is not None:
            self.name = name
        else:
            from rftlab.rewards.base import reward_name

            self.name = reward_name(fn)

    @property
    def limit(self) -> float | None:
        """The timeout as ``call_per_sample`` takes it: None for no limit (thread joins reject inf)."""
        return None if self.timeout == math.inf else self.timeout

    def __call__(self, completions: Sequence[str], **columns: Any) -> list[Any]:
        """Direct use outside RewardSet: per-sample calls, timeouts replaced by ``timeout_value``."""
        results = call_per_sample(self.fn, list(completions), columns, self.limit, self.executor, self.max_workers)
        out = []
        for r in results:
            if isinstance(r, BaseException):
                raise r
            out.append(self.timeout_value if r is TIMEOUT else r[0])
        return out


def _one(fn: Callable[..., Any], completion: str, columns: dict[str, Any]) -> Any:
    return fn([completion], **columns)


def own_counters(fn: Any) -> dict[str, int]:
    """The integer counters ``fn`` keeps itself: the attributes named in its ``counters``, and
    ``timeouts`` when it counts its own (``MathAnswer``).

    Args:
        fn: a reward function (not a ``WithTimeout``).
    """
    out = {}
    for name in [*(getattr(fn, "counters", ()) or ()), "timeouts"]:
        value = getattr(fn, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            out[name] = value
    return out


def _counting_call(fn: Callable[..., Any], completions: list[str], columns: dict[str, Any]) -> tuple[Any, dict[str, int]]:
    """Run in a worker process: ``fn``'s result and what its own counters rose by, which the
    worker's copy of ``fn`` would otherwise keep to itself."""
    before = own_counters(fn)
    result = fn(completions, **columns)
    return result, {k: v - before.get(k, 0) for k, v in own_counters(fn).items() if v != before.get(k, 0)}


def call_per_sample(
    fn: Callable[..., Any],
    completions: list[str],
    columns: dict[str, list],
    timeout: float | None,
    executor: str = "thread",
    max_workers: int | None = None,
    worker_counts: dict[str, int] | None = None,
) -> list[Any]:
    """Call ``fn([completion_i], **column_i)`` for every sample.

    Returns per sample: the raw return value (a 1-element list, unchecked), the exception it
    raised, or ``TIMEOUT``.

    Args:
        fn: the reward function.
        completions: one per sample.
        columns: task column -> one value per sample.
        timeout: seconds per call, or None.
        executor: "thread" or "process".
        max_workers: concurrent calls (None: the executor's default).
        worker_counts: filled with what ``fn``'s own counters (``own_counters``) rose by in worker
            processes, which this process's ``fn`` does not see (calls that timed out are lost).
    """
    per_sample = [{k: [v[i]] for k, v in columns.items()} for i in range(len(completions))]
    if is_async(fn):
        return _run_async(fn, completions, per_sample, timeout)
    if executor == "process":
        return _run_processes(fn, completions, per_sample, timeout, max_workers, worker_counts)
    return _run_threads(fn, completions, per_sample, timeout, max_workers)


def _run_threads(fn, completions, per_sample, timeout, max_workers) -> list[Any]:
    # One daemon thread per call, each timed from its own start: a hung call never blocks a queue
    # (ThreadPoolExecutor workers cannot be reclaimed), and never blocks interpreter exit.
    results: list[Any] = [TIMEOUT] * len(completions)
    gate = threading.BoundedSemaphore(max_workers or len(completions) or 1)

    def target(i: int) -> None:
        try:
            results[i] = _one(fn, completions[i], per_sample[i])
        except BaseException as err:  # noqa: BLE001 - reported per sample by the caller
            results[i] = err
        finally:
            gate.release()

    threads: list[tuple[threading.Thread, float] | None] = []
    for i in range(len(completions)):
        # With max_workers a call waits for a free slot; hung calls keep theirs, so a call that
        # cannot start within its own timeout counts as timed out instead of waiting forever.
        if not gate.acquire(timeout=-1 if timeout is None else timeout):
            threads.append(None)
            continue
        thread = threading.Thread(target=target, args=(i,), daemon=True, name=f"reward-{i}")
        thread.start()
        threads.append((thread, time.monotonic()))
    for entry in threads:
        if entry is not None:
            entry[0].join(None if timeout is None else max(0.0, entry[1] + timeout - time.monotonic()))
    return [TIMEOUT if entry is None or entry[0].is_alive() else r for r, entry in zip(results, threads)]


_PROCESS_POOLS: dict[int, ProcessPoolExecutor] = {}
_POOL_LOCK = threading.Lock()
_WARMED: set[tuple[int, int]] = set()


def _process_pool(max_workers: int) -> ProcessPoolExecutor:
    with _POOL_LOCK:
        pool = _PROCESS_POOLS.get(max_workers)
        if pool is None:
            # "spawn": forking a trainer with torch threads and CUDA state is unsafe.
            pool = ProcessPoolExecutor(max_workers, mp_context=multiprocessing.get_context("spawn"))
            _PROCESS_POOLS[max_workers] = pool
        return pool


def _kill_pool(max_workers: int) -> None:
    with _POOL_LOCK:
        pool = _PROCESS_POOLS.pop(max_workers, None)
    if pool is None:
        return
    # ProcessPoolExecutor cannot cancel a running call; killing its workers is the only way to stop
    # a hung reward (``_processes`` is private but stable since Python 3.2).
    for process in list(getattr(pool, "_processes", {}).values()):
        process.kill()
    pool.shutdown(wait=False, cancel_futures=True)


def _run_processes(fn, completions, per_sample, timeout, max_workers, worker_counts=None) -> list[Any]:
    import os

    workers = max_workers or os.cpu_count() or 1
    pool = _process_pool(workers)
    key = (id(pool), id(fn))
    # A plain function is submitted itself (not a wrapper from this module): a worker then imports
    # only ``fn``'s module, not rftlab and torch. One that keeps counters goes through
    # ``_counting_call``, so that what it counted in the worker comes back.
    counting = bool(own_counters(fn))
    if key not in _WARMED:
        # Starting a spawned worker and unpickling ``fn`` (which imports its module) takes
        # seconds; that must not count against the first calls' timeouts. Each worker unpickles
        # ``fn`` (and ``_counting_call``) once here, with no timeout.
        payload = pickle.dumps((_counting_call, fn) if counting else fn)
        wait([pool.submit(pickle.loads, payload) for _ in range(workers)])
        _WARMED.add(key)
    start = time.monotonic()
    if counting:
        futures: list[Future] = [pool.submit(_counting_call, fn, [c], cols) for c, cols in zip(completions, per_sample)]
    else:
        futures = [pool.submit(fn, [c], **cols) for c, cols in zip(completions, per_sample)]
    # Call i starts at the latest when the calls ahead of it in its worker's queue have used their
    # whole timeout, so its deadline is its queue slot's end.
    deadlines = [None if timeout is None else start + timeout * (1 + i // workers) for i in range(len(futures))]
    pending = set(futures)
    while pending:
        now = time.monotonic()
        overdue = {f for f, d in zip(futures, deadlines) if f in pending and d is not None and d <= now}
        pending -= overdue
        if not pending:
            break
        live = [d for f, d in zip(futures, deadlines) if f in pending and d is not None]
        done, _ = wait(pending, timeout=(min(live) - now) if live else None, return_when=FIRST_COMPLETED)
        pending -= done
    results: list[Any] = []
    for future in futures:
        if not future.done():
            results.append(TIMEOUT)
        elif future.exception() is not None:
            results.append(future.exception())
        elif counting:
            value, rose = future.result()
            results.append(value)
            for key, delta in rose.items():
                if worker_counts is not None:
                    worker_counts[key] = worker_counts.get(key, 0) + delta
        else:
            results.append(future.result())
    if any(r is TIMEOUT for r in results):
        _kill_pool(workers)
    return results


def _run_async(fn, completions, per_sample, timeout) -> list[Any]:
    async def one(i: int) -> Any:
        try:
            coro = fn([completions[i]], **per_sample[i])
            return await (coro if timeout is None else asyncio.wait_for(coro, timeout))
        except asyncio.TimeoutError:
            return TIMEOUT
        except Exception as err:  # noqa: BLE001
            return err

    async def gather() -> list[Any]:
        return await asyncio.gather(*(one(i) for i in range(len(completions))))

    # A fresh loop in a helper thread: the caller may already run an event loop (a notebook).
    box: list[Any] = []
    thread = threading.Thread(target=lambda: box.append(asyncio.run(gather())), daemon=True)
    thread.start()
    thread.join()
    return box[0]
