"""The code sandbox against hostile completions: every attack scores 0 and is contained.

Each attack completion also defines the function the tests check (``add``), correctly, so a 0
shows the attack itself was stopped, not that the code was wrong. After every run: the trainer
(this process) is alive and unharmed, no process of the run's uid is left, and nothing was written
outside the run's temp dir (which is itself removed).
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from rftlab.rewards import CodeExecution, RewardSet, Sandbox, SandboxError, find_interpreter
from rftlab.rewards.sandbox import _uids_of_processes

ADD = "def add(a, b):\n    return a + b\n"
TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]
IS_ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def reward():
    return CodeExecution(timeout=1.5, memory_mb=256, max_processes=8, max_output_bytes=4096)


def _leftovers(uid: int | None) -> list[int]:
    return [pid for pid, owner, _ in _uids_of_processes() if uid is not None and owner == uid]


def _sandbox_dirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "rftlab-sandbox-*")))


def run_attack(reward: CodeExecution, attack: str) -> tuple[float, object]:
    """Score ``attack`` followed by a correct ``add``; check containment; return (score, result)."""
    before = _sandbox_dirs()
    start = time.perf_counter()
    score = reward([textwrap.dedent(attack) + "\n" + ADD], tests=[TESTS])[0]
    elapsed = time.perf_counter() - start
    result = reward.last_results[0]
    assert elapsed < reward.sandbox.timeout + 3.0, f"the run took {elapsed:.1f} s"
    assert _leftovers(result.uid) == [], "a process of the sandbox uid is still running"
    assert _sandbox_dirs() <= before, "the sandbox temp dir was not removed"
    return score, result


def test_benign_code_scores_and_is_isolated(reward):
    score = reward([f"Here you go:\n```python\n{ADD}```"], tests=[TESTS + ["assert add(2, 2) == 5"]])[0]
    result = reward.last_results[0]
    assert score == pytest.approx(2 / 3)
    assert result.completed and result.passed == [True, True, False]
    assert result.network_isolated and result.filesystem_isolated and result.pid_isolated
    if IS_ROOT:
        assert result.uid is not None and result.uid >= 1_000_000  # an unprivileged uid of its own


# ---- the attack cases of the issue, one test each -------------------------------------------------
def test_attack_infinite_loop(reward):
    score, result = run_attack(reward, "while True:\n    pass")
    assert score == 0.0 and result.violation == "timeout"


def test_attack_allocate_10_gb(reward):
    score, result = run_attack(reward, "blob = bytearray(10 * 1024 ** 3)")
    assert score == 0.0 and "MemoryError" in result.error


def test_attack_fork_bomb(reward):
    score, result = run_attack(reward, """
        import os
        while True:
            os.fork()
    """)
    assert score == 0.0


def test_attack_write_outside_the_temp_dir(reward, tmp_path):
    marker = f"rftlab-pwned-{os.getpid()}-{time.time_ns()}"
    targets = [os.path.join(tempfile.gettempdir(), marker), str(tmp_path / marker), f"/etc/{marker}",
               str(Path.home() / marker), str(Path(__file__).resolve().parent / marker)]
    score, result = run_attack(reward, f"""
        for path in {targets!r}:
            with open(path, "w") as f:
                f.write("pwned")
    """)
    assert score == 0.0
    for path in targets:
        assert not os.path.exists(path), f"the sandbox wrote {path}"


def test_attack_read_etc_passwd(reward):
    score, result = run_attack(reward, "secret = open('/etc/passwd').read()\nassert 'root' in secret")
    assert score == 0.0 and "FileNotFoundError" in result.error


def test_attack_read_environment_secrets(reward, monkeypatch):
    monkeypatch.setenv("RFTLAB_TEST_SECRET", "hunter2")
    score, result = run_attack(reward, f"""
        import os
        leaked = os.environ.get("RFTLAB_TEST_SECRET")
        if leaked is None:  # try the trainer's environment through /proc
            leaked = open("/proc/{os.getpid()}/environ").read()
        assert "hunter2" in leaked
    """)
    assert score == 0.0 and "hunter2" not in (result.error or "")


def test_attack_socket_to_the_internet(reward):
    score, result = run_attack(reward, """
        import socket
        socket.create_connection(("1.1.1.1", 53), timeout=1).close()
    """)
    assert score == 0.0 and "OSError" in result.error


def test_attack_socket_to_a_local_port(reward):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    try:
        score, result = run_attack(reward, f"""
            import socket
            socket.create_connection(("127.0.0.1", {port}), timeout=1).close()
        """)
        with pytest.raises(socket.timeout):
            server.accept()  # nothing ever connected
    finally:
        server.close()
    assert score == 0.0


def test_attack_print_100_mb(reward):
    score, result = run_attack(reward, "print('x' * 100_000_000)")
    assert score == 0.0 and result.violation == "output_limit"
    assert len(result.stdout) + len(result.stderr) <= reward.sandbox.max_output_bytes


def test_attack_kill_the_parent(reward):
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: received.append(1))
    try:
        score, result = run_attack(reward, f"""
            import os, signal
            for pid in (os.getppid(), {os.getpid()}, {os.getppid()}):
                if pid > 1:
                    os.kill(pid, signal.SIGUSR1)
            os.killpg(0, signal.SIGUSR1)
        """)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert score == 0.0
    assert received == [], "the trainer process received the sandbox's signal"


def test_attack_sys_exit_before_the_tests(reward):
    score, result = run_attack(reward, ADD + "import sys\nsys.exit(0)")
    assert score == 0.0 and result.error == "SystemExit: 0"


def test_attack_os_exit_before_the_tests(reward):
    score, result = run_attack(reward, ADD + "import os\nos._exit(0)")
    assert score == 0.0 and result.violation == "crashed"


def test_attack_background_process_left_running(reward):
    score, result = run_attack(reward, """
        import os, subprocess, sys
        if os.fork() == 0:
            os.setsid()
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            os._exit(0)
        raise SystemExit(0)
    """)
    assert score == 0.0  # and run_attack checked that no process of the run's uid is left


def test_trainer_survives_through_the_reward_set(reward):
    rewards = RewardSet({"tests": reward}, on_error="zero")
    attacks = ["while True: pass", "import os\nos._exit(3)", "raise MemoryError", "```python\n" + ADD + "```"]
    result = rewards.score(attacks, ["p"] * 4, [{"tests": TESTS}] * 4)
    assert result.total.tolist() == [0.0, 0.0, 0.0, 1.0]
    assert result.errors == {"tests": 0}


# ---- set-up, interpreter, configuration --------------------------------------------------------
def test_interpreter_is_runnable_by_an_unprivileged_user():
    python, prefix = find_interpreter()
    if IS_ROOT:
        # Root's own venv lives under /root (mode 700): the sandbox must not pick an interpreter
        # the unprivileged uid cannot execute when no private root can be built.
        out = subprocess.run([python, "-I", "-c", "print(1)"], user=65534, group=65534, capture_output=True)
        assert out.returncode == 0, f"{python} does not run as nobody: {out.stderr.decode()}"


def test_missing_interpreter_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="python="):
        Sandbox(python=str(tmp_path / "nope"))
    fake = tmp_path / "fake-python"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(SandboxError, match="does not run"):
        Sandbox(python=str(fake)).run("x = 1")


@pytest.mark.parametrize(
    "kwargs, name",
    [(dict(timeout=0), "timeout"), (dict(memory_mb=10), "memory_mb"), (dict(max_processes=0), "max_processes"),
     (dict(cpu_seconds=0), "cpu_seconds"), (dict(max_output_bytes=0), "max_output_bytes")],
)
def test_bad_sandbox_configuration(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Sandbox(**kwargs)


def test_grader_mode_and_script_mode():
    sandbox = Sandbox(timeout=3)
    graded = sandbox.run("def grade(sample, item):\n    return float(sample['x'] == item['y'])",
                         mode="grader", sample={"x": 2}, item={"y": 2})
    assert graded.completed and graded.value == 1.0
    script = sandbox.run("print('hello')", mode="script")
    assert script.completed and script.stdout == "hello\n"
    with pytest.raises(ValueError, match="mode"):
        sandbox.run("x = 1", mode="shell")


@pytest.mark.skipif(not IS_ROOT or not os.path.exists("/usr/bin/python3"), reason="needs root to become nobody")
def test_unprivileged_trainer_gets_user_namespaces(tmp_path):
    """The sandbox as a non-root trainer would run it: through a user namespace, no uid switch."""
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--net", "true"], user=65534, group=65534,
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip("this kernel does not allow unprivileged user namespaces")
    work = tempfile.mkdtemp(prefix="rftlab-unpriv-")
    try:
        os.chmod(work, 0o755)
        source = Path(__file__).resolve().parents[2] / "rftlab" / "rewards"
        for name in ("sandbox.py", "_sandbox_boot.py", "checks.py"):
            shutil.copy(source / name, work)
        driver = Path(work) / "driver.py"
        driver.write_text(textwrap.dedent("""
            import json, sys
            sys.path.insert(0, sys.argv[1])
            import sandbox
            box = sandbox.Sandbox(timeout=3)
            good = box.run("def f():\\n    return 1", ["assert f() == 1"])
            bad = box.run("open('/etc/passwd').read()", ["assert True"])
            print(json.dumps({"good": good.passed, "bad": bad.completed, "uid": good.uid,
                              "flags": [good.network_isolated, good.filesystem_isolated, good.pid_isolated]}))
        """))
        out = subprocess.run(["/usr/bin/python3", "-I", str(driver), work], user=65534, group=65534,
                             capture_output=True, env={"TMPDIR": "/tmp"}, timeout=60)
        assert out.returncode == 0, out.stderr.decode()
        import json

        report = json.loads(out.stdout)
        assert report["good"] == [True] and report["bad"] is False and report["uid"] is None
        assert report["flags"] == [True, True, True]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_sandbox_reports_when_isolation_is_off():
    result = Sandbox(timeout=3, isolate=False).run("import os\nopen('/etc/hostname').read()", ["assert True"])
    assert not result.network_isolated and not result.filesystem_isolated
    assert result.completed and result.passed == [True]
    if IS_ROOT:
        assert result.uid is not None  # still not root
    assert sys.executable  # the trainer is untouched
