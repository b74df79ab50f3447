"""Sandbox bootstrap: ``rftlab.rewards.sandbox`` starts ``python -I`` importing it and calling
``main()`` with RESULT_FD as the last argument.

Standard library only: it runs under the sandbox interpreter (e.g. Debian's /usr/bin/python3), not
the trainer's environment. It reads the job's spec from stdin (the tests come after it and are read
only after step 3), then, in this order:

1. new namespaces: user (only when not root), mount, network (no interfaces but a down loopback),
   IPC (System V objects die with the run), pid; and a new, empty session keyring;
2. a fresh root on a size-capped tmpfs: /usr (and any interpreter prefix) bound read-only, /dev with
   null/zero/random/urandom, a writable /work (the cwd) and /tmp, nothing else; ``pivot_root`` into
   it and detach the old root, so no host file is reachable, readable or writable;
3. forks the job process (pid 1 of the new pid namespace: when it exits, the kernel kills every
   process it left behind), which sets resource limits, drops to the unprivileged uid/gid (when
   started as root) and runs the submission. The job holds two pipe ends to this process and
   nothing else: not the result pipe, not the tests;
4. becomes the judge: it runs the tests, in which the submission's names are handles (``Remote``);
   a call sends its arguments to the job as plain data and gets plain data back, and every
   comparison runs here, on fresh built-in values. The submission cannot reach this process (it
   is outside the job's pid namespace, not dumpable, and of another uid when started as root).
   In "grader" and "script" modes it passes on the job's one message. It writes the one report
   to RESULT_FD, kills the job and exits. On SIGTERM it kills the job at once.

Every step that the OS refuses is skipped and reported in the status line, so the parent can say
what isolation it got (``network_isolated`` ...). A run without a report (the job crashed, exited
early, was killed) scores as a failure; a job that breaks the protocol gets a "protocol" report,
which the parent counts as malformed.
"""

from __future__ import annotations

import builtins
import ctypes
import importlib
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
PR_SET_PDEATHSIG, PR_SET_DUMPABLE = 1, 4
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


# A seccomp filter (through libseccomp, which resolves the syscall numbers of this architecture)
# refuses what would let the job hold memory outside its address-space limit, or leave its
# namespaces: memory files and System V objects (not counted by RLIMIT_AS), new namespaces and
# mounts (a tmpfs of its own would have no size cap), io_uring, userfaultfd, bigger pipes, and
# reaching into other processes or the kernel's key store.
_DENIED = (
    "memfd_create", "memfd_secret", "shmget", "msgget", "semget",
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "fsopen", "fsmount", "fsconfig",
    "open_tree", "move_mount", "mount_setattr",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "userfaultfd", "bpf", "perf_event_open",
    "ptrace", "process_vm_readv", "process_vm_writev", "add_key", "request_key", "keyctl",
    "kexec_load", "init_module", "finit_module", "swapon",
)
#: clone() flags that make a namespace (CLONE_NEWTIME, NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET).
_NAMESPACE_FLAGS = (0x80, 0x20000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)
_F_SETPIPE_SZ = 1031
_SCMP_ACT_ALLOW, _SCMP_CMP_EQ, _SCMP_CMP_MASKED_EQ = 0x7FFF0000, 4, 7
_EPERM, _ENOSYS = 1, 38


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


def _errno_action(code: int) -> int:
    return 0x00050000 | code  # SCMP_ACT_ERRNO(code)


def _seccomp_filter():
    """The job's filter, built but not loaded (a libseccomp context), or None without libseccomp.

    Built before the private root hides the library; loaded by the job with ``_load_filter``.
    """
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError:
        return None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_ArgCmp)]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(_SCMP_ACT_ALLOW)
    if not ctx:
        return None

    def rule(action: int, name: str, *compares: tuple) -> bool:
        number = lib.seccomp_syscall_resolve_name(name.encode())
        if number < 0:
            return True  # not a syscall of this architecture or libseccomp version: nothing to refuse
        args = (_ArgCmp * max(1, len(compares)))(*[_ArgCmp(*c) for c in compares])
        return lib.seccomp_rule_add_array(ctx, action, number, len(compares), args) == 0

    ok = all(rule(_errno_action(_EPERM), name) for name in _DENIED)
    # glibc falls back from clone3 to clone on ENOSYS; clone's flags can then be checked.
    ok = ok and rule(_errno_action(_ENOSYS), "clone3")
    ok = ok and all(rule(_errno_action(_EPERM), "clone", (0, _SCMP_CMP_MASKED_EQ, flag, flag))
                    for flag in _NAMESPACE_FLAGS)
    ok = ok and rule(_errno_action(_EPERM), "fcntl", (1, _SCMP_CMP_EQ, _F_SETPIPE_SZ, 0))
    return (lib, ctx) if ok else None


