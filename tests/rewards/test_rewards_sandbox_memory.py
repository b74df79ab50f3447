"""Memory that a sample holds outside its address-space limit is refused or capped.

``RLIMIT_AS`` counts mapped memory only. A memory file, a System V segment, a tmpfs of the
sample's own or a bigger pipe holds memory that no mapping shows. The sandbox's seccomp filter
refuses those, and the private /tmp is a tmpfs of ``disk_mb``. Each attack reports how many MiB it
held; each is also run without isolation, where it must hold more than the limit (so the attack is
real and the filter is what stops it). After each, an honest sample still scores 1.0.
"""

from __future__ import annotations

import os
import re
import textwrap

import pytest

from rftlab.rewards import CodeExecution

ADD = "def add(a, b):\n    return a + b\n"
TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]
MEMORY_MB = 128

ATTACKS = {
    # Memory files: each is a file (RLIMIT_FSIZE caps each one), but many of them add up.
    "memory files": """
        fds = []
        for i in range(12):
            try:
                fd = os.memfd_create(f"m{i}")
                for _ in range(16):
                    os.write(fd, CHUNK)
                    held.append(1)
            except OSError:
                break
            fds.append(fd)
    """,
    # System V shared memory, created and filled through one short-lived mapping at a time.
    "System V segments": """
        libc.shmat.restype = ctypes.c_void_p
        for i in range(12):
            ident = libc.shmget(0, 16 << 20, 0o1000 | 0o600)
            if ident < 0:
                break
            address = libc.shmat(ident, None, 0)
            if address in (None, ctypes.c_void_p(-1).value):
                break
            ctypes.memset(address, 1, 16 << 20)
            libc.shmdt(ctypes.c_void_p(address))
            held.extend([1] * 16)
    """,
    # A tmpfs of its own, in new user and mount namespaces: it has no size cap.
    "a private tmpfs": """
        uid, gid = os.getuid(), os.getgid()
        libc.prctl(4, 1)  # PR_SET_DUMPABLE, so that /proc/self/uid_map is ours to write
        if libc.unshare(0x10000000 | 0x20000) == 0:
            for path, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
                with open(f"/proc/self/{path}", "w") as f:
                    f.write(text)
        if libc.mount(b"none", b"/tmp", b"tmpfs", 0, None) == 0:
            for i in range(12):
                with open(f"/tmp/f{i}", "wb") as f:
                    for _ in range(16):
                        f.write(CHUNK)
                        held.append(1)
    """,
    # The shared /tmp: many files, each under the file-size limit.
    "many files in /tmp": """
        for i in range(12):
            try:
                with open(f"/tmp/f{i}", "wb") as f:
                    for _ in range(16):
                        f.write(CHUNK)
                        f.flush()
                        held.append(1)
            except OSError:
                break
    """,
}
PRELUDE = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
CHUNK = b"x" * (1 << 20)
held = []
"""
REPORT = "\nprint('HELD', len(held))\n"


def _held(reward, attack: str) -> int:
    reward([PRELUDE + textwrap.dedent(attack) + REPORT + ADD], tests=[TESTS])
    result = reward.last_results[0]
    found = re.search(r"HELD (\d+)", result.stdout)
    assert found, f"the attack did not run to its report: {result}"
    return int(found[1])


@pytest.fixture(scope="module")
def reward():
    return CodeExecution(timeout=10.0, memory_mb=MEMORY_MB, max_processes=8)


@pytest.mark.parametrize("name", list(ATTACKS))
def test_memory_outside_the_address_space_limit_is_refused(reward, name):
    if not reward.sandbox.run("x = 1").seccomp:
        pytest.skip("libseccomp is not installed here: the sandbox reports seccomp=False")
    held = _held(reward, ATTACKS[name])
    # The private /tmp is a tmpfs of disk_mb (64 MiB by default); nothing else may hold memory.
    allowed = reward.sandbox.disk_mb if name == "many files in /tmp" else 0
    assert held <= allowed, f"{name}: the sample held {held} MiB outside its {MEMORY_MB} MiB limit"
    assert reward([ADD], tests=[TESTS]) == [1.0]


@pytest.mark.parametrize("name", ["memory files", "System V segments", "a private tmpfs"])
def test_without_the_filter_the_attack_holds_more_than_the_limit(name):
    # The same attacks with isolation off (no namespaces, no filter): they do escape RLIMIT_AS.
    unfiltered = CodeExecution(timeout=10.0, memory_mb=MEMORY_MB, max_processes=8, isolate=False)
    try:
        held = _held(unfiltered, ATTACKS[name])
    finally:
        if name == "System V segments":
            _remove_leftover_segments(unfiltered.last_results[0].uid)
    assert held > MEMORY_MB, f"{name} held only {held} MiB without the filter: the attack is not real"


def _remove_leftover_segments(uid: int | None) -> None:
    # Without an IPC namespace the segments outlive the run: remove those of the run's uid.
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/sysvipc/shm") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    owner = uid if uid is not None else os.getuid()
    for row in rows:  # columns: key shmid perms size cpid lpid nattch uid ...
        if int(row[7]) == owner and int(row[3]) == 16 << 20:
            libc.shmctl(int(row[1]), 0, None)  # IPC_RMID


def test_namespace_clones_and_bigger_pipes_are_refused(reward):
    if not reward.sandbox.run("x = 1").seccomp:
        pytest.skip("libseccomp is not installed here")
    probe = textwrap.dedent("""
        import ctypes, fcntl, os, threading
        libc = ctypes.CDLL(None, use_errno=True)
        # clone(CLONE_NEWUSER | SIGCHLD) as a raw syscall, the way around unshare()
        child = libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0)
        if child == 0:
            os._exit(0)
        r, w = os.pipe()
        try:
            fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ
            bigger = True
        except OSError:
            bigger = False
        box = []
        t = threading.Thread(target=box.append, args=(1,))
        t.start(); t.join()
        pid = os.fork()
        if pid == 0:
            os._exit(3)
        forked = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        def add(a, b):
            return (child, bigger, box, forked)
    """)
    reward([probe], tests=[["assert add(1, 2) == (-1, False, [1], 3)"]])
    assert reward.last_results[0].passed == [True], reward.last_results[0]
