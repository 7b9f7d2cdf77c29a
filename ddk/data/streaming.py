"""``pack_files``: a corpus larger than memory, from its files straight to the packed cache.

``pack_files(paths, tokenizer, ...)`` is ``pack_domains(load_records(paths, ...), tokenizer, ...)``
without the corpus in memory: the records are read batch by batch (``RecordStream``: JSON lines
line by line, Parquet by row groups, CSV by lines, ``save_to_disk`` folders from their Arrow files),
tokenized in ``num_proc`` processes, and each domain's tokens written to disk as they come
(``ddk.data.build``). Peak memory is the readers' batch, the tokenizers' batches in flight and a few
MiB of buffers, whatever the corpus' size. The result is the one ``pack_domains`` gives for the same
records and options: the same key, the same files byte for byte, for every ``num_proc``.

Once per cache folder. With ``cache_dir``, the cache records two fingerprints of the sources it
was built from, each with the reading and packing options (``<key>/sources.json``): their identity
(paths, sizes, modification and change times, inodes) and their contents (the SHA-256 of their
bytes). A later call whose files are unchanged opens the cache after a ``stat`` per file, reading
nothing; files touched, copied or moved with the same bytes are hashed at disk speed, not parsed
or tokenized. Only a cache of the same options that records no contents fingerprint (built by
``pack_domains``, or by ddk before ``pack_files``) makes the records be parsed (not tokenized)
first, to find their key. A build holds an advisory lock on ``cache_dir`` (``flock`` on the folder
itself, which the kernel drops if the process dies), so under ``torchrun`` the first rank to take
it builds and every other rank waits, then opens the result by the fingerprint: no other rank
reads the corpus. (A file system without ``flock`` on folders builds without the lock; two
builders then race harmlessly, the second finding the first's cache at its commit.) When the
fingerprints cannot be taken (a hub dataset, a ``partitioner``), the records are parsed to find
the key whenever a cache of the same options exists.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddk._io import json_fingerprint
from ddk.data.build import _build, _opened, _Options, _Side
from ddk.data.pack_cache import _find_by_sources, _may_hold, _unfingerprinted
from ddk.data.packed import PackedDomains
from ddk.data.packing import _options
from ddk.data.readers import MAX_RECORD_BYTES
from ddk.data.records import RecordStream, Sources
from ddk.data.token_workers import resolve_num_proc
from ddk.data.tokens import _Batch

if TYPE_CHECKING:
    from ddk.partition.partitioner import DomainPartitioner

__all__ = ["pack_files"]

_FINGERPRINT = "ddk.pack_files/1"


def _side(stream: RecordStream, arg: str, validation: bool) -> _Side:
    def batches() -> Iterator[_Batch]:
        return (_Batch(domains, texts, None) for texts, domains in stream.batches())

    return _Side(arg, batches, "text", True, validation)


def _fingerprint(opts: _Options, data: RecordStream, validation: RecordStream | None, kind: str) -> str | None:
    """What the packed result depends on, without parsing the records (None when unknowable):
    the sources' identities (``kind="stat"``) or contents (``"contents"``), and the options."""
    parts = [data.fingerprint(kind), validation.fingerprint(kind) if validation is not None else []]
    if any(p is None for p in parts):
        return None
    return json_fingerprint(
        {"format": _FINGERPRINT, "kind": kind, "data": parts[0], "validation": parts[1], **opts.meta()}
    )


def _builders(cache: Path) -> str:
    """The pids named by the build folders in ``cache`` (``.tmp-pack-<pid>-*``), for a message."""
    try:
        pids = sorted({m.group(1) for p in cache.iterdir() if (m := re.match(r"\.tmp-pack-(\d+)-", p.name))})
    except OSError:
        pids = []
    return ("pid " + ", ".join(pids)) if pids else "another process"


