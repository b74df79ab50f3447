"""Sandbox bootstrap: run by ``rftlab.rewards.sandbox`` as ``python -I _sandbox_boot.py RESULT_FD``.

Standard library only: it runs under the sandbox interpreter (e.g. Debian's /usr/bin/python3), not
the trainer's environment. It reads one JSON job from stdin, then, in this order:

1. new namespaces: user (only when not root), mount, network (no interfaces but a down loopback),
   IPC (System V objects die with the run), pid; and a new, empty session keyring;
2. a fresh root on a size-capped tmpfs: /usr (and any interpreter prefix) bound read-only, /dev with
   null/zero/random/urandom, a writable /work (the cwd) and /tmp, nothing else; ``pivot_root`` into
   it and detach the old root, so no host file is reachable, readable or writable;
3. forks the job process (pid 1 of the new pid namespace: when it exits, the kernel kills every
   process it left behind), which sets resource limits, drops to the unprivileged uid/gid (when
   started as root), and runs the job;
4. relays the job's exit status. On SIGTERM it kills the job at once.

Every step that the OS refuses is skipped and reported in the status line, so the parent can say
what isolation it got (``network_isolated`` ...). The job writes its result as one JSON line to
RESULT_FD; a run that writes none (it crashed, exited early, was killed) scores as a failure.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x10000000, 0x20000000, 0x40000000
CLONE_NEWIPC = 0x08000000
KEYCTL_JOIN_SESSION_KEYRING = 1
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG = 1
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}  # syscall numbers (asm/unistd.h); glibc has no wrapper
_SYS_KEYCTL = {"x86_64": 250, "aarch64": 219}

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _unshare(flags: int) -> bool:
    return _libc.unshare(flags) == 0


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def _enter_user_namespace() -> bool:
    """Unprivileged trainer: a user namespace maps us to root in it, which allows the rest."""
    uid, gid = os.getuid(), os.getgid()
    if not _unshare(CLONE_NEWUSER):
        return False
    for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"0 {uid} 1"),
                       ("/proc/self/gid_map", f"0 {gid} 1")):
        with open(path, "w") as f:
            f.write(text)
    return True


def _new_session_keyring() -> bool:
    """Join a new, empty session keyring: the trainer's (login secrets, tokens) is no longer the
    job's, so ``KEY_SPEC_SESSION_KEYRING`` reaches nothing of the host."""
    call = _SYS_KEYCTL.get(os.uname().machine)
    return call is not None and _libc.syscall(call, KEYCTL_JOIN_SESSION_KEYRING, None) >= 0


def _bind(source: str, target: str, readonly: bool) -> None:
    _mount(source, target, None, MS_BIND | MS_REC)
    if readonly:
        try:
            _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        except OSError:
            pass  # a locked mount in a user namespace: the files stay root-owned, hence read-only


