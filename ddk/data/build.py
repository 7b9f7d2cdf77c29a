"""The one build of packed domains, shared by ``ddk.data.pack_domains`` (records in memory or in a
``datasets.Dataset``) and ``ddk.data.pack_files`` (records streamed from files) (no public names).

A *pass* reads each side's record batches once (the validation records first, then the training
records), checks and hashes them (``ddk.data.tokens._Scanner``) and, when building, tokenizes
them in order in ``num_proc`` processes (``ddk.data.token_workers``) and hands the ids to the
``ddk.data.assemble._Assembler``, which writes each domain's stream to the build folder. After
the pass come the checks that need every record (unknown ``domains``, validation domains, the
overlap warning), the content key (the same digest as ever: see ``_key``), and the split and cut
of every domain into the cache's files, committed atomically (``ddk.data.pack_cache``).

When ``cache_dir`` holds a cache packed with the same options (tokenizer, EOS, sequence length,
split options), a pass that only scans comes first: if the records' key names a finished cache, it
is opened and nothing is tokenized. Otherwise the build pass computes the key as it goes (a single
read of the records).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ddk._io import json_fingerprint, warn_user
from ddk.data.assemble import _Assembler
from ddk.data.pack_cache import (
    _META,
    _SOURCES,
    _VERSION,
    _add_sources,
    _build_folder,
    _check_root,
    _commit,
    _may_hold,
    _merged,
    _open_cache,
    _sources_json,
)
from ddk.data.packed import PackedDomains
from ddk.data.token_workers import _TokenizerPool
from ddk.data.tokens import _DTYPE, _FORMAT, _Batch, _Scanned, _Scanner

__all__: list[str] = []


@dataclass(frozen=True)
class _Options:
    """What a packing is, but its records (checked by the public function)."""

    fn: str
    seq_len: int
    val_samples: int
    seed: int
    max_val_fraction: float
    keep: list[str] | None  # the domains kept (sorted), or None for all
    eos_id: int
    vocab: int
    tokenizer_hash: str
    validation: bool  # validation records given (else the hash split)

    def meta(self) -> dict[str, Any]:
        """The options as ``meta.json`` records them (``pack_cache._same_options`` compares them)."""
        return {
            "tokenizer_hash": self.tokenizer_hash,
            "eos_token_id": self.eos_id,
            "seq_len": self.seq_len,
            "options": {
                "val_samples": self.val_samples,
                "seed": self.seed,
                "max_val_fraction": self.max_val_fraction,
                "domains": self.keep,
                "split": "validation records" if self.validation else "hash",
            },
        }


@dataclass
class _Side:
    """One side's records: ``arg`` names them in messages (``records``, ``validation``)."""

    arg: str
    batches: Callable[[], Iterator[_Batch]]
    tokens: str  # "text" or "input_ids"
    has_text: bool
    validation: bool
    total: int | None = None  # records, for a progress bar (None: the reader shows its own)