def _load_filter(prepared) -> None:
    lib, ctx = prepared
    if lib.seccomp_load(ctx) != 0:
        raise OSError("seccomp_load failed")


def _set_limits(limits: dict) -> None:
    for name, value in limits.items():
        which = getattr(resource, name)
        resource.setrlimit(which, (value, value))


def _job(spec: dict, channel: "Channel", fs_isolated: bool, seccomp) -> None:
    os.chdir("/work" if fs_isolated else spec["workdir"])
    _set_limits(spec["limits"])
    if spec.get("uid") is not None:
        os.setgroups([])
        os.setgid(spec["gid"])
        os.setuid(spec["uid"])  # from here on no privilege is left; the uid is unique to this run
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # set after setuid, which clears it
    if seccomp is not None:
        _load_filter(seccomp)  # a failure raises: no run without the filter the status promised
    _serve(spec, channel)


# ---------------------------------------------------------------------------------------------
# Plain data: the only thing that crosses between the submission and the judge.
#
# A value is sent as tagged JSON: {"v": scalar}, {"float": "nan"}, {"int": "hex digits"},
# {"list"|"tuple"|"set"|"frozenset": [items]}, {"dict": [[key, value], ...]}, {"bytes": latin-1
# text}, {"complex": [re, im]}, or {"ref": n}, a handle on an object that stays where it lives.
# Instances of subclasses of the built-in types cross as the built-in value they hold, read through
# the base type's own methods (``int.__index__``, ``list.__iter__`` ...), so a subclass's ``__eq__``
# or ``__iter__`` never runs in the judge nor decides what is sent.

MAX_ITEMS, MAX_DEPTH = 100_000, 30
MAX_LINE = 32 << 20  # bytes of one message
_BASES = (bool, int, float, str, bytes, complex, list, tuple, dict, set, frozenset)


class _TooBig(Exception):
    pass


def encode(value, ref, budget=None, depth=0):
    """``value`` as tagged plain data; what is not plain data becomes ``{"ref": ref(value)}``.

    Args:
        value: any object.
        ref: object -> int, the handle of a value that does not cross (None: such values raise).
        budget: [items left], shared by one call tree (None: ``MAX_ITEMS``).
        depth: nesting so far.
    """
    if budget is None:
        budget = [MAX_ITEMS]
        try:
            return encode(value, ref, budget, 0)
        except (_TooBig, RecursionError, ValueError, OverflowError):
            if ref is None:
                raise TypeError("too large or too deep to send as plain data") from None
            return {"ref": ref(value)}
    budget[0] -= 1
    if budget[0] < 0 or depth > MAX_DEPTH:
        raise _TooBig
    if value is None:
        return {"v": None}
    base = next((b for b in _BASES if isinstance(value, b)), None)
    if base is bool:
        return {"v": value is True}
    if base is int:
        number = int.__index__(value)
        return {"v": number} if -(2 ** 63) < number < 2 ** 63 else {"int": format(number, "x")}
    if base is float:
        number = float.__float__(value)
        return {"v": number} if number - number == 0 else {"float": float.__repr__(number)}
    if base is str:
        return {"v": str.__str__(value)}
    if base is bytes:
        return {"bytes": bytes(bytes.__iter__(value)).decode("latin-1")}
    if base is complex:
        number = complex.__complex__(value)
        return {"complex": [encode(number.real, ref, budget, depth + 1), encode(number.imag, ref, budget, depth + 1)]}
    if base in (list, tuple, set, frozenset):
        items = list(base.__iter__(value))
        return {base.__name__: [encode(v, ref, budget, depth + 1) for v in items]}
    if base is dict:
        pairs = list(dict.items(value))
        return {"dict": [[encode(k, ref, budget, depth + 1), encode(v, ref, budget, depth + 1)] for k, v in pairs]}
    if ref is None:
        raise TypeError(f"a {type(value).__name__} is not plain data")
    return {"ref": ref(value)}


class Malformed(Exception):
    """A message the other side's harness cannot have written."""


