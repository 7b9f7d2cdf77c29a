"""The on-disk cache of ``ddk.data.pack_domains`` (no public names): its layout, opening a
finished cache, and the atomic commit of a build.

Cache layout (``cache_dir`` given), one folder per key::

    <cache_dir>/<key>/meta.json            names, shapes, seq_len, eos id, tokenizer hash, sha256s
    <cache_dir>/<key>/train_<i>.bin        (n_i, seq_len) int32 little-endian, domain index i
    <cache_dir>/<key>/validation_<i>.bin   (m_i, seq_len) int32 little-endian

A build writes into ``<cache_dir>/.tmp-<key>-*`` and renames it with ``os.replace``, so a killed
build leaves no half cache (only a ``.tmp-*`` folder, safe to delete).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ddk._io import DIR_MODE
from ddk.data.packed import PackedDomains
from ddk.data.tokens import _DTYPE, _FORMAT, _Windows

__all__: list[str] = []

_VERSION = 1
_META = "meta.json"


def _entry(name: str, windows: _Windows) -> dict[str, Any]:
    return {"file": name, "shape": [windows.windows, windows.L], "sha256": windows.sha256}


def _new_build_folder(root: Path) -> Path:
    """A fresh ``.tmp-<key>-*`` folder next to ``root`` (``<cache_dir>/<key>``, not yet there) to build in."""
    fn = "pack_domains"
    if root.exists():
        raise ValueError(
            f"{fn}: cache folder {root} must hold {_META} (it is not a finished cache); got a folder "
            "without it. Delete the folder to rebuild it."
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{root.name}-", dir=root.parent))
    os.chmod(tmp, DIR_MODE)  # mkdtemp's 0700 would hide the finished cache from a teammate
    return tmp


def _commit(tmp: Path, root: Path, meta: dict[str, Any]) -> None:
    """Write ``meta`` into the built folder ``tmp`` and rename it to ``root``."""
    (tmp / _META).write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    try:
        os.replace(tmp, root)
    except OSError:
        # Another process finished the same key first: its cache is as good as ours.
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / _META).is_file():
            raise


def _open_cache(root: Path, *, key: str, verify: bool) -> tuple[PackedDomains, dict[str, int]]:
    """The finished cache at ``root`` (file sizes checked, sha256s too when ``verify``), memory-mapped,
    and the domains whose validation was capped when it was built (name -> sequences)."""
    fn = "pack_domains"
    try:
        meta = json.loads((root / _META).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{fn}: cache folder {root} must hold a readable {_META}; got {type(e).__name__}: {e}. Delete the folder to rebuild it."
        ) from None
    if meta.get("format") != _FORMAT or meta.get("version") != _VERSION or meta.get("key") != key:
        raise ValueError(
            f"{fn}: cache folder {root} must hold a {_FORMAT} v{_VERSION} cache of key {key}; got {meta.get('format')} "
            f"v{meta.get('version')} key {meta.get('key')}. Delete the folder to rebuild it."
        )
    L = int(meta["seq_len"])
    arrays: dict[str, list[np.ndarray]] = {"train": [], "validation": []}
    for side in ("train", "validation"):
        for entry in meta[side]:
            path = root / entry["file"]
            n, width = (int(s) for s in entry["shape"])
            expected = n * width * _DTYPE.itemsize
            size = path.stat().st_size if path.is_file() else -1
            if size != expected or width != L:
                raise ValueError(
                    f"{fn}: cache file {path} must hold {expected} bytes ({n} x {L} int32); got {size}. "
                    f"The cache is damaged: delete {root} to rebuild it."
                )
            if verify:
                sha = hashlib.sha256()
                with path.open("rb") as f:
                    for block in iter(lambda: f.read(1 << 24), b""):
                        sha.update(block)
                if sha.hexdigest() != entry["sha256"]:
                    raise ValueError(
                        f"{fn}: cache file {path} must have sha256 {entry['sha256']}; got {sha.hexdigest()}. "
                        f"The cache is damaged: delete {root} to rebuild it."
                    )
            arrays[side].append(
                np.memmap(path, dtype=_DTYPE, mode="r", shape=(n, L)) if n else np.empty((0, L), dtype=_DTYPE)
            )
    packed = PackedDomains(
        names=tuple(meta["names"]),
        seq_len=L,
        train=tuple(arrays["train"]),
        validation=tuple(arrays["validation"]),
        eos_token_id=int(meta["eos_token_id"]),
        key=key,
        root=root,
    )
    return packed, dict(meta.get("capped") or {})