def _build_root(root: str, binds: list[str], disk_mb: int, uid: int, gid: int) -> None:
    """A new root filesystem on tmpfs; host paths in ``binds`` appear read-only at the same path."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates back to the host
    _mount("rftlab-sandbox", root, "tmpfs", MS_NOSUID | MS_NODEV, f"size={disk_mb}m,mode=755")
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = "/" + name
        if os.path.islink(host):
            os.symlink(os.readlink(host), os.path.join(root, name))  # merged /usr: bin -> usr/bin
        elif os.path.isdir(host):
            binds.append(host)
    for host in binds:
        target = os.path.join(root, host.lstrip("/"))
        os.makedirs(target, mode=0o755, exist_ok=True)
        _bind(host, target, readonly=True)
    os.makedirs(os.path.join(root, "dev"), mode=0o755)
    for dev in ("null", "zero", "random", "urandom"):
        target = os.path.join(root, "dev", dev)
        open(target, "w").close()
        _mount("/dev/" + dev, target, None, MS_BIND)
    os.makedirs(os.path.join(root, "etc"), mode=0o755)
    os.makedirs(os.path.join(root, "tmp"), mode=0o777)
    os.chmod(os.path.join(root, "tmp"), 0o1777)
    os.makedirs(os.path.join(root, "work"), mode=0o700)
    os.chown(os.path.join(root, "work"), uid, gid)
    old = os.path.join(root, ".old_root")
    os.makedirs(old, mode=0o700)
    # pivot_root rather than chroot: the old root is then unmounted, not merely out of sight, so
    # not even a process with CAP_SYS_CHROOT in a user namespace can climb back to it.
    _check(_libc.syscall(_SYS_PIVOT_ROOT[os.uname().machine], root.encode(), old.encode()), "pivot_root")
    os.chdir("/")
    _check(_libc.umount2(b"/.old_root", MNT_DETACH), "umount old root")
    os.rmdir("/.old_root")


def _set_limits(limits: dict) -> None:
    for name, value in limits.items():
        which = getattr(resource, name)
        resource.setrlimit(which, (value, value))


def _job(spec: dict, result_fd: int, fs_isolated: bool) -> None:
    os.chdir("/work" if fs_isolated else spec["workdir"])
    _set_limits(spec["limits"])
    if spec.get("uid") is not None:
        os.setgroups([])
        os.setgid(spec["gid"])
        os.setuid(spec["uid"])  # from here on no privilege is left; the uid is unique to this run
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # set after setuid, which clears it
    _run_harness(spec, result_fd)


def _run_harness(spec: dict, result_fd: int) -> None:
    """Execute the submission and the checks; write one JSON result line to ``result_fd``."""
    write, me, dumps = os.write, os.getpid(), json.dumps  # private references: the code may patch os
    plain = _plain_encoder()  # built before the submission runs, from the builtins as they are now

    def report(result: dict) -> None:
        if os.getpid() == me:  # a process forked by the submission does not speak for the run
            write(result_fd, (dumps(result) + "\n").encode())

    namespace: dict = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(spec["code"], "solution.py", "exec"), namespace)
    except BaseException as err:  # SystemExit too: exiting before the tests run passes nothing
        report({"stage": "code", "error": f"{type(err).__name__}: {err}"[:500]})
        return
    if spec["mode"] == "script":
        report({"stage": "done"})
    elif spec["mode"] == "grader":
        _run_grader(spec, namespace, report)
    elif spec["mode"] == "values":
        result = {"stage": "done", "values": _evaluate(spec["tests"], namespace, plain)}
        if spec.get("guard"):
            result["guard_values"] = _evaluate(spec["tests"], _no_op(namespace), plain)
        report(result)
    else:
        passed = _run_tests(spec["tests"], namespace)
        result = {"stage": "done", "passed": passed}
        if spec.get("guard"):
            result["guard_passed"] = _run_tests(spec["tests"], _no_op(namespace))
        report(result)


def _run_tests(tests: list[str], namespace: dict) -> list[bool]:
    passed = []
    for test in tests:
        scope = dict(namespace)
        try:
            exec(compile(test, "test.py", "exec"), scope)
            passed.append(True)
        except BaseException:  # noqa: BLE001 - a test that raises anything, SystemExit included, fails
            passed.append(False)
    return passed


def _plain_encoder():
    """A function turning a value into tagged JSON data, or None when it is not plain data.

    Only exact built-in types cross (no subclasses, no objects with their own ``__eq__``): the
    trainer decodes them into fresh values of its own and compares there, so nothing the
    submission defines takes part in deciding a test.
    """
    kind, scalars = type, (type(None), bool, int, float, str)
    is_finite_float = lambda x: x == x and x not in (float("inf"), float("-inf"))  # noqa: E731

    def encode(value, budget, depth=0):  # budget: [items so far], shared by one call tree
        budget[0] += 1
        if budget[0] > 10_000 or depth > 20:
            return None
        t = kind(value)
        if t in scalars:
            if t is float and not is_finite_float(value):
                return {"float": repr(value)}
            if t is int and abs(value) > 2 ** 63:
                return {"int": str(value)}
            return {"v": value}
        if t is list or t is tuple:
            items = [encode(v, budget, depth + 1) for v in value]
            return None if None in items else {t.__name__: items}
        if t is dict:
            if not all(kind(k) is str for k in value):
                return None
            items = {k: encode(v, budget, depth + 1) for k, v in value.items()}
            return None if None in items.values() else {"dict": items}
        return None

    def run(value):
        return encode(value, [0])

    return run


def _evaluate(expressions: list[str], namespace: dict, plain) -> list:
    """Each expression's value as tagged plain data, or {"error": ...} (raised, or not plain data)."""
    out = []
    for expression in expressions:
        scope = dict(namespace)
        try:
            value = plain(eval(compile(expression, "test.py", "eval"), scope))
            out.append(value if value is not None else {"error": "not plain data"})
        except BaseException as err:  # noqa: BLE001 - an expression that raises anything fails
            out.append({"error": str(type(err).__name__)[:100]})
    return out


