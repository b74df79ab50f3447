"""W&B trouble never stops or hangs a run: it logs offline after one warning.

No test touches the real network: the "server" is a closed port on 127.0.0.1.
"""

from __future__ import annotations

import socket
import time
import warnings

import pytest

import rftlab.callbacks.wandb as rwandb
from rftlab import GRPO, RolloutDataModule
from rftlab.callbacks.wandb import RFTWandbLogger, make_wandb_logger
from rftlab.tasks import Arithmetic
from helpers import fit_tiny
from reliability_helpers import parity
from wandb_records import complete, find_run_files, finish_offline_run, read_history


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: connections are refused


@pytest.fixture
def online_env(monkeypatch, tmp_path):
    """WANDB_MODE=online with a bogus key and a server that refuses connections."""
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setattr(rwandb, "_warned", set())  # "once per process": start counting afresh


def _offline_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "logging to W&B offline instead" in str(w.message)]


def test_unreachable_server_falls_back_to_offline_with_one_warning_and_the_run_completes(online_env, tmp_path):
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger = make_wandb_logger(project="rftlab-tests", save_dir=str(tmp_path))
        second = make_wandb_logger(project="rftlab-tests", save_dir=str(tmp_path / "other"))
    messages = _offline_warnings(caught)
    assert len(messages) == 1 and "unreachable" in messages[0], messages
    assert logger.mode == second.mode == "offline"

    module = GRPO(policy="tiny", lr=1e-2, lora=True, log={"validate_at_start": False})
    dm = RolloutDataModule(task=Arithmetic(num_test=0), rewards={"parity": parity}, prompts_per_step=2, num_generations=2,
                           max_new_tokens=3)
    fit_tiny(module, dm, 2, logger=logger)
    finish_offline_run()
    assert time.perf_counter() - start < 120, "no waiting for an unreachable server"
    history = read_history(complete(find_run_files(tmp_path)[0]))
    assert [row["reward/mean"] for row in history if "reward/mean" in row], "metrics were logged offline"


def test_online_without_credentials_logs_offline(online_env, monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY")
    empty = tmp_path / "netrc"
    empty.write_text("")
    monkeypatch.setenv("NETRC", str(empty))
    with pytest.warns(UserWarning, match="needs credentials"):
        logger = RFTWandbLogger(project="rftlab-tests", save_dir=str(tmp_path), offline=False)
    assert logger.mode == "offline"


def test_a_failing_wandb_init_is_retried_offline(online_env, monkeypatch, tmp_path):
    import wandb

    monkeypatch.setattr(rwandb, "online_possible", lambda *a, **k: True)  # the probe says yes...
    real_init = wandb.init
    calls = []

    def init(**kwargs):  # ... but the server rejects the key
        calls.append(kwargs.get("mode"))
        if kwargs.get("mode") != "offline":
            raise wandb.errors.CommError("401 Unauthorized: invalid API key")
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", init)
    logger = RFTWandbLogger(project="rftlab-tests", save_dir=str(tmp_path))
    assert logger.mode == "online"
    with pytest.warns(UserWarning, match="wandb.init failed \\(CommError: 401 Unauthorized"):
        run = logger.experiment
    assert logger.mode == "offline" and calls == [None, "offline"]
    logger.log_metrics({"reward/mean": 0.5}, step=1)
    assert run.settings.mode in ("offline", "dryrun")
    finish_offline_run()
