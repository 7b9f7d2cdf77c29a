"""The on-disk cache of ``ddk.data.pack_domains`` (no public names): its layout, opening a
finished cache, and the atomic commit of a build.

Cache layout (``cache_dir`` given), one folder per key::

    <cache_dir>/<key>/meta.json            names, shapes, seq_len, eos id, tokenizer hash, sha256s,
                                           options, and who built it (pid, host, processes, seconds)
    <cache_dir>/<key>/train_<i>.bin        (n_i, seq_len) int32 little-endian, domain index i
    <cache_dir>/<key>/validation_<i>.bin   (m_i, seq_len) int32 little-endian

A build writes into ``<cache_dir>/.tmp-pack-<pid>-*`` (the building process's id) and renames it
to ``<cache_dir>/<key>`` with ``os.replace`` once the key is known, so a killed build leaves no half
cache (only a ``.tmp-*`` folder, safe to delete). A cache built or opened from files by
``pack_files`` also holds ``sources.json``: fingerprints of the sources it came from, of their
identities (paths, sizes, times, inodes) and of their contents (SHA-256s), each with the reading
and packing options, so that a later call with unchanged files opens it without parsing them
(``_find_by_sources``; see ``ddk.data.streaming``).

Every open verifies the cache (``ddk.data.verify``): the first open after its files changed hashes
them against ``meta.json`` and checks every token id below the tokenizer's vocabulary, then writes
the stamp ``<cache_dir>/<key>/verified.json`` that lets later opens compare only each file's size,
times and inode.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ddk._io import DIR_MODE, atomic_write_text, loads_json, read_capped
from ddk.data.mapped import MappedRows, Rows
from ddk.data.packed import PackedDomains
from ddk.data.tokens import _DTYPE, _FORMAT
from ddk.data.verify import check_token_values, verify_cache

__all__: list[str] = []

_VERSION = 1
_META = "meta.json"


def _build_folder(cache_dir: Path) -> Path:
    """A fresh ``.tmp-pack-<pid>-*`` folder in ``cache_dir`` (created if missing) to build in."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-pack-{os.getpid()}-", dir=cache_dir))
    os.chmod(tmp, DIR_MODE)  # mkdtemp's 0700 would hide the finished cache from a teammate
    return tmp


def _check_root(root: Path) -> None:
    """A folder ``<cache_dir>/<key>`` without ``meta.json`` is not a cache: an error naming it."""
    if root.exists() and not (root / _META).is_file():
        raise ValueError(
            f"pack_domains: cache folder {root} must hold {_META} (it is not a finished cache); got a folder "
            "without it. Delete the folder to rebuild it."
        )


def _commit(tmp: Path, root: Path, meta: dict[str, Any]) -> None:
    """Write ``meta`` into the built folder ``tmp`` and rename it to ``root``."""
    _check_root(root)
    (tmp / _META).write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    try:
        os.replace(tmp, root)
    except OSError:
        # Another process finished the same key first: its cache is as good as ours.
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / _META).is_file():
            raise


def _read_meta(root: Path) -> dict[str, Any] | None:
    """The ``meta.json`` of a finished cache folder, or None (missing, unreadable, not ours)."""
    try:
        meta = loads_json(read_capped(root / _META), where=str(root / _META))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == _FORMAT else None


def _finished(cache_dir: Path) -> list[Path]:
    """The finished cache folders of ``cache_dir`` (not the hidden build folders)."""
    try:
        return sorted(p for p in cache_dir.iterdir() if not p.name.startswith(".") and (p / _META).is_file())
    except OSError:
        return []


def _same_options(meta: dict[str, Any], options: dict[str, Any]) -> bool:
    """Whether a cache's ``meta.json`` was packed with ``options`` (all but the records'
    contents: the tokenizer, EOS, sequence length and split options), so that only the records
    can tell it from the cache being asked for."""
    return (
        meta.get("version") == _VERSION
        and meta.get("tokenizer_hash") == options["tokenizer_hash"]
        and meta.get("eos_token_id") == options["eos_token_id"]
        and meta.get("seq_len") == options["seq_len"]
        and meta.get("options") == options["options"]
    )


def _may_hold(cache_dir: Path, options: dict[str, Any]) -> bool:
    """Whether some finished cache of ``cache_dir`` has ``options`` (then scanning the records for
    their key, without tokenizing, may find it built)."""
    return any(_same_options(m, options) for m in map(_read_meta, _finished(cache_dir)) if m is not None)


_SOURCES = "sources.json"
_SOURCES_FORMAT = "ddk.pack_sources"
_SOURCES_KEPT = 64  # fingerprints kept per kind and cache (the newest)
#: the kinds of fingerprint a cache records: the sources' file identities (``stat``: sizes, times,
#: inodes) and their contents (the SHA-256 of their bytes); both with the reading and packing options
SOURCE_KINDS = ("stat", "contents")


def _read_sources(root: Path) -> dict[str, list[str]] | None:
    """The fingerprints recorded in ``root/sources.json`` per kind, or None (none recorded)."""
    try:
        got = loads_json(read_capped(root / _SOURCES), where=str(root / _SOURCES))
    except (OSError, ValueError):
        return None
    if not isinstance(got, dict) or got.get("format") != _SOURCES_FORMAT:
        return None
    return {k: [v for v in got.get(k) or [] if isinstance(v, str)] for k in SOURCE_KINDS}