def _no_op(namespace: dict) -> dict:
    """The anti-reward-hacking run: every function and class the submission defined becomes a
    stub returning None. A test that still passes does not depend on the submitted code (the
    "output independent of the kernel" hack of the Triton RFT case study)."""
    stubbed = dict(namespace)
    for key, value in namespace.items():
        code = getattr(value, "__code__", None)
        defined_here = (code is not None and code.co_filename == "solution.py") or (
            isinstance(value, type) and value.__module__ == "__main__")
        if defined_here:
            stubbed[key] = lambda *a, **k: None
    return stubbed


def _run_grader(spec: dict, namespace: dict, report) -> None:
    grade = namespace.get("grade")
    if not callable(grade):
        report({"stage": "grader", "error": "the grader source defines no grade(sample, item) function"})
        return
    try:
        value = grade(spec["sample"], spec["item"])
        value = float(value)
    except BaseException as err:  # noqa: BLE001
        report({"stage": "grader", "error": f"{type(err).__name__}: {err}"[:500]})
        return
    report({"stage": "done", "value": value})


def _kill_job(pid: int) -> None:
    """SIGTERM from the parent: kill the job (pid 1 of its namespace, so all of it) and reap it
    here, so that no zombie is left for the host's init."""
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os._exit(137)


def main() -> None:
    result_fd = int(sys.argv[1])
    spec = json.loads(sys.stdin.buffer.read().decode())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    status = {"network_isolated": False, "filesystem_isolated": False, "pid_isolated": False,
              "ipc_isolated": False, "keyring_isolated": False, "user_namespace": False, "uid": spec.get("uid")}
    if spec["isolate"]:
        if os.geteuid() != 0:
            try:
                status["user_namespace"] = _enter_user_namespace()
            except OSError:
                status["user_namespace"] = False
        status["network_isolated"] = _unshare(CLONE_NEWNET)
        # System V shared memory, semaphores and message queues of a private IPC namespace are
        # destroyed with it: nothing the job creates outlives the run or is seen by the host.
        status["ipc_isolated"] = _unshare(CLONE_NEWIPC)
        status["keyring_isolated"] = _new_session_keyring()
        if _unshare(CLONE_NEWNS):
            try:
                uid = spec["uid"] if spec.get("uid") is not None else 0
                gid = spec["gid"] if spec.get("gid") is not None else 0
                _build_root(spec["root"], list(spec["binds"]), spec["disk_mb"], uid, gid)
                status["filesystem_isolated"] = True
            except (OSError, KeyError) as err:
                status["filesystem_error"] = str(err)
        status["pid_isolated"] = _unshare(CLONE_NEWPID)
    os.write(result_fd, (json.dumps({"status": status}) + "\n").encode())
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            _job(spec, result_fd, status["filesystem_isolated"])
        except BaseException:  # noqa: BLE001 - the job's failure is reported by its missing result
            code = 1
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()  # os._exit skips it, and the submission's prints would be lost
            except BaseException:  # noqa: BLE001 - a closed or replaced stream
                pass
        os._exit(code)
    os.close(result_fd)
    signal.signal(signal.SIGTERM, lambda *_: _kill_job(pid))
    _, wait_status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(wait_status)
    os._exit(code if code >= 0 else 128 - code)  # killed by signal s: 128 + s, as a shell reports it


if __name__ == "__main__":
    main()
