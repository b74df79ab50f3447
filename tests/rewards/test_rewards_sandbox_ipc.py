"""Nothing a sample creates outlives it or reaches the trainer: System V IPC objects and keys.

Each attack runs through the public reward (``CodeExecution``) with a correct solution after it;
then the trainer (this process) looks for what the attack left behind, and an honest sample still
scores 1.0.
"""

from __future__ import annotations

import ctypes
import os
import textwrap

import pytest

from rftlab.rewards import CodeExecution

ADD = "def add(a, b):\n    return a + b\n"
TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]
IPC_CREAT, IPC_RMID = 0o1000, 0
libc = ctypes.CDLL(None, use_errno=True)
KEY = 0x5EED0000 + os.getpid() % 0xFFFF  # a System V key of this test run


@pytest.fixture(scope="module")
def reward():
    return CodeExecution(timeout=2.0, memory_mb=256, max_processes=8, max_output_bytes=4096)


def _honest_still_scores(reward):
    assert reward([ADD], tests=[TESTS])[0] == 1.0


def _attack(reward, code: str) -> float:
    return reward([textwrap.dedent(code) + "\n" + ADD], tests=[TESTS])[0]


@pytest.mark.parametrize("kind, create, find, remove", [
    ("shared memory", "libc.shmget(KEY, 1 << 20, 0o1000 | 0o666)", lambda: libc.shmget(KEY, 0, 0),
     lambda ident: libc.shmctl(ident, IPC_RMID, None)),
    ("semaphore set", "libc.semget(KEY, 4, 0o1000 | 0o666)", lambda: libc.semget(KEY, 0, 0),
     lambda ident: libc.semctl(ident, 0, IPC_RMID)),
    ("message queue", "libc.msgget(KEY, 0o1000 | 0o666)", lambda: libc.msgget(KEY, 0),
     lambda ident: libc.msgctl(ident, IPC_RMID, None)),
])
def test_system_v_objects_die_with_the_sample(reward, kind, create, find, remove):
    attack = f"""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        KEY = {KEY}
        assert {create} >= 0, "the attack could not create its object"
    """
    _attack(reward, attack)
    leftover = find()
    if leftover >= 0:
        remove(leftover)  # do not leave it on the machine either way
    assert leftover == -1, f"a {kind} created in the sandbox survives it, visible to the trainer"
    assert reward.last_results[0].ipc_isolated
    _honest_still_scores(reward)


def _add_session_key(description: bytes, payload: bytes) -> int:
    """add_key("user", description, payload) in this process's session keyring (-3)."""
    call = {"x86_64": 248, "aarch64": 217}.get(os.uname().machine)
    if call is None:
        pytest.skip("add_key syscall number unknown on this architecture")
    key = libc.syscall(call, b"user", description, payload, len(payload), -3)
    if key < 0:
        pytest.skip(f"keyrings are not available here (errno {ctypes.get_errno()})")
    return key


@pytest.mark.parametrize("how", ["search the session keyring", "read by id", "list the session keyring"])
def test_the_trainers_keys_are_out_of_reach(reward, how):
    key = _add_session_key(b"rftlab-test-secret", b"hunter2")
    keyctl = {"x86_64": 250, "aarch64": 219}[os.uname().machine]
    steps = {
        "search the session keyring": f"found = libc.syscall({keyctl}, 10, -3, b'user', b'rftlab-test-secret', 0)",
        "read by id": f"found = {key}",
        "list the session keyring": f"""buf = ctypes.create_string_buffer(4096)
        n = libc.syscall({keyctl}, 11, -3, buf, 4096)
        assert n > 0, "cannot list the session keyring"
        ids = [int.from_bytes(buf.raw[i:i + 4], 'little') for i in range(0, n, 4)]
        assert {key} in ids, "the trainer's key is not in this session keyring"
        found = {key}""",
    }
    attack = f"""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        {steps[how]}
        assert found > 0, "no such key"
        buf = ctypes.create_string_buffer(256)
        n = libc.syscall({keyctl}, 11, found, buf, 256)
        assert n > 0 and b"hunter2" in buf.raw, "the key could not be read"
        print("LEAKED", buf.raw[:n])
    """
    try:
        score = _attack(reward, attack)
        result = reward.last_results[0]
        assert score == 0.0, f"the sample read the trainer's key ({how})"
        assert "hunter2" not in result.stdout and "hunter2" not in (result.error or "")
        assert result.keyring_isolated
    finally:
        libc.syscall(keyctl, 3, key)  # KEYCTL_REVOKE: leave no secret behind
    _honest_still_scores(reward)


def test_a_key_in_the_run_uids_own_keyring_is_refused(reward):
    # The user keyring of a uid outlives every process of that uid; a key added there by a sample
    # would stay in the kernel after it. The sandbox's seccomp filter refuses the key calls.
    if not reward.sandbox.run("x = 1").seccomp:
        pytest.skip("libseccomp is not installed here: the sandbox reports seccomp=False")
    call = {"x86_64": 248, "aarch64": 217}.get(os.uname().machine)
    if call is None:
        pytest.skip("add_key syscall number unknown on this architecture")
    attack = f"""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        key = libc.syscall({call}, b"user", b"left-behind", b"x" * 1000, 1000, -4)  # KEY_SPEC_USER_KEYRING
        errno = ctypes.get_errno()
        def add(a, b):
            return (key, errno)
    """
    reward([textwrap.dedent(attack)], tests=[["assert add(1, 2) == (-1, 1)"]])
    assert reward.last_results[0].passed == [True], reward.last_results[0]
    _honest_still_scores(reward)