@contextlib.contextmanager
def _cache_lock(cache: Path, fn: str) -> Iterator[None]:
    """Hold the advisory lock of the folder ``cache`` (created if missing) for the block: ``flock``
    on the folder itself, so the cache holds no lock file. Where folders cannot be locked, nothing
    is held (two builders then race; the loser finds the winner's cache at its commit)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    cache.mkdir(parents=True, exist_ok=True)
    fd = os.open(cache, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"{fn}: waiting for {_builders(cache)}, which is packing into {cache}", file=sys.stderr, flush=True)
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # no flock on this file system's folders
        yield
    finally:
        os.close(fd)  # releases the lock


def pack_files(
    paths: Sources,
    tokenizer: Any,
    *,
    seq_len: int,
    val_samples: int = 500,
    validation: Sources | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    domains: Sequence[str] | None = None,
    max_val_fraction: float = 0.5,
    text_field: str = "text",
    domain_field: str = "domain",
    partitioner: DomainPartitioner | None = None,
    on_missing: str = "raise",
    max_record_bytes: int = MAX_RECORD_BYTES,
    num_proc: int | None = None,
    progress: bool = True,
    verify: bool = False,
) -> PackedDomains:
    """Read, tokenize, split and pack a corpus from its files without holding it in memory.

    The same result as ``pack_domains(load_records(paths, ...), tokenizer, validation=
    load_records(validation, ...), ...)`` (same key, same cache files), streamed: see the module
    docstring for the memory, the cache and the lock under ``torchrun``.

    Args:
        paths: the training records' sources, as ``load_records`` takes them (files, folders,
            ``(domain, path)`` pairs, a ``{domain: path}`` mapping).
        tokenizer: a ``transformers`` tokenizer with an EOS token.
        seq_len: tokens per sequence, as ``pack_domains``'s.
        val_samples: validation sequences per domain, as ``pack_domains``'s.
        validation: the validation records' sources (the first ``val_samples`` sequences of each
            domain), or ``None`` for the stable hash split of ``paths``.
        seed: seed of the split hash, as ``pack_domains``'s.
        cache_dir: folder of the cache (``<cache_dir>/<key>``); ``None`` builds in a temporary
            folder and returns the arrays in memory.
        domains: the domains kept, as ``pack_domains``'s.
        max_val_fraction: as ``pack_domains``'s.
        text_field: as ``load_records``'s.
        domain_field: as ``load_records``'s.
        partitioner: as ``load_records``'s.
        on_missing: as ``load_records``'s; a bad record with ``"raise"`` stops the tokenizing (the
            reading goes on, to list the bad records).
        max_record_bytes: as ``load_records``'s.
        num_proc: processes that tokenize (``None`` or 0: the CPU count); the result does not
            depend on it.
        progress: a tqdm bar per source.
        verify: check the cache's files on a hit, as ``pack_domains``'s.

    Returns:
        ``PackedDomains``, as ``pack_domains`` returns.

    Raises:
        ValueError: as ``load_records`` and ``pack_domains`` raise.
        TypeError: arguments of the wrong type.

    Examples:
        >>> import json, tempfile
        >>> class Chars:  # a toy tokenizer: one id per character, EOS 0
        ...     eos_token_id = 0
        ...     def get_vocab(self):
        ...         return {chr(i): i for i in range(32, 127)}
        ...     def __call__(self, texts, add_special_tokens=False):
        ...         return {"input_ids": [[ord(c) for c in t] for t in texts]}
        >>> with tempfile.TemporaryDirectory() as d:
        ...     path = Path(d) / "c.jsonl"
        ...     lines = [json.dumps({"domain": m, "text": f"{m} document {i}"}) for m in ("math", "code") for i in range(6)]
        ...     _ = path.write_text("\\n".join(lines))
        ...     packed = pack_files(path, Chars(), seq_len=8, val_samples=2, cache_dir=Path(d) / "packed", progress=False)
        ...     again = pack_files(path, Chars(), seq_len=8, val_samples=2, cache_dir=Path(d) / "packed", progress=False)
        ...     print(packed.names, packed.sizes, again.key == packed.key)
        ('code', 'math') [10, 10] True
    """
    fn = "pack_files"
    opts = _options(
        fn,
        tokenizer,
        seq_len=seq_len,
        val_samples=val_samples,
        seed=seed,
        max_val_fraction=max_val_fraction,
        domains=domains,
        validation=validation is not None,
    )
    read = dict(
        text_field=text_field,
        domain_field=domain_field,
        partitioner=partitioner,
        on_missing=on_missing,
        max_record_bytes=max_record_bytes,
        progress=progress,
        fn=fn,
        bar="read",
    )
    data = RecordStream(paths, **read)  # type: ignore[arg-type]
    val = RecordStream(validation, **read) if validation is not None else None  # type: ignore[arg-type]
    sides = [_side(data, "records", False)]
    if val is not None:
        sides.insert(0, _side(val, "validation", True))
    procs = resolve_num_proc(fn, num_proc)
    streams = [s for s in (data, val) if s is not None]

    def build(cache: Path | None, sources: Any = None, scan_first: bool | None = None) -> PackedDomains:
        return _build(
            opts,
            sides,
            tokenizer,
            cache_dir=cache,
            num_proc=procs,
            progress=progress,
            verify=verify,
            failing=lambda: any(s.failing for s in streams),
            sources=sources,
            scan_first=scan_first,
        )

    if cache_dir is None:
        return build(None)
    cache = Path(cache_dir).expanduser()
    stat = _fingerprint(opts, data, val, "stat")
    if stat is not None:  # unchanged files: open what they gave, reading nothing (and writing nothing)
        root = _find_by_sources(cache, "stat", stat)
        if root is not None:
            return _opened(opts, root, root.name, verify, None)
    contents: list[str | None] = []

    def fingerprints() -> dict[str, str | None]:
        if not contents:
            contents.append(_fingerprint(opts, data, val, "contents"))
        return {"stat": stat, "contents": contents[0]}

    with _cache_lock(cache, fn):
        if stat is not None:  # built while this process waited for the lock
            root = _find_by_sources(cache, "stat", stat)
            if root is not None:
                return _opened(opts, root, root.name, verify, None)
        scan_first = False
        if _may_hold(cache, opts.meta()):  # a cache of these options: maybe of these records
            found = fingerprints()["contents"]
            root = _find_by_sources(cache, "contents", found) if found is not None else None
            if root is not None:  # the same bytes (touched, copied or moved files): no parsing
                return _opened(opts, root, root.name, verify, fingerprints)
            scan_first = _unfingerprinted(cache, opts.meta())  # only parsing the records can tell
        return build(cache, fingerprints, scan_first)
