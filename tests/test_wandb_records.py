"""Round-trip a real offline wandb run through tests/wandb_records.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from wandb_records import (
    BLOCK_SIZE,
    FILE_HEADER,
    WandbFileError,
    find_run_files,
    read_config,
    read_history,
    read_records,
    read_run_info,
    read_summary,
    read_tables,
)

STEPS = [
    {"loss": 1.5, "reward/mean": 0.25, "reward/std": 0.0, "count": 3, "label": "first"},
    {"loss": 0.75, "reward/mean": 0.5, "reward/std": 0.125, "count": 7, "label": "second"},
    {"loss": 0.375, "reward/mean": 1.0, "reward/std": 0.5, "count": 11, "label": "third"},
]
# Larger than several 32 KiB blocks: forces FIRST/MIDDLE/LAST fragments.
BLOB = "z" * (3 * BLOCK_SIZE + 123)
TABLE_COLUMNS = ["prompt", "reward"]
TABLE_DATA = [["2+2", 1.0], ["3+5", 0.0]]


@pytest.fixture(scope="module")
def run_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Write one offline run (3 metric steps, a big step, a table) and return its .wandb file."""
    import wandb

    root = tmp_path_factory.mktemp("wandb_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        # Keep all wandb state inside the tmp dir; an unreachable base URL makes any
        # accidental network attempt fail locally instead of leaving the machine.
        for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR",
                    "WANDB_ARTIFACT_DIR"):
            mp.setenv(var, str(root))
        mp.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
        mp.delenv("WANDB_API_KEY", raising=False)

        run = wandb.init(
            mode="offline",
            dir=root,
            project="p",
            group="g",
            job_type="j",
            name="n",
            config={"a": 1},
            settings=wandb.Settings(
                console="off", x_disable_stats=True, x_disable_machine_info=True,
                disable_git=True, x_save_requirements=False,
            ),
        )
        run.config.update({"b": {"value": 2}, "lr": 3e-4})
        for metrics in STEPS:
            run.log(metrics)
        run.log({"blob": BLOB})
        run.log({"samples": wandb.Table(columns=TABLE_COLUMNS, data=TABLE_DATA)})
        run.summary["best_reward"] = 1.0
        wandb.finish()
        wandb.teardown()

    files = find_run_files(root)
    assert len(files) == 1, files
    assert files[0].parent.name.startswith("offline-run-")
    return files[0]


def _user_keys(row: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def test_file_framing(run_file: Path) -> None:
    data = run_file.read_bytes()
    assert data[:7] == FILE_HEADER == b":W&B\xe1\xbe\x00"
    assert len(data) > len(BLOB)  # spans several blocks
    kinds = [r.WhichOneof("record_type") for r in read_records(run_file)]
    assert kinds[0] == "header"
    assert "run" in kinds and kinds.count("history") == len(STEPS) + 2
    assert kinds[-1] == "exit"


def test_history_round_trip(run_file: Path) -> None:
    history = read_history(run_file)
    assert [row["_step"] for row in history] == list(range(len(STEPS) + 2))
    for row, expected in zip(history, STEPS):
        assert _user_keys(row) == expected
        assert type(row["count"]) is int
    assert _user_keys(history[len(STEPS)]) == {"blob": BLOB}


def test_table(run_file: Path) -> None:
    row = read_history(run_file)[-1]
    table = row["samples"]
    assert isinstance(table, dict)
    assert table["_type"] == "table-file"
    assert table["nrows"] == 2 and table["ncols"] == 2
    assert str(table["path"]).startswith("media/table/")

    (ref,) = read_tables(run_file)
    assert ref.key == "samples" and ref.step == len(STEPS) + 1
    assert ref.load() == {"columns": TABLE_COLUMNS, "data": TABLE_DATA}


def test_summary(run_file: Path) -> None:
    summary = read_summary(run_file)
    table = summary.pop("samples")
    assert isinstance(table, dict) and table["_type"] == "table-file"
    assert _user_keys(summary) == {**STEPS[-1], "blob": BLOB, "best_reward": 1.0}
    assert summary["_step"] == len(STEPS) + 1


def test_config(run_file: Path) -> None:
    # User values that are themselves {"value": ...} are not unwrapped.
    assert read_config(run_file) == {"a": 1, "b": {"value": 2}, "lr": 3e-4}
    assert "_wandb" in read_config(run_file, include_internal=True)


def test_run_info(run_file: Path) -> None:
    info = read_run_info(run_file)
    assert info["project"] == "p"
    assert info["group"] == "g"
    assert info["job_type"] == "j"
    assert info["name"] == info["display_name"] == "n"
    assert run_file.name == f"run-{info['run_id']}.wandb"


def test_corruption_is_detected(run_file: Path, tmp_path: Path) -> None:
    data = bytearray(run_file.read_bytes())

    bad_header = tmp_path / "bad_header.wandb"
    bad_header.write_bytes(b"XXXX" + bytes(data[4:]))
    with pytest.raises(WandbFileError, match="header"):
        read_records(bad_header)

    flipped = tmp_path / "flipped.wandb"
    data[20] ^= 0xFF  # inside the first record's payload
    flipped.write_bytes(bytes(data))
    with pytest.raises(WandbFileError, match="checksum"):
        read_records(flipped)

    truncated = tmp_path / "truncated.wandb"
    truncated.write_bytes(run_file.read_bytes()[:-3])
    with pytest.raises(WandbFileError, match="truncated"):
        read_records(truncated)