def decode(obj, resolve, depth=0):
    """The value of tagged plain data: fresh built-in objects only; ``{"ref": n}`` -> ``resolve(n)``.

    Raises ``Malformed`` for anything ``encode`` does not write.

    Args:
        obj: one tagged value, as read from JSON.
        resolve: int -> the object a handle stands for.
        depth: nesting so far.
    """
    if type(obj) is not dict or len(obj) != 1 or depth > MAX_DEPTH + 1:
        raise Malformed("not a tagged value")
    (tag, data), = obj.items()
    if tag == "v":
        if type(data) in (type(None), bool, int, str) or (type(data) is float and data - data == 0):
            return data
    elif tag == "float":
        if data in ("nan", "inf", "-inf"):
            return float(data)
    elif tag == "int":
        if type(data) is str and _is_hex_integer(data):
            return int(data, 16)
    elif tag == "bytes":
        if type(data) is str and all(ord(c) < 256 for c in data):
            return data.encode("latin-1")
    elif tag == "complex":
        if type(data) is list and len(data) == 2:
            parts = [decode(v, resolve, depth + 1) for v in data]
            if all(type(p) in (int, float) for p in parts):
                return complex(parts[0], parts[1])
    elif tag in ("list", "tuple", "set", "frozenset"):
        if type(data) is list:
            items = [decode(v, resolve, depth + 1) for v in data]
            try:
                return {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[tag](items)
            except TypeError:  # an unhashable item in a set
                raise Malformed("unhashable set item") from None
    elif tag == "dict":
        if type(data) is list and all(type(p) is list and len(p) == 2 for p in data):
            try:
                return {decode(k, resolve, depth + 1): decode(v, resolve, depth + 1) for k, v in data}
            except TypeError:
                raise Malformed("unhashable dict key") from None
    elif tag == "ref":
        if type(data) is int and data >= 0:
            return resolve(data)
    raise Malformed(f"bad {tag!r} value")


def _is_hex_integer(text: str) -> bool:
    # Lower-case hex digits only (int() would also take "0x", "_", spaces and other digits such as
    # "²" in base 10). Hex, because int() limits the digits of decimal strings, not of hex ones.
    digits = text[1:] if text.startswith("-") else text
    return 0 < len(digits) <= 100_000 and all(c in "0123456789abcdef" for c in digits)


class Channel:
    """One direction each way of JSON lines over two pipe ends."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.read_fd, self.write_fd, self.buffer = read_fd, write_fd, b""

    def send(self, message: dict) -> None:
        data = (json.dumps(message, allow_nan=False) + "\n").encode()
        while data:
            data = data[os.write(self.write_fd, data):]

    def receive(self):
        """The next message (a dict), or None at end of file."""
        while b"\n" not in self.buffer:
            if len(self.buffer) > MAX_LINE:
                raise Malformed("a message too long")
            chunk = os.read(self.read_fd, 1 << 16)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        try:
            message = json.loads(line, parse_constant=_no_constant)
        except (ValueError, RecursionError) as err:
            raise Malformed(f"not JSON: {str(err)[:80]}") from None
        if type(message) is not dict:
            raise Malformed("not a JSON object")
        return message


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


# ---------------------------------------------------------------------------------------------
# The job's side: runs the submission, then answers the judge's requests about its objects.


def _serve(spec: dict, channel: Channel) -> None:
    """Execute the submission; then, by mode, send one result ("script", "grader") or serve calls
    ("asserts") until the judge is done. Nothing sent here is trusted by the judge."""
    namespace: dict = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(spec["code"], "solution.py", "exec"), namespace)
    except BaseException as err:  # SystemExit too: exiting before the tests run passes nothing
        _flush()
        channel.send({"stage": "code", "error": f"{type(err).__name__}: {err}"[:500]})
        return
    _flush()
    if spec["mode"] == "script":
        channel.send({"stage": "done"})
    elif spec["mode"] == "grader":
        channel.send(_grade(spec, namespace))
    else:
        _answer_calls(namespace, channel)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()  # the judge may kill this process: keep what the submission printed
        except BaseException:  # noqa: BLE001 - a closed or replaced stream
            pass


def _grade(spec: dict, namespace: dict) -> dict:
    grade = namespace.get("grade")
    if not callable(grade):
        return {"stage": "grader", "error": "the grader source defines no grade(sample, item) function"}
    try:
        value = float(grade(spec["sample"], spec["item"]))
    except BaseException as err:  # noqa: BLE001
        return {"stage": "grader", "error": f"{type(err).__name__}: {err}"[:500]}
    return {"stage": "done", "value": value if value - value == 0 else None,
            "error": None if value - value == 0 else f"grade returned {value}"}


def _answer_calls(namespace: dict, channel: Channel) -> None:
    objects: list = []

    def ref(value) -> int:
        objects.append(value)
        return len(objects) - 1

    names, defined = {}, []
    for name, value in namespace.items():
        if name.startswith("__") or not name.isidentifier():
            continue
        if type(value) is type(sys) and value.__name__ in getattr(sys, "stdlib_module_names", ()):
            names[name] = {"module": value.__name__}  # the judge imports its own copy
        else:
            names[name] = encode(value, ref)
        code = getattr(value, "__code__", None)
        if (code is not None and code.co_filename == "solution.py") or (
                isinstance(value, type) and value.__module__ == "__main__"):
            defined.append(name)
    channel.send({"stage": "ready", "names": names, "defined": defined})
    while True:
        request = channel.receive()
        if request is None:
            return
        channel.send(_answer(request, objects, ref))
        _flush()


def _changed(argument):
    """A list, dict or set argument as it is after the call (None for others or unsendable)."""
    if type(argument) not in (list, dict, set):
        return None
    try:
        return encode(argument, None)
    except TypeError:
        return None


def _answer(request: dict, objects: list, ref) -> dict:
    """Apply one operation of the judge to one of this side's objects; the answer as plain data."""
    def resolve(n):
        return objects[n]

    try:
        target = objects[request["ref"]]
        op = request["op"]
        if op == "call":
            args = [decode(a, resolve) for a in request["args"]]
            kwargs = {k: decode(v, resolve) for k, v in request["kwargs"].items()}
            value = target(*args, **kwargs)
            # Arguments the function may have changed in place travel back with the answer.
            after = [_changed(a) for a in args]
            kwafter = {k: _changed(v) for k, v in kwargs.items()}
            return {"value": encode(value, ref), "args": after, "kwargs": kwafter}
        if op == "getattr":
            value = getattr(target, request["name"])
        elif op == "getitem":
            value = target[decode(request["key"], resolve)]
        elif op == "contains":
            value = decode(request["key"], resolve) in target
        elif op == "eq":
            value = target == decode(request["key"], resolve)
        elif op == "len":
            value = len(target)
        elif op == "iter":
            value = list(target)
        elif op in ("str", "repr"):
            value = str(target) if op == "str" else repr(target)
        else:
            return {"raise": "TypeError", "message": f"unknown operation {op!r}"}
        return {"value": encode(value, ref)}
    except BaseException as err:  # noqa: BLE001 - the judge re-raises it in the test
        return {"raise": type(err).__name__, "message": str(err)[:300]}


# ---------------------------------------------------------------------------------------------
# The judge's side: runs in the boot process, which the submission cannot reach (a pid namespace
# away, another uid or not dumpable), and holds the tests, which never enter the job.


class ProtocolError(BaseException):
    """The job answered something its harness cannot have written. Not an ``Exception``, so that a
    test's ``except Exception`` does not hide it; and the judge remembers it anyway."""


class JobEnded(BaseException):
    """The job's process ended (it crashed, exited or was killed) while a test was asking it."""


class Remote:
    """An object of the submission that is not plain data, seen from the judge.

    Calling it, reading an attribute or an item, ``len``, ``iter``, ``str`` and ``in`` ask the job
    and get plain data (or another ``Remote``) back. It is always truthy and equals only a
    ``Remote`` the job says it equals: an object never equals plain data, whatever its ``__eq__``
    would claim, so "an object equal to everything" passes no test.
    """

    __slots__ = ("_ref", "_judge")

    def __init__(self, ref: int, judge: "Judge") -> None:
        object.__setattr__(self, "_ref", ref)
        object.__setattr__(self, "_judge", judge)

    def __call__(self, *args, **kwargs):
        return self._judge.call(self, args, kwargs)

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return self._judge.ask(self, "getattr", name=name)

    def __getitem__(self, key):
        return self._judge.ask(self, "getitem", key=self._judge.encode(key))

    def __contains__(self, item) -> bool:
        return self._judge.ask(self, "contains", bool, key=self._judge.encode(item))

    def __len__(self) -> int:
        return self._judge.ask(self, "len", int)

    def __iter__(self):
        return iter(self._judge.ask(self, "iter", list))

    def __str__(self) -> str:
        return self._judge.ask(self, "str", str)

    def __repr__(self) -> str:
        return self._judge.ask(self, "repr", str)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Remote):
            return False
        return self._judge.ask(self, "eq", bool, key=self._judge.encode(other))

    def __ne__(self, other) -> bool:
        return not self.__eq__(other)

    def __bool__(self) -> bool:
        return True

    def __hash__(self) -> int:
        return hash(("remote", self._ref))


