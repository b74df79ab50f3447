"""A process sandbox for untrusted model output (code rewards, ``python`` graders).

Standard library only, and no other rftlab module than ``checks.py`` (standard library only too), so
that this file with ``_sandbox_boot.py`` and ``checks.py`` beside it runs under a bare system Python.
Each run is a fresh process tree:

- ``python -I`` (isolated mode) with an empty environment, started in its own session;
- new mount, network, IPC and pid namespaces where the OS allows (a user namespace too when the
  trainer is not root) and a new session keyring: the code sees a private root on a size-capped
  tmpfs holding only /usr (read-only), /dev/{null,zero,random,urandom}, its working dir /work and
  /tmp; no host file (no /etc/passwd, no project file, no home) and no network interface but a
  down loopback;
- resource limits (``setrlimit``): CPU seconds, address space, open files, file size, processes;
- a seccomp filter (libseccomp, where installed) refusing memory that the address-space limit
  does not count (memory files, System V objects), new namespaces and mounts, io_uring, ptrace and
  the key store;
- the tests run in a separate judge process the code cannot reach; only plain data crosses;
- when the trainer runs as root (as CI does) the code runs as an unprivileged uid/gid unique to
  the run, so concurrent runs cannot signal or read each other, and leftovers are found by uid;
- a wall-clock timeout after which the whole process tree is killed, and capped output.

Whatever isolation the OS refuses is reported on the result (``network_isolated`` ...), never
silently assumed. The interpreter is chosen by ``find_interpreter``: it must be one the sandbox
user can execute; a Python under a root-only home (pyenv in /root) is not, so Debian's
/usr/bin/python3 is preferred; with the private root any interpreter prefix is bound read-only.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

try:
    from rftlab.rewards.checks import MAX_SECONDS, check_finite
except ModuleNotFoundError:  # loaded as a lone file beside checks.py, without rftlab (see the module docstring)
    from checks import MAX_SECONDS, check_finite  # type: ignore[no-redef]

BOOT = Path(__file__).with_name("_sandbox_boot.py")
# The bootstrap is imported rather than run as a script, so that its bytecode is cached beside it
# (a script is compiled from source at every start: a few milliseconds of every run).
_LAUNCH = "import sys; sys.path.insert(0, sys.argv[1]); import _sandbox_boot; _sandbox_boot.main()"
MODES = ("asserts", "grader", "script")
INTERPRETER_CANDIDATES = ("/usr/bin/python3", "/usr/local/bin/python3")
# Unique per-run uids are drawn from this range (well above any distribution's user range), so a
# run's processes can be told apart from everything else on the machine by uid alone.
UID_BASE, UID_SPAN = 1_000_000, 1 << 30
_LIMIT_NAMES = ("RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_NOFILE", "RLIMIT_FSIZE", "RLIMIT_NPROC", "RLIMIT_CORE")
#: The least allowed value of each size limit of ``Sandbox``.
MINIMUM_SIZES = {"memory_mb": 64, "max_processes": 1, "max_open_files": 16, "max_file_mb": 1, "disk_mb": 1,
                 "max_output_bytes": 1}


class SandboxError(RuntimeError):
    """The sandbox cannot be set up on this machine (no usable interpreter, bad configuration)."""


@dataclass
class SandboxResult:
    """What one sandboxed run did.

    Attributes:
        completed: the job ran to the end and reported (False: it crashed, exited early, was killed).
        passed: per test, whether it passed (asserts mode).
        guard_passed: per test, whether it passed with the submission's functions stubbed out.
        value: the grader's return value (grader mode).
        error: the submission's or grader's exception, if one was raised ("SystemExit: 0" ...).
        violation: "timeout", "output_limit", "cpu_limit", "crashed", "malformed_report" (the code
            answered the judge with something its harness cannot have written, or a report is
            damaged) or None.
        returncode: exit code of the sandbox process (128 + signal when killed).
        stdout, stderr: the first ``max_output_bytes`` of output, decoded.
        seconds: wall time.
        network_isolated, filesystem_isolated, pid_isolated: what isolation the OS granted.
        ipc_isolated: System V IPC objects of the run live in its own namespace and die with it.
        keyring_isolated: the run has its own, empty session keyring, not the trainer's.
        seccomp: a seccomp filter refused memory outside the address-space limit (memory files,
            System V objects), new namespaces and mounts, io_uring and the like to the code.
        uid: the uid the code ran as (None: the trainer's own).
    """

    completed: bool = False
    passed: list[bool] = field(default_factory=list)
    guard_passed: list[bool] | None = None
    value: float | None = None
    error: str | None = None
    violation: str | None = None
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    network_isolated: bool = False
    filesystem_isolated: bool = False
    pid_isolated: bool = False
    ipc_isolated: bool = False
    keyring_isolated: bool = False
    seccomp: bool = False
    uid: int | None = None


@lru_cache(maxsize=None)
def _probe(python: str, uid: int | None) -> tuple[str, tuple[int, int]] | None:
    """(sys.base_prefix, version) of ``python`` when it runs (as ``uid``), else None."""
    kwargs: dict[str, Any] = {"user": uid, "group": uid} if uid is not None else {}
    try:
        out = subprocess.run(
            [python, "-I", "-c", "import sys; print(sys.base_prefix); print(*sys.version_info[:2])"],
            capture_output=True, env={}, cwd="/", timeout=30, check=True, **kwargs,
        ).stdout.decode().split("\n")
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0], (int(out[1].split()[0]), int(out[1].split()[1]))


def find_interpreter(python: str | None = None, uid: int | None = None) -> tuple[str, str]:
    """The sandbox interpreter and its prefix: ``python`` if given, else the first that works of
    /usr/bin/python3, /usr/local/bin/python3, and this process's own interpreter.

    With ``uid`` the candidate must run as that uid (needed when no private root can be built,
    because then the interpreter's own path must be readable by the unprivileged user).
    """
    candidates = [python] if python else [*INTERPRETER_CANDIDATES, os.path.realpath(sys.executable)]
    tried = []
    for candidate in candidates:
        if not os.path.exists(candidate):
            tried.append(f"{candidate} (missing)")
            continue
        found = _probe(candidate, uid)
        if found is None:
            tried.append(f"{candidate} (does not run{' as uid ' + str(uid) if uid is not None else ''})")
        elif found[1] < (3, 9):
            tried.append(f"{candidate} (Python {found[1][0]}.{found[1][1]} < 3.9)")
        else:
            return candidate, found[0]
    raise SandboxError(
        "sandbox: no usable Python interpreter; tried " + ", ".join(tried)
        + ". Install the system Python (apt-get install python3) or pass python=/path/to/python3"
    )


def check_limits(owner: str, timeout: float, sizes: dict[str, float]) -> None:
    """Raise a ValueError naming the first invalid ``Sandbox`` limit (also for classes that build one).

    Sizes are finite numbers (not bools) at least their ``MINIMUM_SIZES``; they are truncated to
    integers. An infinite size is not "unlimited": ``setrlimit`` needs an integer.

    Args:
        owner: the class named in the error.
        timeout: wall-clock seconds per run, in (0, ``checks.MAX_SECONDS``].
        sizes: size limit name (a key of ``MINIMUM_SIZES``) -> value.
    """
    check_finite(owner, "timeout", timeout, gt=0, le=MAX_SECONDS)
    for name, value in sizes.items():
        check_finite(owner, name, value, ge=MINIMUM_SIZES[name])


class Sandbox:
    """Runs untrusted Python in a separate, isolated, resource-limited process tree.

    Args:
        timeout: wall-clock seconds per run, in (0, ``checks.MAX_SECONDS``]; the process tree is
            killed after it.
        memory_mb: address-space limit per process, in MiB (>= 64).
        cpu_seconds: CPU-time limit per process, an integer >= 1 (default: ceil(timeout) + 1).
        max_processes: processes and threads the run may have at once (>= 1; a fork bomb stops here).
        max_open_files: open file descriptors per process (>= 16).
        max_file_mb: largest file the code may write, in MiB (>= 1).
        disk_mb: size of the private tmpfs holding /work and /tmp, in MiB (>= 1).
        max_output_bytes: stdout + stderr kept (>= 1); a run printing more is killed ("output_limit").
        python: interpreter path (default: ``find_interpreter()``).
        isolate: use namespaces (mount, network, IPC, pid) and the seccomp filter where the OS allows.
        drop_privileges: when running as root, run the code as a fresh unprivileged uid. Turning it
            off runs untrusted code as root inside the namespaces: only for debugging.

    Every limit is a finite number (none can be infinite, "unlimited"); see ``check_limits``.
    """

    def __init__(
        self,
        timeout: float = 5.0,
        memory_mb: int = 512,
        cpu_seconds: int | None = None,
        max_processes: int = 16,
        max_open_files: int = 64,
        max_file_mb: int = 16,
        disk_mb: int = 64,
        max_output_bytes: int = 64 * 1024,
        python: str | None = None,
        isolate: bool = True,
        drop_privileges: bool = True,
    ) -> None:
        owner = type(self).__name__
        check_limits(owner, timeout, {"memory_mb": memory_mb, "max_processes": max_processes,
                                      "max_open_files": max_open_files, "max_file_mb": max_file_mb,
                                      "disk_mb": disk_mb, "max_output_bytes": max_output_bytes})
        check_finite(owner, "cpu_seconds", cpu_seconds, integer=True, ge=1, allow_none=True)
        if python is not None and not os.path.exists(python):
            raise ValueError(f"python={python!r} does not exist")
        self.timeout = float(timeout)
        self.memory_mb = int(memory_mb)
        self.cpu_seconds = cpu_seconds if cpu_seconds is not None else math.ceil(timeout) + 1
        self.max_processes = int(max_processes)
        self.max_open_files = int(max_open_files)
        self.max_file_mb = int(max_file_mb)
        self.disk_mb = int(disk_mb)
        self.max_output_bytes = int(max_output_bytes)
        self.python = python
        self.isolate = isolate
        self.drop_privileges = drop_privileges

    def __repr__(self) -> str:
        return f"Sandbox(timeout={self.timeout}, memory_mb={self.memory_mb}, isolate={self.isolate})"

    def run(
        self,
        code: str,
        tests: list[str] | None = None,
        mode: str = "asserts",
        guard: bool = False,
        sample: Any = None,
        item: Any = None,
    ) -> SandboxResult:
        """Run ``code``; then, by ``mode``: "asserts" runs each of ``tests`` (Python statements)
        against the code's names, "grader" calls the code's ``grade(sample, item)``, "script"
        nothing. ``guard`` (asserts mode) re-runs the tests with the code's functions and classes
        stubbed out.

        The tests run in a separate judge process that the code cannot reach; the code's names
        are handles there, and every call crosses as plain data (see ``_sandbox_boot``)."""
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; valid: {', '.join(MODES)}")
        uid = UID_BASE + secrets.randbelow(UID_SPAN) if (self.drop_privileges and os.geteuid() == 0) else None
        python, prefix = find_interpreter(self.python, None if self.isolate else uid)
        tmp = tempfile.mkdtemp(prefix="rftlab-sandbox-")
        try:
            os.chmod(tmp, 0o711)  # the unprivileged uid must traverse it to reach work/
            os.mkdir(os.path.join(tmp, "root"))
            work = os.path.join(tmp, "work")
            os.mkdir(work, 0o700)
            if uid is not None:
                os.chown(work, uid, uid)
            spec = {
                "code": code, "mode": mode, "guard": guard,
                "sample": sample, "item": item, "uid": uid, "gid": uid, "isolate": self.isolate,
                "root": os.path.join(tmp, "root"), "workdir": work, "disk_mb": self.disk_mb,
                "binds": _binds(prefix), "limits": self._limits(uid),
            }
            return self._execute(python, spec, list(tests or []), uid)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _limits(self, uid: int | None) -> dict[str, int]:
        nproc = self.max_processes
        if uid is None:
            # Without a uid of its own, RLIMIT_NPROC counts every task of the trainer's user, so
            # the allowance is added on top of what that user already runs.
            nproc += _tasks_of_uid(os.getuid())
        values = (self.cpu_seconds, self.memory_mb << 20, self.max_open_files, self.max_file_mb << 20, nproc, 0)
        return dict(zip(_LIMIT_NAMES, values))

    def _execute(self, python: str, spec: dict, tests: list[str], uid: int | None) -> SandboxResult:
        start = time.perf_counter()
        read_fd, write_fd = os.pipe()
        try:
            proc = subprocess.Popen(
                [python, "-I", "-c", _LAUNCH, str(BOOT.parent), str(write_fd)], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={}, cwd=os.path.dirname(spec["workdir"]),
                start_new_session=True, pass_fds=(write_fd,),
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        result = SandboxResult(uid=uid)
        # The spec, prefixed by its length, then the tests: the bootstrap reads the tests only after
        # it has forked the job, so they are never in the job's memory.
        header = json.dumps(spec).encode()
        try:
            proc.stdin.write(b"%15d\n" % len(header) + header + json.dumps(tests).encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass
        outputs, violation = self._collect(proc, read_fd, start + self.timeout)
        if proc.poll() is None or violation is not None:
            _kill_tree(proc)
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            stream.close()
        os.close(read_fd)
        result.returncode = proc.returncode
        result.stdout = outputs["stdout"].decode(errors="replace")
        result.stderr = outputs["stderr"].decode(errors="replace")
        counted = spec["mode"] == "asserts"
        reported = _parse_report(outputs["result"], result, len(tests) if counted else None,
                                 "passed" if counted else None)
        if violation is None and reported == "malformed":
            violation = "malformed_report"
        elif violation is None and reported == "missing":
            violation = "cpu_limit" if proc.returncode == 128 + signal.SIGXCPU else "crashed"
        result.violation = violation
        if uid is not None and (violation is not None or not result.pid_isolated):
            _reap_uid(uid)  # anything that escaped the process group or the pid namespace
        result.seconds = time.perf_counter() - start
        return result

    def _collect(self, proc: subprocess.Popen, read_fd: int, deadline: float) -> tuple[dict[str, bytes], str | None]:
        """Read stdout, stderr and the result pipe until EOF, the deadline, or too much output."""
        names = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr", read_fd: "result"}
        chunks: dict[str, list[bytes]] = {name: [] for name in names.values()}
        sizes = dict.fromkeys(chunks, 0)
        selector = selectors.DefaultSelector()
        for fd in names:
            selector.register(fd, selectors.EVENT_READ)
        open_fds, violation, exited_at = set(names), None, None
        while open_fds:
            now = time.perf_counter()
            if now >= deadline:
                violation = "timeout"
                break
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > 0.2:
                break  # the sandbox exited; a leftover still holding a pipe is killed below
            for key, _ in selector.select(timeout=min(0.05, deadline - now)):
                data = os.read(key.fd, 65536)
                name = names[key.fd]
                if not data:
                    selector.unregister(key.fd)
                    open_fds.discard(key.fd)
                    continue
                sizes[name] += len(data)
                if name == "result" or sizes["stdout"] + sizes["stderr"] <= self.max_output_bytes:
                    chunks[name].append(data)
            if sizes["stdout"] + sizes["stderr"] > self.max_output_bytes or sizes["result"] > (1 << 20):
                violation = "output_limit"
                break
        selector.close()
        outputs = {name: b"".join(parts) for name, parts in chunks.items()}
        budget = self.max_output_bytes
        outputs["stdout"] = outputs["stdout"][:budget]
        outputs["stderr"] = outputs["stderr"][: max(0, budget - len(outputs["stdout"]))]
        return outputs, violation


def _binds(prefix: str) -> list[str]:
    """Host directories the private root needs: /usr, and the interpreter's prefix if elsewhere."""
    binds = ["/usr"]
    real = os.path.realpath(prefix)
    if not (real == "/usr" or real.startswith("/usr/")):
        binds.append(real)
    return binds


def _report_problem(report: dict[str, Any], n_tests: int | None, required: str | None = None) -> str | None:
    """Why a job's report cannot be the harness's (None when it is well-formed).

    Checked like untrusted input although the judge, not the submission, writes asserts-mode
    reports (a grader's report comes from the process that ran it): one verdict per test, booleans
    only, a finite number as a grader's value.

    Args:
        report: the decoded report line.
        n_tests: how many tests ran (asserts mode), None otherwise.
        required: the key a finished report of this mode must hold ("passed" in asserts mode).
    """
    if not isinstance(report.get("stage"), str) or not isinstance(report.get("error"), (str, type(None))):
        return "stage and error must be a string and a string or null"
    if report["stage"] == "protocol":
        return report["error"] or "the code broke the judge's protocol"
    if report["stage"] != "done":
        return None
    if required is not None and required not in report:
        return f"a finished run reports {required}"
    for key in ("passed", "guard_passed"):
        if key not in report:
            continue
        verdicts = report[key]
        if not isinstance(verdicts, list) or not all(isinstance(v, bool) for v in verdicts):
            return f"{key} must be a list of booleans"
        if n_tests is not None and len(verdicts) != n_tests:
            return f"{key} has {len(verdicts)} verdicts for {n_tests} tests"
    value = report.get("value")
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
        return "value must be a finite number"
    return None


def _parse_report(data: bytes, result: SandboxResult, n_tests: int | None = None, required: str | None = None) -> str:
    """Fill ``result`` from the result pipe: "ok", "missing" (the job never reported) or "malformed"
    (a report the harness cannot have written: more than one, or one that fails ``_report_problem``).

    Args:
        data: every byte the job wrote to the result pipe.
        result: filled in place.
        n_tests: how many tests ran (asserts mode), None otherwise.
        required: the key a finished report must hold ("passed" in asserts mode).
    """
    status: dict[str, Any] = {}
    reports: list[dict[str, Any]] = []
    malformed: str | None = None
    for line in data.decode(errors="replace").splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            malformed = malformed or "a line that is not JSON"
            continue
        if not isinstance(obj, dict):
            malformed = malformed or "a line that is not a JSON object"
            continue
        if "status" in obj and not status and not reports:
            status = obj["status"] if isinstance(obj["status"], dict) else {}  # written before the job starts
        elif "stage" in obj:
            reports.append(obj)
        else:
            malformed = malformed or "a line that is neither status nor report"
    result.network_isolated = bool(status.get("network_isolated"))
    result.filesystem_isolated = bool(status.get("filesystem_isolated"))
    result.pid_isolated = bool(status.get("pid_isolated"))
    result.ipc_isolated = bool(status.get("ipc_isolated"))
    result.keyring_isolated = bool(status.get("keyring_isolated"))
    result.seccomp = bool(status.get("seccomp"))
    if not reports and malformed is None:
        return "missing"
    if len(reports) > 1:
        malformed = f"{len(reports)} reports (the harness writes one)"
    malformed = malformed or _report_problem(reports[0], n_tests, required)
    if malformed is not None:
        result.error = f"malformed report: {malformed}"
        return "malformed"
    report = reports[0]
    result.error = report.get("error")
    if report["stage"] == "done":
        result.completed = True
        result.passed = list(report.get("passed", []))
        if "guard_passed" in report:
            result.guard_passed = list(report["guard_passed"])
        if report.get("value") is not None:
            result.value = float(report["value"])
    return "ok"


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGTERM the bootstrap (it SIGKILLs the job, pid 1 of its namespace, which takes every
    descendant with it), then SIGKILL the whole process group for good measure."""
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=0.5)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _uids_of_processes() -> list[tuple[int, int, int]]:
    """(pid, real uid, threads) of every process, from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            if fields.get("State", "").split()[:1] == ["Z"]:
                continue  # a zombie runs nothing; its parent or init reaps it
            out.append((int(entry), int(fields["Uid"].split()[0]), int(fields.get("Threads", "1"))))
        except (OSError, KeyError, ValueError):
            continue
    return out


def _tasks_of_uid(uid: int) -> int:
    return sum(threads for _, owner, threads in _uids_of_processes() if owner == uid)


def _reap_uid(uid: int, rounds: int = 5) -> None:
    """SIGKILL every process of the run's unique uid (a fork bomb may still be forking)."""
    for _ in range(rounds):
        pids = [pid for pid, owner, _ in _uids_of_processes() if owner == uid]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)
