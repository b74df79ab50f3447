"""AdaptiveThreads: torch threads follow the cores other processes leave free."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import fit_tiny
from lightning.pytorch.loggers import CSVLogger

from rftlab import GRPO, RolloutDataModule
from rftlab.callbacks import AdaptiveThreads
from rftlab.callbacks.threads import CpuWindow, busy_ticks, choose_threads, others_busy_cores, own_ticks
from rftlab.core.plugins import DEFAULT_CALLBACKS
from rftlab.tasks import Arithmetic

# /proc/stat columns: user nice system idle iowait irq softirq steal guest guest_nice
STAT = """cpu  1000 10 200 5000 40 3 7 0 0 0
cpu0 600 10 100 2000 20 2 4 0 0 0
cpu1 400 0 100 3000 20 1 3 0 0 0
intr 12345 0 0
ctxt 999
"""


def test_busy_ticks_adds_the_running_columns_of_the_chosen_cpus():
    # busy = user + nice + system + irq + softirq + steal; idle and iowait are left out
    assert busy_ticks(STAT) == 1000 + 10 + 200 + 3 + 7 + 0
    assert busy_ticks(STAT, cpus=[0]) == 600 + 10 + 100 + 2 + 4
    assert busy_ticks(STAT, cpus=[1]) == 400 + 100 + 1 + 3
    assert busy_ticks(STAT, cpus=[0, 1]) == busy_ticks(STAT)
    assert busy_ticks(STAT, cpus=[5]) == 0


def test_own_ticks_reads_user_system_and_children_after_a_command_name_with_spaces():
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime cutime cstime ...
    text = "4242 (python my job) R 1 2 3 4 5 6 7 8 9 10 111 22 3 4 20 0 2 0 100"
    assert own_ticks(text) == 111 + 22 + 3 + 4


def test_others_busy_cores_is_the_machine_minus_this_process_per_second():
    # 300 ticks busy in 2 s at 100 ticks/s, 100 of them ours: others kept 1 core busy
    assert others_busy_cores(300, 100, 2.0, 100.0) == pytest.approx(1.0)
    assert others_busy_cores(100, 120, 1.0, 100.0) == 0.0  # counters read a tick apart: never negative
    assert others_busy_cores(100, 0, 0.0, 100.0) == 0.0


@pytest.mark.parametrize(("cores", "busy", "low", "high", "expected"), [
    (2, 0.0, 1, 2, 2),   # idle machine: every core
    (2, 0.3, 1, 2, 2),   # a little background work: 1.7 free rounds to 2
    (2, 0.6, 1, 2, 1),   # 1.4 free rounds to 1
    (2, 1.0, 1, 2, 1),   # one other busy process: one thread
    (2, 2.0, 1, 2, 1),   # nothing free: never below min_threads
    (8, 3.0, 1, 8, 5),
    (8, 0.0, 1, 4, 4),   # never above max_threads
    (2, 1.0, 2, 2, 2),   # fixed bounds keep the count
])
def test_choose_threads(cores, busy, low, high, expected):
    assert choose_threads(cores, busy, low, high) == expected


def test_bad_bounds_are_refused_naming_the_parameter():
    with pytest.raises(ValueError, match="min_threads"):
        AdaptiveThreads(min_threads=0)
    with pytest.raises(ValueError, match="max_threads"):
        AdaptiveThreads(min_threads=2, max_threads=1)
    with pytest.raises(ValueError, match="min_window"):
        AdaptiveThreads(min_window=0)


def write_proc(root, busy0, busy1, own):
    (root / "self").mkdir(parents=True, exist_ok=True)
    (root / "stat").write_text(f"cpu  {busy0 + busy1} 0 0 100 0 0 0 0 0 0\n"
                               f"cpu0 {busy0} 0 0 50 0 0 0 0 0 0\ncpu1 {busy1} 0 0 50 0 0 0 0 0 0\n")
    (root / "self" / "stat").write_text(f"1 (x) R 1 1 1 0 -1 0 0 0 0 0 {own} 0 0 0 20 0 1 0 1")


def test_cpu_window_measures_other_processes_between_two_reads(tmp_path, monkeypatch):
    window = CpuWindow(proc=tmp_path)
    window.cpus, window.ticks_per_second = [0, 1], 100.0
    clock = iter([10.0, 10.2, 12.0])
    monkeypatch.setattr("rftlab.callbacks.threads.time.monotonic", lambda: next(clock))
    write_proc(tmp_path, 0, 0, 0)
    assert window.available
    window.start()
    write_proc(tmp_path, 100, 100, 50)
    assert window.close(min_seconds=0.5) is None  # 0.2 s: too short, stays open
    write_proc(tmp_path, 150, 150, 100)  # 2 s: 300 ticks busy, 100 ours -> 1 core busy elsewhere
    assert window.close(min_seconds=0.5) == pytest.approx(1.0)


def test_cpu_window_is_unavailable_without_proc(tmp_path):
    assert not CpuWindow(proc=tmp_path / "absent").available


class FakeWindow:
    """A CpuWindow whose readings are given: cores other processes kept busy, one per close()."""

    def __init__(self, readings):
        self.readings, self.cpus, self.available = list(readings), [0, 1], True

    def start(self):
        pass

    def elapsed(self):
        return 10.0

    def close(self, min_seconds):
        return self.readings.pop(0) if self.readings else 0.0


def tiny_fit(tmp_path, callback, steps=3):
    module = GRPO(policy="tiny", lr=1e-2, log=dict(validate_at_start=False))
    dm = RolloutDataModule(task=Arithmetic(num_test=0), rewards={"one": lambda completions, **_: [1.0] * len(completions)},
                           prompts_per_step=1, num_generations=2, max_new_tokens=3)
    seen = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(torch.get_num_threads())

    logger = CSVLogger(str(tmp_path), name="threads")
    fit_tiny(module, dm, steps, tmp_path, logger=logger, callbacks=[callback, Record()])
    return seen, logger


def test_threads_drop_while_another_process_is_busy_and_come_back(tmp_path, monkeypatch):
    monkeypatch.setenv("RFTLAB_ADAPTIVE_THREADS", "1")
    torch.set_num_threads(2)
    callback = AdaptiveThreads()
    # train start: another process busy on one core; after step 1: still; after step 2: gone
    callback.window = FakeWindow([1.0, 1.0, 0.0, 0.0])
    seen, logger = tiny_fit(tmp_path, callback)
    assert seen == [1, 1, 2]
    assert torch.get_num_threads() == 2  # restored when the fit ends
    metrics = (tmp_path / "threads" / "version_0" / "metrics.csv").read_text()
    assert "cpu/threads" in metrics and "cpu/others_busy" in metrics


def test_never_above_the_count_the_fit_started_with(tmp_path, monkeypatch):
    monkeypatch.setenv("RFTLAB_ADAPTIVE_THREADS", "1")
    torch.set_num_threads(1)
    callback = AdaptiveThreads()
    callback.window = FakeWindow([0.0, 0.0, 0.0])
    seen, _ = tiny_fit(tmp_path, callback, steps=2)
    assert seen == [1, 1]


def test_the_environment_switch_turns_it_off(tmp_path, monkeypatch):
    monkeypatch.setenv("RFTLAB_ADAPTIVE_THREADS", "0")
    torch.set_num_threads(2)
    callback = AdaptiveThreads()
    callback.window = FakeWindow([2.0, 2.0, 2.0])
    seen, _ = tiny_fit(tmp_path, callback, steps=2)
    assert seen == [2, 2]


def test_the_real_counters_on_this_machine_keep_the_count_within_bounds(tmp_path, monkeypatch):
    monkeypatch.setenv("RFTLAB_ADAPTIVE_THREADS", "1")
    torch.set_num_threads(2)
    callback = AdaptiveThreads(min_window=0.01)
    if not callback.window.available:
        pytest.skip("no /proc here")
    seen, _ = tiny_fit(tmp_path, callback)
    assert set(seen) <= {1, 2} and callback.others_busy is not None and callback.others_busy >= 0.0


def test_every_algorithm_gets_it_by_default():
    assert DEFAULT_CALLBACKS.get("adaptive_threads") is AdaptiveThreads


class BrokenWindow(FakeWindow):
    """Reads its given readings, then fails as an unreadable /proc would."""

    def close(self, min_seconds):
        if self.readings:
            return self.readings.pop(0)
        raise OSError("/proc/stat: permission denied")


def test_unreadable_counters_warn_and_leave_the_count_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("RFTLAB_ADAPTIVE_THREADS", "1")
    torch.set_num_threads(2)
    callback = AdaptiveThreads()
    callback.window = BrokenWindow([1.0])  # busy at the start: one thread, then the counters fail
    with pytest.warns(UserWarning, match="CPU counters unreadable"):
        seen, _ = tiny_fit(tmp_path, callback, steps=3)
    assert seen == [1, 1, 1]  # kept as it was when the counters failed
    assert torch.get_num_threads() == 2  # and still restored when the fit ends