class RemoteError(Exception):
    """An exception raised in the submission whose type is not a built-in exception."""


class Judge:
    """Asks the job about its objects on behalf of the tests."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        #: The first ProtocolError or JobEnded: from then on every request fails, and the run is void.
        self.broken: BaseException | None = None

    def encode(self, value):
        return encode(value, lambda v: v._ref if isinstance(v, Remote) else _not_plain(v))

    def decode(self, obj):
        try:
            return decode(obj, lambda n: Remote(n, self))
        except Malformed as err:
            self.broken = self.broken or ProtocolError(str(err))
            raise self.broken from None

    def request(self, message: dict) -> dict:
        if self.broken is None:
            try:
                self.channel.send(message)
                answer = self.channel.receive()
            except Malformed as err:
                self.broken = ProtocolError(str(err))
            except OSError:  # the job closed its end (EPIPE)
                self.broken = JobEnded()
            else:
                if answer is None:
                    self.broken = JobEnded()
                elif "raise" in answer:
                    return self._raise(answer)
                elif "value" not in answer:
                    self.broken = ProtocolError("an answer without a value")
                else:
                    return answer
        raise self.broken

    def _raise(self, answer: dict):
        name, text = answer.get("raise"), answer.get("message")
        if set(answer) != {"raise", "message"} or type(name) is not str or type(text) is not str:
            self.broken = ProtocolError("malformed exception")
            raise self.broken
        kind = getattr(builtins, name, None)
        if not (isinstance(kind, type) and issubclass(kind, Exception)):
            kind = RemoteError
        raise kind(text)

    def ask(self, target: Remote, op: str, kind: type | None = None, **fields):
        value = self.decode(self.request({"ref": target._ref, "op": op, **fields})["value"])
        if kind is not None and type(value) is not kind:
            raise TypeError(f"{op} of a submitted object gave a {type(value).__name__}, not a {kind.__name__}")
        return value

    def call(self, target: Remote, args: tuple, kwargs: dict):
        for key in kwargs:
            if type(key) is not str:
                raise TypeError("keyword names are strings")
        answer = self.request({"ref": target._ref, "op": "call", "args": [self.encode(a) for a in args],
                               "kwargs": {k: self.encode(v) for k, v in kwargs.items()}})
        after, kwafter = answer.get("args"), answer.get("kwargs")
        if type(after) is not list or len(after) != len(args) or type(kwafter) is not dict:
            self.broken = ProtocolError("malformed call answer")
            raise self.broken
        for original, new in [*zip(args, after), *((kwargs.get(k), v) for k, v in kwafter.items())]:
            if new is not None and type(original) in (list, dict, set):
                _update(original, self.decode(new))
        return self.decode(answer["value"])


def _not_plain(value):
    raise TypeError(f"a {type(value).__name__} cannot be passed to the submission (not plain data)")


def _update(original, new) -> None:
    """Apply the job's in-place change of an argument to the judge's copy."""
    if type(new) is not type(original):
        raise TypeError("the submission changed an argument's type")
    if type(original) is list:
        original[:] = new
    else:
        original.clear()
        original.update(new)


def _judge(spec: dict, tests: list, channel: Channel) -> dict | None:
    """The report of the run, decided here; None when the job died before finishing (no report)."""
    judge = Judge(channel)
    try:
        first = channel.receive()
    except Malformed as err:
        return {"stage": "protocol", "error": f"malformed message: {err}"}
    if first is None:
        return None
    if spec["mode"] != "asserts" or first.get("stage") != "ready":
        if spec["mode"] == "asserts" and first.get("stage") != "code":
            return {"stage": "protocol", "error": "the submission sent something other than its names"}
        return first  # the parent checks it like any untrusted report
    try:
        names, defined = first.get("names"), first.get("defined")
        if type(names) is not dict or type(defined) is not list or not all(type(n) is str for n in defined):
            raise ProtocolError("malformed names")
        namespace = {"__name__": "__main__", "__builtins__": builtins}
        for name, value in names.items():
            if not name.isidentifier() or name.startswith("__"):
                raise ProtocolError(f"bad name {name[:40]!r}")
            if type(value) is dict and set(value) == {"module"}:
                namespace[name] = _stdlib_module(value["module"])
            else:
                namespace[name] = judge.decode(value)
        result = {"stage": "done", "passed": _run_tests(tests, namespace), "error": None}
        if spec.get("guard"):
            stubbed = {**namespace, **{n: _stub for n in defined if n in namespace}}
            result["guard_passed"] = _run_tests(tests, stubbed)
        if judge.broken is not None:
            raise judge.broken
        return result
    except ProtocolError as err:
        return {"stage": "protocol", "error": f"malformed message: {err}"}
    except JobEnded:
        return None


def _stdlib_module(name):
    if type(name) is not str or name not in getattr(sys, "stdlib_module_names", ()):
        raise ProtocolError("not a standard module")
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ProtocolError(f"module {name} does not import here") from None


def _stub(*args, **kwargs):
    """The guard's stand-in for a function or class the submission defined."""
    return None


