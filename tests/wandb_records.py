"""Read W&B offline run files (``run-*.wandb``) back into Python, for tests.

wandb (0.31) ships no public reader for the transaction log it writes in
offline mode, so this module decodes it directly.

File format (verified against files written by wandb 0.31.0 / wandb-core):

* A 7-byte file header: ``b":W&B"`` + magic ``0xBEE1`` as little-endian
  uint16 (bytes ``e1 be``) + a 1-byte version (``0``), i.e.
  ``struct.pack("<4sHB", b":W&B", 0xBEE1, 0)`` == ``b":W&B\\xe1\\xbe\\x00"``.
* After it, a LevelDB-style log. The file is split into 32 KiB (32768-byte)
  blocks counted from offset 0 of the *file*, so the first block holds the
  file header plus 32761 bytes of log. Each physical record has a 7-byte
  header ``<IHB``: checksum, payload length, type (FULL=1, FIRST=2,
  MIDDLE=3, LAST=4). A physical record never crosses a block boundary; a
  block trailer shorter than 7 bytes is zero padding.
* Unlike LevelDB, the checksum is a plain, *unmasked* IEEE CRC-32
  (``zlib.crc32``) over the type byte followed by the payload -- not a
  masked CRC-32C.
* Each reassembled logical record is a serialized
  ``wandb.proto.wandb_internal_pb2.Record``.

Values in history/summary/config items are JSON strings (``value_json``).
Logged dicts and media (e.g. a ``wandb.Table``) are flattened into items
whose ``nested_key`` is the path (``["tbl", "_type"]``); the readers here
rebuild them into nested dicts. A slash in a logged key (``"reward/mean"``)
stays a single key element and is not split.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from wandb.proto import wandb_internal_pb2 as pb

Record = pb.Record

__all__ = [
    "BLOCK_SIZE",
    "FILE_HEADER",
    "Record",
    "TableRef",
    "WandbFileError",
    "find_run_files",
    "iter_records",
    "read_config",
    "read_history",
    "read_records",
    "read_run_info",
    "read_summary",
    "read_tables",
]

BLOCK_SIZE = 32 * 1024
"""Size of a log block, counted from the start of the file."""

_FILE_HEADER_STRUCT = struct.Struct("<4sHB")
FILE_IDENT = b":W&B"
FILE_MAGIC = 0xBEE1
FILE_VERSION = 0
FILE_HEADER = _FILE_HEADER_STRUCT.pack(FILE_IDENT, FILE_MAGIC, FILE_VERSION)
"""The 7 bytes every ``.wandb`` file starts with: ``b":W&B\\xe1\\xbe\\x00"``."""

_RECORD_HEADER_STRUCT = struct.Struct("<IHB")
RECORD_HEADER_SIZE = _RECORD_HEADER_STRUCT.size  # 7

_ZERO, FULL, FIRST, MIDDLE, LAST = 0, 1, 2, 3, 4
# CRC of each type byte, used as the starting value of the payload CRC.
_TYPE_CRC = {t: zlib.crc32(bytes([t])) for t in (FULL, FIRST, MIDDLE, LAST)}


class WandbFileError(ValueError):
    """The file is not a readable W&B transaction log."""


def find_run_files(root: str | Path) -> list[Path]:
    """Return every ``*.wandb`` file below ``root`` (recursively), sorted.

    ``root`` is typically the ``dir=`` passed to ``wandb.init``; the files
    live in ``<root>/wandb/offline-run-*/run-<id>.wandb``.
    """
    return sorted(p for p in Path(root).rglob("*.wandb") if p.is_file())


def _iter_payloads(data: bytes, *, verify_crc: bool) -> Iterator[bytes]:
    """Yield the reassembled logical records of a whole ``.wandb`` file."""
    if len(data) < len(FILE_HEADER):
        raise WandbFileError(f"file too short for a W&B header ({len(data)} bytes)")
    ident, magic, version = _FILE_HEADER_STRUCT.unpack_from(data, 0)
    if ident != FILE_IDENT or magic != FILE_MAGIC:
        raise WandbFileError(f"bad W&B file header {data[:7]!r}, expected {FILE_HEADER!r}")
    if version != FILE_VERSION:
        raise WandbFileError(f"unsupported W&B log version {version}")

    pos = len(FILE_HEADER)
    end = len(data)
    pending: list[bytes] | None = None  # fragments of a FIRST..LAST record
    while pos < end:
        block_left = BLOCK_SIZE - pos % BLOCK_SIZE
        if block_left < RECORD_HEADER_SIZE:
            # Block trailer: zero padding, too small for a record header.
            pos += block_left
            continue
        if end - pos < RECORD_HEADER_SIZE:
            raise WandbFileError(f"truncated record header at offset {pos}")
        crc, length, rtype = _RECORD_HEADER_STRUCT.unpack_from(data, pos)
        if rtype == _ZERO and length == 0:
            # Preallocated/zeroed space (LevelDB "zero type"): skip the block.
            pos += block_left
            continue
        if RECORD_HEADER_SIZE + length > block_left:
            raise WandbFileError(f"record at offset {pos} crosses a block boundary")
        start = pos + RECORD_HEADER_SIZE
        if start + length > end:
            raise WandbFileError(f"truncated record at offset {pos}")
        chunk = data[start : start + length]
        if rtype not in _TYPE_CRC:
            raise WandbFileError(f"unknown record type {rtype} at offset {pos}")
        if verify_crc and zlib.crc32(chunk, _TYPE_CRC[rtype]) != crc:
            raise WandbFileError(f"checksum mismatch in record at offset {pos}")
        pos = start + length

        if rtype == FULL:
            if pending is not None:
                raise WandbFileError(f"FULL record inside a fragmented one at offset {start - 7}")
            yield chunk
        elif rtype == FIRST:
            if pending is not None:
                raise WandbFileError(f"FIRST record inside a fragmented one at offset {start - 7}")
            pending = [chunk]
        else:  # MIDDLE or LAST
            if pending is None:
                raise WandbFileError(f"stray continuation record at offset {start - 7}")
            pending.append(chunk)
            if rtype == LAST:
                yield b"".join(pending)
                pending = None
    if pending is not None:
        raise WandbFileError("file ends inside a fragmented record")


def iter_records(path: str | Path, *, verify_crc: bool = True) -> Iterator[Record]:
    """Yield each ``Record`` protobuf stored in the ``.wandb`` file at ``path``.

    Raises ``WandbFileError`` on a bad header, checksum mismatch (when
    ``verify_crc``) or truncated/malformed framing. Read only finished runs:
    a run still being written may end in a partial record.
    """
    data = Path(path).read_bytes()
    for payload in _iter_payloads(data, verify_crc=verify_crc):
        record = pb.Record()
        record.ParseFromString(payload)
        yield record


def read_records(path: str | Path, *, verify_crc: bool = True) -> list[Record]:
    """Return every ``Record`` protobuf in the ``.wandb`` file, in file order."""
    return list(iter_records(path, verify_crc=verify_crc))


def _records_of(path: str | Path, kind: str) -> Iterator[Any]:
    for record in iter_records(path):
        if record.WhichOneof("record_type") == kind:
            yield getattr(record, kind)


def _item_path(item: Any) -> list[str]:
    """Key path of a HistoryItem / SummaryItem / ConfigItem."""
    if item.nested_key:
        return list(item.nested_key)
    return [item.key]


def _set_path(target: dict[str, Any], keys: Sequence[str], value: Any) -> None:
    node = target
    for k in keys[:-1]:
        child = node.get(k)
        if not isinstance(child, dict):
            child = node[k] = {}
        node = child
    node[keys[-1]] = value


def _del_path(target: dict[str, Any], keys: Sequence[str]) -> None:
    node: Any = target
    for k in keys[:-1]:
        node = node.get(k) if isinstance(node, dict) else None
        if node is None:
            return
    if isinstance(node, dict):
        node.pop(keys[-1], None)


def _items_to_dict(items: Any) -> dict[str, object]:
    out: dict[str, Any] = {}
    for item in items:
        _set_path(out, _item_path(item), json.loads(item.value_json))
    return out


def read_history(path: str | Path) -> list[dict[str, object]]:
    """Return one dict per ``history`` record (one per committed step).

    Keys are the logged keys (``"reward/mean"`` stays one key); flattened
    nested values such as a logged ``wandb.Table`` are rebuilt into nested
    dicts (``row["tbl"]["_type"] == "table-file"``). Values are
    JSON-decoded, so ints stay ints and ``NaN``/``Infinity`` become floats.
    W&B's own ``_step``, ``_runtime`` and ``_timestamp`` are included.
    """
    return [_items_to_dict(h.item) for h in _records_of(path, "history")]


def read_summary(path: str | Path) -> dict[str, object]:
    """Return the final run summary: all ``summary`` updates/removals applied in order.

    Includes W&B-internal keys (``_step``, ``_runtime``, ``_timestamp``,
    ``_wandb``); nested values are rebuilt into dicts.
    """
    summary: dict[str, Any] = {}
    for rec in _records_of(path, "summary"):
        for item in rec.update:
            _set_path(summary, _item_path(item), json.loads(item.value_json))
        for item in rec.remove:
            _del_path(summary, _item_path(item))
    return summary


def _apply_config(config: dict[str, Any], rec: Any) -> None:
    for item in rec.update:
        _set_path(config, _item_path(item), json.loads(item.value_json))
    for item in rec.remove:
        _del_path(config, _item_path(item))


def read_config(path: str | Path, *, include_internal: bool = False) -> dict[str, object]:
    """Return the run config: the ``run`` record's config plus later ``config`` updates.

    Values are JSON-decoded. In the transaction log W&B stores them
    unwrapped (unlike ``config.yaml``, which uses ``{"value": ...}``
    wrappers), so a user value that is itself ``{"value": x}`` is returned
    as-is. The internal ``_wandb`` entry is dropped unless
    ``include_internal``.
    """
    config: dict[str, Any] = {}
    for record in iter_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            _apply_config(config, record.run.config)
        elif kind == "config":
            _apply_config(config, record.config)
    if not include_internal:
        config.pop("_wandb", None)
    return config


def read_run_info(path: str | Path) -> dict[str, object]:
    """Return identifying fields from the first ``run`` record.

    Keys: ``run_id``, ``entity``, ``project``, ``group``, ``job_type``,
    ``name`` and ``display_name`` (the same value: ``wandb.init(name=...)``),
    ``notes``, ``tags``, ``host``, ``sweep_id``, ``start_time`` (Unix
    seconds as float, or None), ``resumed``.
    """
    for run in _records_of(path, "run"):
        start = None
        if run.HasField("start_time"):
            start = run.start_time.seconds + run.start_time.nanos / 1e9
        return {
            "run_id": run.run_id,
            "entity": run.entity,
            "project": run.project,
            "group": run.run_group,
            "job_type": run.job_type,
            "name": run.display_name,
            "display_name": run.display_name,
            "notes": run.notes,
            "tags": list(run.tags),
            "host": run.host,
            "sweep_id": run.sweep_id,
            "start_time": start,
            "resumed": run.resumed,
        }
    raise WandbFileError(f"no run record in {path}")


@dataclass(frozen=True)
class TableRef:
    """A ``wandb.Table`` found in the history of an offline run."""

    step: int | None
    """``_step`` of the history row that logged it."""
    key: str
    """Logged key (top-level history key)."""
    meta: dict[str, object]
    """The decoded ``table-file`` dict (``path``, ``nrows``, ``ncols``, ``sha256``, ...)."""
    file: Path
    """Absolute path of the table JSON (``<run dir>/files/<meta["path"]>``)."""

    def load(self) -> dict[str, Any]:
        """Read the table JSON: ``{"columns": [...], "data": [[...], ...]}``."""
        return json.loads(self.file.read_text())


def read_tables(path: str | Path) -> list[TableRef]:
    """Return every top-level history value with ``"_type": "table-file"``.

    The table contents are written next to the log, under
    ``<run dir>/files/``; use ``TableRef.load()`` to read them.
    """
    files_dir = Path(path).resolve().parent / "files"
    tables: list[TableRef] = []
    for row in read_history(path):
        step = row.get("_step")
        for key, value in row.items():
            if isinstance(value, dict) and value.get("_type") == "table-file":
                tables.append(
                    TableRef(
                        step=step if isinstance(step, int) else None,
                        key=key,
                        meta=value,
                        file=files_dir / str(value["path"]),
                    )
                )
    return tables


def finish_offline_run() -> None:
    """End the current W&B run and wait until its offline file is completely written.

    ``wandb.finish()`` can return before wandb-core has flushed the last records (seen under load:
    an empty or partial ``.wandb`` file); ``wandb.teardown()`` waits for the service to exit.
    """
    import wandb

    wandb.finish()
    wandb.teardown()


def complete(path: str | Path, seconds: float = 60) -> Path:
    """``path`` once wandb-core (another process) has flushed the file to its end (bounded wait).

    Args:
        path: a ``run-*.wandb`` file.
        seconds: how long to wait before letting the parse error through.
    """
    deadline = time.monotonic() + seconds
    while True:
        try:
            list(iter_records(path))
            return Path(path)
        except WandbFileError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
