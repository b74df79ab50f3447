"""The reward interface: plain Python callables in, floats out; several combine with weights.

A reward function is called as ``fn(completions, prompts=..., **columns)``: ``completions`` is a list
of N strings and every task column (``answer``, ``tests``, ...) arrives as a keyword holding a list
of N values, as in TRL. It returns N floats, or ``None`` for samples it does not apply to.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from rftlab.rewards.checks import MAX_SECONDS, check_finite
from rftlab.rewards.pool import EXECUTORS, TIMEOUT, WithTimeout, call_per_sample, is_async, own_counters

RewardFn = Callable[..., Sequence[float | None]]
ON_ERROR = ("raise", "zero")


class RewardError(RuntimeError):
    """A reward function raised or returned something that is not N numbers."""


def reward_name(fn: RewardFn) -> str:
    """A stable name for a reward function: its ``name`` attribute, ``__name__``, or class name."""
    name = getattr(fn, "name", None) or getattr(fn, "__name__", None)
    if isinstance(name, str) and name and name != "<lambda>":
        return name
    return "reward" if hasattr(fn, "__name__") else type(fn).__name__


def _excerpt(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _check_scores(name: str, scores: Any, n: int, strict: bool = True, first: int = 0) -> tuple[list[float], int]:
    """Validate one function's output: N numbers or None, finite.

    Returns (floats with NaN for None, number of junk entries). Junk raises ``RewardError`` when
    ``strict``; otherwise each junk entry scores 0 and is counted (never a silent zero).

    Args:
        name: the reward's name, for the error.
        scores: what the function returned.
        n: how many scores it must return.
        strict: raise on junk instead of scoring it 0.
        first: the batch index of ``scores[0]`` (a per-sample call), so the error names the right sample.
    """
    if isinstance(scores, Tensor):
        scores = scores.tolist()
    problem = None
    if not isinstance(scores, Sequence) or isinstance(scores, (str, bytes)):
        problem = f"reward {name!r} must return a list of {n} floats, got {type(scores).__name__}"
    elif len(scores) != n:
        problem = f"reward {name!r} returned {len(scores)} scores for {n} completions"
    if problem is not None:
        if strict:
            raise RewardError(problem)
        return [0.0] * n, n
    out, junk = [], 0
    for i, value in enumerate(scores):
        if value is None:
            out.append(math.nan)  # "does not apply": excluded from the weighted sum
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            problem = f"reward {name!r} returned {value!r} for sample {first + i}: not a number or None"
        elif not math.isfinite(float(value)):
            problem = f"reward {name!r} returned {value!r} for sample {first + i}: not finite"
        else:
            out.append(float(value))
            continue
        if strict:
            raise RewardError(problem)
        out.append(0.0)
        junk += 1
    return out, junk


@dataclass
class RewardResult:
    """Scores of N completions.

    Attributes:
        total: (N,) weighted sum over functions; None scores contribute 0.
        per_fn: (N, F) each function's scores, NaN where it returned None.
        names: the F function names.
        errors: per function, how many samples were scored 0 because the function failed.
        seconds: per function, wall time spent scoring.
        timeouts: per function, how many samples overran their timeout and got the timeout value
            (logged as ``reward/<fn>/timeouts``).
        counts: per function, what its own counters (``fn.counters``) rose by during this call, when
            non-zero (logged as ``reward/<fn>/count/<counter>``: forged sandbox reports, completions
            missing a field a grader reads, unusable judge replies).
    """

    total: Tensor
    per_fn: Tensor
    names: list[str]
    errors: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    timeouts: dict[str, int] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)


class RewardSet:
    """Several reward functions with weights and an error policy.

    Args:
        functions: a mapping name -> function, or a list of functions (named by ``reward_name``).
        weights: one finite weight per function (default 1.0 each).
        on_error: "raise" stops training with an error naming the reward and the sample; "zero"
            scores the failing samples 0 and counts them in ``reward/<fn>/errors``.
        timeout: seconds per sample for every function, in (0, ``checks.MAX_SECONDS``], or None for
            no timeout. With a timeout, and for ``async`` functions, a function is called once per
            sample, concurrently (see ``rftlab.rewards.pool``); a function wrapped in
            ``WithTimeout`` keeps its own settings.
        timeout_value: the score of a sample whose call timed out (finite; counted in ``timeouts``).
        executor: "thread" or "process", for the per-sample calls of ``timeout``.

    A reward function's own scores that are NaN or infinite are junk, like a non-number: with
    on_error="raise" an error names the reward and the sample; with "zero" the sample scores 0 and
    is counted in ``errors``.
    """

    def __init__(
        self,
        functions: Mapping[str, RewardFn] | Sequence[RewardFn],
        weights: Sequence[float] | None = None,
        on_error: str = "raise",
        timeout: float | None = None,
        timeout_value: float = 0.0,
        executor: str = "thread",
    ) -> None:
        owner = type(self).__name__
        check_finite(owner, "timeout", timeout, gt=0, le=MAX_SECONDS, allow_none=True)
        check_finite(owner, "timeout_value", timeout_value)
        if executor not in EXECUTORS:
            raise ValueError(f"reward executor={executor!r}; valid: {', '.join(EXECUTORS)}")
        if isinstance(functions, Mapping):
            items = list(functions.items())
        else:
            items = [(reward_name(fn), fn) for fn in functions]
        if not items:
            raise ValueError("rewards: at least one reward function is required")
        names = [name for name, _ in items]
        if len(set(names)) != len(names):
            raise ValueError(f"rewards: names must be unique, got {names}; pass a dict name -> function")
        for name, fn in items:
            if not callable(fn):
                raise TypeError(f"rewards: {name!r} is not callable ({type(fn).__name__})")
        if weights is None:
            weights = [1.0] * len(items)
        if len(weights) != len(items):
            raise ValueError(f"reward_weights: got {len(weights)} weights for {len(items)} reward functions {names}")
        for i, weight in enumerate(weights):
            check_finite(owner, f"weights[{i}]", weight)  # a NaN weight would drop its reward from nansum
        if on_error not in ON_ERROR:
            raise ValueError(f"reward on_error={on_error!r}; valid: {', '.join(ON_ERROR)}")
        self.names = names
        self.functions = [fn for _, fn in items]
        self.weights = [float(w) for w in weights]
        self.on_error = on_error
        self.timeout = timeout
        self.timeout_value = float(timeout_value)
        self.executor = executor

    def __len__(self) -> int:
        return len(self.functions)

    def score(self, completions: list[str], prompts: list[str], rows: list[dict[str, Any]]) -> RewardResult:
        """Score N completions; ``rows[i]`` holds the task columns of sample i."""
        n = len(completions)
        columns = _columns(rows, n)
        per_fn = torch.full((n, len(self.functions)), math.nan)
        errors: dict[str, int] = {}
        seconds: dict[str, float] = {}
        timeouts: dict[str, int] = {}
        counts: dict[str, dict[str, int]] = {}
        for j, (name, fn) in enumerate(zip(self.names, self.functions)):
            start = time.perf_counter()
            policy = self._timeout_policy(fn)
            own_before = _own_timeouts(fn)
            counters_before = reward_counters(fn)
            in_workers: dict[str, int] = {}  # what fn's copies in worker processes counted
            if policy is None:
                scores, n_errors = self._call(name, fn, completions, prompts, columns)
            else:
                scores, n_errors, timeouts[name] = self._call_per_sample(name, policy, completions, prompts,
                                                                         columns, in_workers)
            if own_before is not None or "timeouts" in in_workers:
                # A function that times itself out (MathAnswer off the main thread) counts in its own
                # `timeouts`; add what this call counted, here and in worker processes.
                here = _own_timeouts(fn) - own_before if own_before is not None else 0
                timeouts[name] = timeouts.get(name, 0) + here + in_workers.pop("timeouts", 0)
            rose = {k: v - counters_before.get(k, 0) + in_workers.pop(k, 0) for k, v in reward_counters(fn).items()}
            if any(d > 0 for d in rose.values()):
                counts[name] = {k: d for k, d in rose.items() if d > 0}
            seconds[name] = time.perf_counter() - start
            per_fn[:, j] = torch.tensor(scores, dtype=torch.float32)
            errors[name] = n_errors
        weights = torch.tensor(self.weights, dtype=torch.float32)
        total = torch.nansum(per_fn * weights, dim=1)
        return RewardResult(total=total, per_fn=per_fn, names=list(self.names), errors=errors, seconds=seconds,
                            timeouts=timeouts, counts=counts)

    def _timeout_policy(self, fn: RewardFn) -> WithTimeout | None:
        """How to call ``fn``: None for one plain batch call, else per sample with these settings."""
        if isinstance(fn, WithTimeout):
            return fn
        if self.timeout is not None:
            return WithTimeout(fn, self.timeout, self.timeout_value, self.executor)
        if is_async(fn):
            return WithTimeout(fn, float("inf"), self.timeout_value, name="async")
        return None

    def _call_per_sample(
        self, name: str, policy: WithTimeout, completions: list[str], prompts: list[str], columns: dict[str, list],
        worker_counts: dict[str, int] | None = None,
    ) -> tuple[list[float], int, int]:
        raws = call_per_sample(policy.fn, completions, {"prompts": prompts, **columns}, policy.limit,
                               policy.executor, policy.max_workers, worker_counts)
        scores: list[float] = []
        n_errors = n_timeouts = 0
        for i, raw in enumerate(raws):
            if raw is TIMEOUT:
                scores.append(policy.timeout_value)
                n_timeouts += 1
            elif isinstance(raw, BaseException):
                if self.on_error == "raise":
                    raise RewardError(
                        f"reward {name!r} failed on sample {i} (completion {_excerpt(completions[i])}): "
                        f"{type(raw).__name__}: {raw}"
                    ) from raw
                scores.append(0.0)
                n_errors += 1
            else:
                values, junk = _check_scores(name, raw, 1, strict=self.on_error == "raise", first=i)
                scores.extend(values)
                n_errors += junk
        return scores, n_errors, n_timeouts

    def _call(
        self, name: str, fn: RewardFn, completions: list[str], prompts: list[str], columns: dict[str, list]
    ) -> tuple[list[float], int]:
        strict = self.on_error == "raise"
        try:
            raw = fn(completions, prompts=prompts, **columns)
        except Exception:  # noqa: BLE001 - isolated below to name the sample
            return self._call_one_by_one(name, fn, completions, prompts, columns)
        return _check_scores(name, raw, len(completions), strict)

    def _call_one_by_one(
        self, name: str, fn: RewardFn, completions: list[str], prompts: list[str], columns: dict[str, list]
    ) -> tuple[list[float], int]:
        # The batch call raised: score sample by sample to find the culprit. The error must name
        # it, and with on_error="zero" the other samples keep their real scores.
        scores: list[float] = []
        n_errors = 0
        for i, completion in enumerate(completions):
            one = {key: [values[i]] for key, values in columns.items()}
            try:
                raw = fn([completion], prompts=[prompts[i]], **one)
            except Exception as err:  # noqa: BLE001
                if self.on_error == "raise":
                    raise RewardError(
                        f"reward {name!r} failed on sample {i} (completion {_excerpt(completion)}): "
                        f"{type(err).__name__}: {err}"
                    ) from err
                scores.append(0.0)
                n_errors += 1
                continue
            values, junk = _check_scores(name, raw, 1, strict=self.on_error == "raise", first=i)
            scores.extend(values)
            n_errors += junk
        return scores, n_errors


def reward_counters(fn: Any) -> dict[str, int]:
    """The counters a reward function keeps itself: the integer attributes named in its ``counters``
    (``CodeExecution``: ``malformed_reports``; graders: ``missing_fields``, ``unparsed``).

    Calls in a process pool count in the workers' copies: ``RewardSet`` adds what they counted to
    ``RewardResult.counts``, but these attributes of ``fn`` do not include it.

    Args:
        fn: the reward function (``WithTimeout`` is unwrapped).
    """
    inner = fn.fn if isinstance(fn, WithTimeout) else fn
    return {k: v for k, v in own_counters(inner).items() if k != "timeouts"}


def _own_timeouts(fn: Any) -> int | None:
    """The ``timeouts`` counter a reward function keeps itself (unwrapping ``WithTimeout``), or None."""
    inner = fn.fn if isinstance(fn, WithTimeout) else fn
    count = getattr(inner, "timeouts", None)
    return count if isinstance(count, int) and not isinstance(count, bool) else None


def _columns(rows: list[dict[str, Any]], n: int) -> dict[str, list]:
    """Turn N row dicts into column lists, as reward functions receive them."""
    if len(rows) != n:
        raise ValueError(f"got {len(rows)} rows for {n} completions")
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    keys = [k for k in keys if k not in ("prompt", "prompts", "completions")]
    return {key: [row.get(key) for row in rows] for key in keys}