def _run_tests(tests: list, namespace: dict) -> list:
    """Each test (Python statements) run in a copy of ``namespace``: passed unless it raises."""
    passed = []
    for test in tests:
        scope = dict(namespace)
        try:
            exec(compile(test, "test.py", "exec"), scope)
            passed.append(True)
        except (ProtocolError, JobEnded):
            raise  # not the test's verdict: the run itself is void
        except BaseException:  # noqa: BLE001 - a test that raises anything, SystemExit included, fails
            passed.append(False)
    return passed


def _kill_job(pid: int) -> None:
    """SIGTERM from the parent: kill the job (pid 1 of its namespace, so all of it) and reap it
    here, so that no zombie is left for the host's init."""
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os._exit(137)


def _read_exactly(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            raise EOFError("stdin ended early")
        data += chunk
    return data


def _read_to_end(fd: int) -> bytes:
    parts = []
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)


def main() -> None:
    result_fd = int(sys.argv[-1])
    # The job is a fork of this process: nothing it must not see may be in this process's memory
    # before the fork. So only the spec is read now (its length comes first); the tests follow on
    # stdin and are read by the judge after the fork.
    spec = json.loads(_read_exactly(0, int(_read_exactly(0, 16))))
    devnull = os.open(os.devnull, os.O_RDONLY)
    status = {"network_isolated": False, "filesystem_isolated": False, "pid_isolated": False,
              "ipc_isolated": False, "keyring_isolated": False, "user_namespace": False, "uid": spec.get("uid"),
              "seccomp": False}
    seccomp = _seccomp_filter() if spec["isolate"] else None
    status["seccomp"] = seccomp is not None
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
    requests_in, requests_out = os.pipe()  # judge -> job
    answers_in, answers_out = os.pipe()  # job -> judge
    pid = os.fork()
    if pid == 0:
        # The job holds only its two pipe ends: not the result pipe, not stdin (the tests).
        for fd in (result_fd, requests_out, answers_in):
            os.close(fd)
        os.dup2(devnull, 0)
        code = 0
        try:
            _job(spec, Channel(requests_in, answers_out), status["filesystem_isolated"], seccomp)
        except BaseException:  # noqa: BLE001 - the job's failure is reported by its missing result
            code = 1
        _flush()
        os._exit(code)
    os.close(requests_in)
    os.close(answers_out)
    signal.signal(signal.SIGTERM, lambda *_: _kill_job(pid))
    # Not dumpable: a process of the same uid (no pid namespace, no uid of its own) cannot ptrace
    # the judge or read its memory through /proc.
    _libc.prctl(PR_SET_DUMPABLE, 0)
    tests = json.loads(_read_to_end(0) or b"[]")
    os.dup2(devnull, 0)
    _set_limits({name: spec["limits"][name] for name in ("RLIMIT_AS", "RLIMIT_CPU") if name in spec["limits"]})
    report = _judge(spec, tests, Channel(answers_in, requests_out))
    if report is not None:
        os.write(result_fd, (json.dumps(report) + "\n").encode())
    try:
        os.kill(pid, signal.SIGKILL)  # pid 1 of its namespace: all it started goes with it
    except ProcessLookupError:
        pass
    _, wait_status = os.waitpid(pid, 0)
    code = 0 if report is not None else os.waitstatus_to_exitcode(wait_status)
    os._exit(code if code >= 0 else 128 - code)  # killed by signal s: 128 + s, as a shell reports it


if __name__ == "__main__":
    main()