class _Overlap:
    """Per domain, how many validation records' texts are also training records' (Python's
    ``hash`` of each text, one process): the validation side's keys are kept, the training side's
    are only looked up."""

    def __init__(self) -> None:
        self._val: dict[str, list[np.ndarray]] = {}
        self._seen: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None

    def feed(self, validation: bool, names: list[str], scanned: _Scanned) -> None:
        keys, codes = scanned.key_hash, scanned.codes
        assert keys is not None
        for code in np.unique(codes).tolist():
            rows = keys[codes == code]
            if validation:
                self._val.setdefault(names[code], []).append(rows)
                continue
            if self._seen is None:
                self._seen = {}
                for name, parts in self._val.items():
                    uniq, counts = np.unique(np.concatenate(parts), return_counts=True)
                    self._seen[name] = (uniq, counts, np.zeros(len(uniq), dtype=bool))
            got = self._seen.get(names[code])
            if got is not None:
                got[2][np.isin(got[0], rows)] = True

    def found(self, names: list[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        for name in names:
            if self._seen is None or name not in self._seen:
                continue
            _, counts, hit = self._seen[name]
            n = int(counts[hit].sum())
            if n:
                out[name] = f"{name!r} {n} of {int(counts.sum())}"
        return out


@dataclass
class _Pass:
    scanners: dict[str, _Scanner]
    overlap: _Overlap | None
    processes: int = 1  # processes that tokenized (1: this one)
    names: list[str] = field(default_factory=list)
    key: str = ""


def _run_pass(
    opts: _Options,
    sides: list[_Side],
    tokenizer: Any,
    assembler: _Assembler | None,
    *,
    num_proc: int,
    progress: bool,
    failing: Callable[[], bool],
) -> _Pass:
    """Read every side once: scan it, and with an ``assembler`` tokenize and assemble it (the
    tokenizing stops, the reading does not, once ``failing()``: the reader will raise at its end)."""
    from tqdm.auto import tqdm

    overlap = _Overlap() if any(s.validation for s in sides) else None
    keep = set(opts.keep) if opts.keep is not None else None
    scanners: dict[str, _Scanner] = {}
    processes = 1
    with _TokenizerPool(tokenizer, num_proc) as pool:
        for side in sides:
            scanner = _Scanner(
                opts.fn,
                side.arg,
                tokens=side.tokens,
                has_text=side.has_text,
                seed=opts.seed,
                want_hash=not side.validation and not opts.validation,
                want_keys=overlap is not None,
                vocab=opts.vocab,
            )
            scanners[side.arg] = scanner
            desc = f"{'tokenize' if assembler is not None else 'hash'} {side.arg}"
            bar = tqdm(total=side.total, desc=desc, unit=" rec", disable=not progress or side.total is None)

            def items(side: _Side = side, scanner: _Scanner = scanner, bar: Any = bar) -> Iterator[tuple[Any, ...]]:
                for batch in side.batches():
                    scanned = scanner.feed(batch)
                    bar.update(len(batch.domains))
                    if overlap is not None:
                        overlap.feed(side.validation, scanner.names, scanned)
                    rows = None
                    if assembler is not None and not failing():
                        wanted = np.array(
                            [
                                (keep is None or n in keep) and not (side.validation and assembler.val_full(n))
                                for n in scanner.names
                            ]
                        )
                        rows = np.flatnonzero(wanted[scanned.codes])
                    yield side, scanner, batch, scanned, rows

            def texts_of(item: tuple[Any, ...]) -> list[str] | None:
                _, _, batch, scanned, rows = item
                if rows is None or not len(rows) or scanned.ids is not None:
                    return None
                return [batch.texts[r] for r in rows.tolist()]

            def consume(item: tuple[Any, ...], result: tuple[np.ndarray, np.ndarray] | None) -> None:
                side, scanner, _, scanned, rows = item
                if rows is None or not len(rows) or assembler is None:
                    return
                if result is None:  # pre-tokenized: the scanner checked the ids
                    ids = [scanned.ids[r] for r in rows.tolist()]
                    lengths = np.array([len(a) for a in ids], dtype=np.int64)
                    flat = np.concatenate(ids) if ids else np.empty(0, dtype=_DTYPE)
                else:
                    flat, lengths = result
                codes = scanned.codes[rows]
                if side.validation:
                    assembler.add_validation(scanner.names, codes, flat, lengths)
                else:
                    hashes = scanned.split_hash[rows] if scanned.split_hash is not None else None
                    assembler.add_train(scanner.names, codes, hashes, flat, lengths)

            pool.map(items(), texts_of, consume)
            bar.close()
        processes = pool.num_proc if pool.started else 1
    return _Pass(scanners, overlap, processes)


def _key(opts: _Options, result: _Pass, *, warn: bool) -> None:
    """The checks that need every record, then the content key (``result.names``, ``result.key``)."""
    fn = opts.fn
    scan = result.scanners["records"]
    val_scan = result.scanners.get("validation")
    present = sorted(scan.names)
    if opts.keep is not None:
        unknown = [d for d in opts.keep if d not in scan.code_of]
        if unknown:
            raise ValueError(f"{fn}: domains must be names found in records {present}; got unknown {unknown}.")
    names = list(opts.keep) if opts.keep is not None else present
    if val_scan is not None:
        val_names = {d for d in val_scan.names if opts.keep is None or d in opts.keep}
        missing, extra = sorted(set(names) - val_names), sorted(val_names - set(names))
        if missing or extra:
            raise ValueError(
                f"{fn}: validation must have exactly the training domains {names}; got missing {missing}, extra {extra}."
            )
        found = result.overlap.found(names) if result.overlap is not None and warn else {}
        if found:
            warn_user(
                f"{fn}: validation records must not occur in the training records; got {len(found)} domain(s) "
                f"with the same text in both: {', '.join(found.values())} validation records. Their validation CE "
                "measures memorised text: remove these records from the training data or from the validation data."
            )
    result.names = names
    result.key = json_fingerprint(
        {
            "format": _FORMAT,
            "version": _VERSION,
            "records": scan.digest,
            "validation": val_scan.digest if val_scan is not None else None,
            "tokenizer": opts.tokenizer_hash,
            "eos_token_id": opts.eos_id,
            "seq_len": opts.seq_len,
            "val_samples": opts.val_samples,
            "seed": opts.seed,
            "max_val_fraction": opts.max_val_fraction,
            "domains": opts.keep,
        }
    )


def _cap_message(fn: str, capped: dict[str, int], val_samples: int, max_val_fraction: float) -> str:
    listing = ", ".join(f"{n!r} ({c})" for n, c in capped.items())
    return (
        f"{fn}: validation capped at max_val_fraction={max_val_fraction} of each domain's documents, "
        f"below val_samples={val_samples} sequences, for {listing}. Add documents to these domains, lower "
        "val_samples, or pass validation= records for a full validation set."
    )


Sources = Callable[[], dict[str, str | None]]  # the sources' fingerprints per kind (pack_cache.SOURCE_KINDS)


def _opened(opts: _Options, root: Path, key: str, verify: bool, sources: Sources | None) -> PackedDomains:
    """The finished cache ``root``, verified; the capped warning; the ``sources``' fingerprints
    recorded in it."""
    packed, capped = _open_cache(root, key=key, verify=verify, vocab=opts.vocab)
    if capped:
        warn_user(_cap_message(opts.fn, capped, opts.val_samples, opts.max_val_fraction))
    if sources is not None:
        _add_sources(root, sources())
    return packed


def _build(
    opts: _Options,
    sides: list[_Side],
    tokenizer: Any,
    *,
    cache_dir: Path | None,
    num_proc: int,
    progress: bool,
    verify: bool,
    failing: Callable[[], bool] = lambda: False,
    sources: Sources | None = None,
    scan_first: bool | None = None,
) -> PackedDomains:
    """Pack ``sides`` (see the module docstring): open the cache of their key, or build it.
    ``sources`` gives the fingerprints to record in the cache (``pack_files``); ``scan_first``
    overrides whether a scanning pass looks for the key first (default: when a cache of the same
    options exists)."""
    warned = False
    if scan_first is None:
        scan_first = cache_dir is not None and _may_hold(cache_dir, opts.meta())
    if cache_dir is not None and scan_first:
        scanned = _run_pass(opts, sides, tokenizer, None, num_proc=num_proc, progress=progress, failing=failing)
        _key(opts, scanned, warn=True)
        warned = True
        if (cache_dir / scanned.key / _META).is_file():
            return _opened(opts, cache_dir / scanned.key, scanned.key, verify, sources)
    start = time.perf_counter()
    tmp = _build_folder(cache_dir) if cache_dir is not None else Path(tempfile.mkdtemp(prefix="ddk-pack-"))
    try:
        assembler = _Assembler(
            tmp,
            seq_len=opts.seq_len,
            val_samples=opts.val_samples,
            max_val_fraction=opts.max_val_fraction,
            eos_id=opts.eos_id,
            hash_split=not opts.validation,
        )
        built = _run_pass(opts, sides, tokenizer, assembler, num_proc=num_proc, progress=progress, failing=failing)
        _key(opts, built, warn=not warned)
        root = cache_dir / built.key if cache_dir is not None else None
        if root is not None and (root / _META).is_file():  # built meanwhile by another process
            return _opened(opts, root, built.key, verify, sources)
        if root is not None:
            _check_root(root)
        train, val, entries, capped = assembler.finish(opts.fn, built.names, in_memory=root is None)
        if root is None:
            if capped:
                warn_user(_cap_message(opts.fn, capped, opts.val_samples, opts.max_val_fraction))
            return PackedDomains(
                names=tuple(built.names),
                seq_len=opts.seq_len,
                train=tuple(train),
                validation=tuple(val),
                eos_token_id=opts.eos_id,
                key=built.key,
                root=None,
            )
        for stray in tmp.glob("*_*.bin"):  # streams of dropped domains
            if not stray.name.startswith(("train_", "validation_")):
                stray.unlink()
        if sources is not None:
            (tmp / _SOURCES).write_text(_sources_json(_merged(None, sources())), encoding="utf-8")
        meta = {
            "format": _FORMAT,
            "version": _VERSION,
            "key": built.key,
            "names": built.names,
            "seq_len": opts.seq_len,
            "eos_token_id": opts.eos_id,
            "tokenizer_hash": opts.tokenizer_hash,
            "dtype": _DTYPE.str,
            "capped": capped,
            "options": opts.meta()["options"],
            "train": entries["train"],
            "validation": entries["validation"],
            "built_by": {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "processes": built.processes,
                "seconds": round(time.perf_counter() - start, 3),
            },
        }
        _commit(tmp, root, meta)
        return _opened(opts, root, built.key, False, None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when committed
