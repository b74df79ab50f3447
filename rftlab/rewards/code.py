"""Code-execution reward: run the completion's code against unit tests in the sandbox."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rftlab.rewards.checks import check_finite
from rftlab.rewards.sandbox import Sandbox, SandboxResult, check_limits

# The first fenced block tagged python/py/python3; an unterminated block (a completion cut off by
# the token budget) runs to the end of the text.
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def extract_code(text: str) -> str:
    """The completion's first ```python fenced block if it has one, else the whole text.

    >>> extract_code("Here:\\n```python\\nx = 1\\n```\\nDone.")
    'x = 1\\n'
    >>> extract_code("x = 2")
    'x = 2'
    """
    match = _FENCE.search(text)
    return match.group(1) if match else text


def _as_tests(value: Any, index: int) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and all(isinstance(t, str) for t in value):
        return list(value)
    raise ValueError(f"tests[{index}] must be a list of Python assert statements, got {type(value).__name__}")


class CodeExecution:
    """The fraction of a sample's tests that pass when run against its code, in the sandbox.

    Formula: ``r_i = (1/|T_i|) sum_{t in T_i} 1[t passes after running code_i]``, where ``code_i`` is
    ``extract_code(completion_i)`` and ``T_i = tests[i]`` (assert statements). A run killed for
    time, output or CPU scores ``violation_value``; code that raises (``SystemExit`` included)
    before the tests run passes none of them.

    The tests (Python statements of any form: ``assert f(2) == 4``, a HumanEval ``check(f)``...)
    run in the sandbox's judge process, not beside the code: the code's names are handles there,
    arguments and results cross as plain data, and comparisons run on the judge's own values. A
    value that is not plain data (an instance of the code's class) stays a handle: its methods,
    attributes, items, ``len`` and iteration work, but it never equals plain data, and it is always
    true. A function cannot be passed as an argument (that test fails).

    With ``guard=True`` (anti-reward-hacking, after the Triton RFT case study) every function and
    class the code defines is replaced by a stub returning None and the tests run again; a test that
    still passes does not depend on the submitted code and earns nothing:
    ``r_i = (1/|T_i|) sum_t 1[t passes] * 1[t fails with the stubs]``.

    Args:
        timeout: wall seconds per sample (sandbox), in (0, ``checks.MAX_SECONDS``].
        memory_mb: address-space limit per process, MiB (finite, >= 64).
        max_processes: processes/threads per run (finite, >= 1).
        max_output_bytes: output cap per run (finite, >= 1); more is a violation.
        guard: score only tests that fail without the submitted code.
        violation_value: the score of a run killed for timeout, output or CPU (finite).
        tests_key: the task column holding each sample's tests.
        workers: concurrent sandboxes, an integer >= 1 (default: 2 x CPU cores; runs mostly wait on
            processes).
        python: sandbox interpreter (default: ``find_interpreter``).
        isolate: use namespaces and the seccomp filter where the OS allows.
        drop_privileges: run as a fresh unprivileged uid when the trainer is root.

    >>> reward = CodeExecution()  # doctest: +SKIP
    >>> reward(["```python\\ndef f(x):\\n    return 2 * x\\n```"], tests=[["assert f(2) == 4", "assert f(0) == 1"]])  # doctest: +SKIP
    [0.5]
    """

    name = "code_execution"

    #: Counters ``RewardSet`` logs as ``reward/<fn>/count/<name>`` when they rise.
    counters = ("malformed_reports",)

    def __init__(
        self,
        timeout: float = 5.0,
        memory_mb: int = 512,
        max_processes: int = 16,
        max_output_bytes: int = 64 * 1024,
        guard: bool = False,
        violation_value: float = 0.0,
        tests_key: str = "tests",
        workers: int | None = None,
        python: str | None = None,
        isolate: bool = True,
        drop_privileges: bool = True,
    ) -> None:
        owner = type(self).__name__
        # Checked here too, so that the error names CodeExecution rather than the Sandbox it builds.
        check_limits(owner, timeout, {"memory_mb": memory_mb, "max_processes": max_processes,
                                      "max_output_bytes": max_output_bytes})
        check_finite(owner, "violation_value", violation_value)
        check_finite(owner, "workers", workers, integer=True, ge=1, allow_none=True)
        self.sandbox = Sandbox(timeout=timeout, memory_mb=memory_mb, max_processes=max_processes,
                               max_output_bytes=max_output_bytes, python=python, isolate=isolate,
                               drop_privileges=drop_privileges)
        self.guard = guard
        self.violation_value = float(violation_value)
        self.tests_key = tests_key
        self.workers = workers or 2 * (os.cpu_count() or 1)
        self.last_results: list[SandboxResult] = []
        #: Runs whose report the harness cannot have written (forged by the code): scored as failures.
        self.malformed_reports = 0

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "last_results": []}  # pickled into workers without old results

    def __call__(self, completions: Sequence[str], tests: Sequence[Any] | None = None, **columns: Any) -> list[float]:
        if tests is not None:
            columns["tests"] = tests
        if self.tests_key not in columns:
            raise KeyError(f"code_execution needs the column {self.tests_key!r}; got {sorted(columns)}")
        tests = [_as_tests(t, i) for i, t in enumerate(columns[self.tests_key])]
        if len(tests) != len(completions):
            raise ValueError(f"got {len(tests)} test lists for {len(completions)} completions")
        jobs = list(zip(completions, tests))
        if len(jobs) == 1:
            results = [self.run(*jobs[0])]
        else:
            # Threads suffice: each one waits on its sandbox process, which does the work.
            with ThreadPoolExecutor(min(self.workers, len(jobs))) as pool:
                results = list(pool.map(lambda job: self.run(*job), jobs))
        self.last_results = results
        self.malformed_reports += sum(r.violation == "malformed_report" for r in results)
        return [self.score(result, len(t)) for result, t in zip(results, tests)]

    def run(self, completion: str, tests: list[str]) -> SandboxResult:
        """Run one completion's code and tests in the sandbox (the tests in its judge process)."""
        return self.sandbox.run(extract_code(completion), tests, mode="asserts", guard=self.guard)

    def score(self, result: SandboxResult, n_tests: int) -> float:
        """The reward of one sandbox result (see the class formula)."""
        if result.violation is not None:
            return self.violation_value
        if n_tests == 0 or not result.completed:
            return 0.0
        passed = result.passed
        if self.guard and result.guard_passed is not None:
            passed = [p and not g for p, g in zip(passed, result.guard_passed)]
        # The sandbox already refuses a report with more verdicts than tests; bound it here too.
        return min(1.0, max(0.0, sum(passed) / n_tests))
