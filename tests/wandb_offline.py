"""Weights & Biases offline, for the tests: an environment in which ``wandb`` neither reaches the
network nor asks for a login, and the runs it wrote, read back from their ``.wandb`` files.

A ``.wandb`` file is the run's transaction log, the records ``wandb sync`` uploads: a 7-byte header
(``:W&B``, magic ``0xBEE1``, version 0), then LevelDB-log chunks in 32 KiB blocks (a 7-byte chunk
header: CRC-32 seeded by the chunk type, length, type full/first/middle/last; a block's tail shorter
than a header is padding), each record a ``wandb_internal_pb2.Record``. wandb 0.31 has no Python
reader of it any more (``wandb.sdk.internal.datastore`` is gone; wandb-core reads it), and an
offline run writes no ``wandb-summary.json`` or ``wandb-history.jsonl``, so it is read here; a
change of the format fails the header or checksum check by name rather than reading wrong values.
"""

from __future__ import annotations

import contextlib
import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

_HEADER = struct.Struct("<4sHB")  # the file's: ident, magic, version
_CHUNK = struct.Struct("<IHB")  # each chunk's: CRC-32, length, type
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4

#: cleared so that nothing of the calling environment points wandb at a server, a run or a model upload
_CLEARED = (
    "WANDB_API_KEY",
    "WANDB_BASE_URL",
    "WANDB_ENTITY",
    "WANDB_PROJECT",
    "WANDB_RUN_ID",
    "WANDB_RESUME",
    "WANDB_NAME",
    "WANDB_RUN_GROUP",
    "WANDB_LOG_MODEL",
    "WANDB_WATCH",
    "WANDB_DISABLED",
)


@contextlib.contextmanager
def offline_env(root: Path) -> Iterator[None]:
    """While open, wandb runs offline with every folder of its own under ``root`` (no login, no
    network, no console capture, no git or system-metrics probing): a ``MonkeyPatch`` of its own,
    which a test's ``monkeypatch.undo()`` leaves in place. Skips the test where wandb is absent.

    wandb reads its environment once per process, when its session starts, and ignores later
    changes; so the session is torn down on entry and exit, and each test starts one of its own.
    """
    wandb = pytest.importorskip("wandb")
    wandb.teardown()
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name in _CLEARED:
            monkeypatch.delenv(name, raising=False)
        for name, value in {
            "WANDB_MODE": "offline",
            "WANDB_SILENT": "true",
            "WANDB_CONSOLE": "off",
            "WANDB_DISABLE_GIT": "true",
            "WANDB_DISABLE_CODE": "true",
            "WANDB_X_DISABLE_STATS": "true",
            "WANDB_ERROR_REPORTING": "false",
        }.items():
            monkeypatch.setenv(name, value)
        for name, sub in {
            "WANDB_DIR": "dir",  # where a run without ``dir`` (DDKTrainer's) writes its wandb/ folder
            "WANDB_CONFIG_DIR": "config",
            "WANDB_CACHE_DIR": "cache",
            "WANDB_DATA_DIR": "data",
            "WANDB_ARTIFACT_DIR": "artifacts",
        }.items():
            (root / "wandb-home" / sub).mkdir(parents=True, exist_ok=True)
            monkeypatch.setenv(name, str(root / "wandb-home" / sub))
        try:
            yield
        finally:
            wandb.teardown()


def records(path: Path) -> Iterator[Any]:
    """The ``wandb_internal_pb2.Record`` s of the ``.wandb`` file ``path``, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    header = _HEADER.unpack_from(data)
    assert header == (b":W&B", 0xBEE1, 0), f"{path}: not a .wandb file of the known format; header {header}"
    pos, parts = _HEADER.size, b""
    while pos + _CHUNK.size <= len(data):
        if _BLOCK - pos % _BLOCK < _CHUNK.size:  # the block's padding
            pos += _BLOCK - pos % _BLOCK
            continue
        crc, length, kind = _CHUNK.unpack_from(data, pos)
        if (crc, length, kind) == (0, 0, 0):  # zeros: the end of what was written
            break
        chunk = data[pos + _CHUNK.size : pos + _CHUNK.size + length]
        pos += _CHUNK.size + length
        assert kind in (_FULL, _FIRST, _MIDDLE, _LAST), f"{path}: chunk type {kind} at byte {pos}"
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad checksum before byte {pos}"
        parts += chunk
        if kind in (_FULL, _LAST):
            record = pb.Record()  # type: ignore[attr-defined]  # generated protobuf: no stubs
            record.ParseFromString(parts)
            parts = b""
            yield record


@dataclass
class OfflineRun:
    """One ``offline-run-<time>-<id>`` folder: the run's id, project and name (its ``run`` record),
    its config (that record's and the ``config`` records') and its history, one ``{key: value}`` per ``log`` call (``_step``
    included)."""

    folder: Path
    start_us: int = 0  # the run's start, microseconds since the epoch
    run_id: str = ""
    project: str = ""
    name: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    def series(self, key: str, step: str = "_step") -> list[tuple[int, Any]]:
        """``(row[step], value)`` of each history row holding ``key`` (``step``: W&B's ``_step``, or
        the step metric a caller logs, such as transformers' ``train/global_step``)."""
        return [(row[step], row[key]) for row in self.history if key in row]


def _items(items: Any) -> dict[str, Any]:
    """``{key: value}`` of a record's items (``key`` or ``nested_key``, ``value_json``)."""
    return {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in items}


def offline_runs(wandb_dir: Path) -> list[OfflineRun]:
    """The offline runs under ``wandb_dir`` (a ``wandb/`` folder), oldest first (by start time:
    wandb names a run's folder by the second it started, adding ``-1`` where that folder exists)."""
    runs = []
    for folder in sorted(wandb_dir.glob("offline-run-*")):
        (path,) = folder.glob("run-*.wandb")
        run = OfflineRun(folder)
        for rec in records(path):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                run.run_id, run.project, run.name = rec.run.run_id, rec.run.project, rec.run.display_name
                run.start_us = rec.run.start_time.ToMicroseconds()
                run.config.update(_items(rec.run.config.update))
            elif kind == "config":
                run.config.update(_items(rec.config.update))
            elif kind == "history":
                run.history.append(_items(rec.history.item))
        runs.append(run)
    return sorted(runs, key=lambda r: (r.start_us, len(r.folder.name), r.folder.name))