def _find_by_sources(cache_dir: Path, kind: str, fingerprint: str) -> Path | None:
    """The finished cache recorded as built from sources of this ``kind`` of fingerprint, if any."""
    for root in _finished(cache_dir):
        got = _read_sources(root)
        if got is not None and fingerprint in got[kind]:
            return root
    return None


def _unfingerprinted(cache_dir: Path, options: dict[str, Any]) -> bool:
    """Whether a finished cache of ``options`` records no contents fingerprint (built by
    ``pack_domains``, or before ``pack_files``): only reading the records can tell if it is theirs."""
    return any(
        _same_options(meta, options) and not (_read_sources(root) or {}).get("contents")
        for root in _finished(cache_dir)
        if (meta := _read_meta(root)) is not None
    )


def _sources_json(recorded: dict[str, list[str]]) -> str:
    kept = {k: recorded.get(k, [])[-_SOURCES_KEPT:] for k in SOURCE_KINDS}
    return json.dumps({"format": _SOURCES_FORMAT, **kept}, indent=0) + "\n"


def _merged(old: dict[str, list[str]] | None, new: dict[str, str | None]) -> dict[str, list[str]]:
    out = {k: list((old or {}).get(k, [])) for k in SOURCE_KINDS}
    for k, v in new.items():
        if v is not None:
            out[k] = [x for x in out[k] if x != v] + [v]
    return out


def _add_sources(root: Path, new: dict[str, str | None]) -> None:
    """Record in the finished cache ``root`` that sources of these fingerprints give it (best
    effort: a cache that cannot be written is only found by reading the sources)."""
    old = _read_sources(root)
    merged = _merged(old, new)
    if merged == old:
        return  # nothing new: nothing written
    try:
        atomic_write_text(root / _SOURCES, _sources_json(merged))
    except OSError:
        pass


def _open_cache(root: Path, *, key: str, verify: bool, vocab: int) -> tuple[PackedDomains, dict[str, int]]:
    """The finished cache at ``root``, verified (``ddk.data.verify``: sizes; sha256s and token ids
    below ``vocab`` when the files changed since the last check, or with ``verify``), its arrays
    ``MappedRows`` (mapped on demand), and the domains whose validation was capped when it was built (name -> sequences)."""
    fn = "pack_domains"
    try:
        raw = read_capped(root / _META, fn=fn)
        meta = loads_json(raw, where=str(root / _META), fn=fn)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{fn}: cache folder {root} must hold a readable {_META}; got {type(e).__name__}: {e}. Delete the folder to rebuild it."
        ) from None
    if meta.get("format") != _FORMAT or meta.get("version") != _VERSION or meta.get("key") != key:
        raise ValueError(
            f"{fn}: cache folder {root} must hold a {_FORMAT} v{_VERSION} cache of key {key}; got {meta.get('format')} "
            f"v{meta.get('version')} key {meta.get('key')}. Delete the folder to rebuild it."
        )
    _check_meta(root, meta)
    L = int(meta["seq_len"])
    arrays: dict[str, list[Rows]] = {"train": [], "validation": []}
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
            # mapped on demand, not held open: no descriptor per domain (ddk.data.mapped)
            arrays[side].append(MappedRows(path, (n, L), _DTYPE) if n else np.empty((0, L), dtype=_DTYPE))

    def mismatch(path: Path, expected: str, got: str) -> str:
        return f"{fn}: cache file {path} must have sha256 {expected}; got {got}. The cache is damaged: delete {root} to rebuild it."

    eos = int(meta["eos_token_id"])
    verify_cache(
        root,
        raw,
        {e["file"]: e["sha256"] for side in ("train", "validation") for e in meta[side]},
        check_values=lambda: check_token_values(root, arrays, vocab, eos),
        mismatch=mismatch,
        force=verify,
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


def _check_meta(root: Path, meta: dict[str, Any]) -> None:
    """The structure of a cache's ``meta.json``: names, ``seq_len``, ``eos_token_id`` and per side one
    ``{side}_{i}.bin`` entry per domain with its shape and sha256, so that damage is named."""
    names = meta.get("names")
    problem = None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        problem = f"names, a non-empty list of domain names; got {names!r:.80}"
    elif not all(isinstance(meta.get(k), int) and meta[k] >= 0 for k in ("seq_len", "eos_token_id")):
        problem = f"an int seq_len and eos_token_id; got {meta.get('seq_len')!r:.40}, {meta.get('eos_token_id')!r:.40}"
    else:
        for side in ("train", "validation"):
            entries = meta.get(side)
            if not isinstance(entries, list) or len(entries) != len(names):
                problem = f"{side}, one entry per domain ({len(names)}); got {entries!r:.80}"
                break
            for i, e in enumerate(entries):
                ok = (
                    isinstance(e, dict)
                    and e.get("file") == f"{side}_{i}.bin"
                    and isinstance(e.get("shape"), list)
                    and len(e["shape"]) == 2
                    and all(isinstance(x, int) and x >= 0 for x in e["shape"])
                    and isinstance(e.get("sha256"), str)
                )
                if not ok:
                    problem = f"{side}[{i}] with file {side}_{i}.bin, its shape [n, seq_len] and sha256; got {e!r:.80}"
                    break
            if problem:
                break
    if problem:
        raise ValueError(
            f"pack_domains: cache folder {root} must hold in {_META} {problem}. The cache is damaged: delete {root} to rebuild it."
        )
