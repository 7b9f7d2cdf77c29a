"""Token streams -> each domain's training and validation windows, on disk as they fill (no public
names): the build of ``ddk.data.pack_domains`` and ``ddk.data.pack_files``.

``_Assembler`` takes the tokenized documents batch by batch, in record order. Every document of a
domain (its ids and the EOS) is appended to that domain's stream file in the build folder; memory
holds only a few MiB of buffered tokens, and for the hash split the *candidates* of the validation
side: the documents of lowest ``(split hash, position)`` whose tokens still reach ``val_samples``
windows, at most ``val_samples * seq_len`` of them (documents of higher hash can never be taken,
whatever comes later, and are dropped from the candidates as soon as that is certain). At the end,
per domain:

* hash split: the first candidates in hash order are the validation documents, until their
  tokens fill ``val_samples`` windows or their number reaches ``floor(max_val_fraction * docs)``
  (the rule of ``pack_domains``); they are read back from the stream into the validation windows,
  then the stream is compacted in place without them (never more disk than the stream itself)
  and cut to whole windows: the training file;
* validation records: the validation documents, in file order, went straight into the validation
  windows until full; the stream, cut to whole windows, is the training file.

The files are byte for byte those the former in-memory packing wrote (their SHA-256s, computed
while writing, go into the cache's ``meta.json``).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ddk.data.tokens import _DTYPE, _Windows

__all__: list[str] = []

_DOMAIN_BUFFER = 1 << 18  # tokens buffered per domain before its stream file is appended to
_ALL_BUFFERS = 1 << 21  # tokens buffered over all domains before every buffer is written
_COPY = 8 << 20  # bytes per read/write of the compaction
_MIN_CANDIDATES = 4096  # candidates kept before the first pruning


@dataclass
class _Domain:
    """One domain's state during a build."""

    index: int  # order of first appearance: names its stream and validation files
    docs: int = 0  # training-side documents seen
    tokens: int = 0  # tokens of its stream so far (ids + EOS, buffered included)
    buffer: list[np.ndarray] = field(default_factory=list)
    buffered: int = 0
    # hash split: the candidates of the validation side, (split hash, document index, stream offset, tokens)
    pending: list[tuple[np.ndarray, ...]] = field(default_factory=list)
    pending_n: int = 0
    kept: tuple[np.ndarray, ...] | None = None
    val: _Windows | None = None  # validation records: their windows


class _Assembler:
    """Tokenized documents -> per-domain training and validation files in ``folder`` (see the module).

    Args:
        folder: the build folder (its files are renamed into the cache's layout by ``finish``).
        seq_len, val_samples, max_val_fraction, eos_id: the packing options.
        hash_split: True for the hash split, False when validation records are given.
    """

    def __init__(
        self, folder: Path, *, seq_len: int, val_samples: int, max_val_fraction: float, eos_id: int, hash_split: bool
    ) -> None:
        self.folder = folder
        self.L = seq_len
        self.val_samples = val_samples
        self.max_val_fraction = max_val_fraction
        self.eos = np.array([eos_id], dtype=_DTYPE)
        self.hash_split = hash_split
        self.budget = val_samples * seq_len  # tokens that fill the validation side
        self.domains: dict[str, _Domain] = {}
        self.buffered = 0

    def _domain(self, name: str) -> _Domain:
        d = self.domains.get(name)
        if d is None:
            d = self.domains[name] = _Domain(index=len(self.domains))
        return d

    def _stream(self, d: _Domain) -> Path:
        return self.folder / f"stream_{d.index}.bin"

    # ------------------------------------------------------------------ feeding
    def add_train(
        self, names: list[str], codes: np.ndarray, split_hash: np.ndarray | None, flat: np.ndarray, lengths: np.ndarray
    ) -> None:
        """Append a batch of training documents (``codes`` index ``names``; ``flat``/``lengths`` their
        ids without EOS; ``split_hash`` their hashes, for the hash split)."""
        if not len(codes):
            return
        ends = np.cumsum(lengths)
        stream = np.insert(flat, ends, self.eos[0])  # each document followed by the EOS
        sizes = lengths + 1
        starts = np.cumsum(sizes) - sizes
        for code in np.unique(codes):
            d = self._domain(names[int(code)])
            rows = np.flatnonzero(codes == code)
            if len(rows) == len(codes):
                part = stream
            else:
                part = np.concatenate([stream[starts[r] : starts[r] + sizes[r]] for r in rows])
            if self.hash_split:
                assert split_hash is not None
                n = sizes[rows]
                offsets = d.tokens + np.cumsum(n) - n
                index = d.docs + np.arange(len(rows), dtype=np.int64)
                d.pending.append((split_hash[rows], index, offsets, n))
                d.pending_n += len(rows)
                if d.pending_n >= max(_MIN_CANDIDATES, 2 * (0 if d.kept is None else len(d.kept[0]))):
                    self._prune(d)
            d.docs += len(rows)
            d.tokens += len(part)
            d.buffer.append(part)
            d.buffered += len(part)
            self.buffered += len(part)
            if d.buffered >= _DOMAIN_BUFFER:
                self._write(d)
        if self.buffered >= _ALL_BUFFERS:
            for d in self.domains.values():
                self._write(d)

    def add_validation(self, names: list[str], codes: np.ndarray, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Append a batch of validation records' documents, in file order, to their windows until full."""
        ends = np.cumsum(lengths)
        starts = ends - lengths
        for r, code in enumerate(codes.tolist()):
            d = self._domain(names[code])
            if d.val is None:
                d.val = _Windows(self.L, self.folder / f"val_{d.index}.bin", limit=self.val_samples)
            if not d.val.full:
                d.val.add(flat[starts[r] : ends[r]], self.eos)

    def val_full(self, name: str) -> bool:
        """Whether ``name``'s validation windows (from validation records) are full."""
        d = self.domains.get(name)
        return d is not None and d.val is not None and d.val.full

    def _write(self, d: _Domain) -> None:
        if d.buffer:
            with self._stream(d).open("ab") as f:
                f.write(np.concatenate(d.buffer).astype(_DTYPE, copy=False).tobytes())
            self.buffered -= d.buffered
            d.buffer, d.buffered = [], 0

    def _candidates(self, d: _Domain) -> tuple[np.ndarray, ...]:
        """Every candidate of ``d`` so far, sorted by (split hash, document index)."""
        parts = ([d.kept] if d.kept is not None else []) + d.pending
        cols = tuple(np.concatenate([p[k] for p in parts]) for k in range(4))
        order = np.lexsort((cols[1], cols[0]))
        return tuple(c[order] for c in cols)

    def _prune(self, d: _Domain) -> None:
        """Keep only the candidates that can still be validation documents: the shortest prefix in
        hash order whose tokens fill the validation side (later documents only push it down)."""
        cols = self._candidates(d)
        total = np.cumsum(cols[3])
        if len(total) and total[-1] >= self.budget:
            cols = tuple(c[: int(np.searchsorted(total, self.budget)) + 1] for c in cols)
        d.kept, d.pending, d.pending_n = cols, [], 0

    # ------------------------------------------------------------------ the end
    def finish(
        self, fn: str, names: list[str], in_memory: bool
    ) -> tuple[list[Any], list[Any], dict[str, Any], dict[str, int]]:
        """Split and cut every domain of ``names`` (sorted), in that order; return ``(train arrays,
        validation arrays, file entries, capped)``: the arrays when ``in_memory`` (else empty lists),
        the entries ``{"train": [...], "validation": [...]}`` of ``meta.json`` otherwise."""
        train_arrays: list[Any] = []
        val_arrays: list[Any] = []
        entries: dict[str, list[dict[str, Any]]] = {"train": [], "validation": []}
        capped: dict[str, int] = {}
        L = self.L
        for i, name in enumerate(names):
            d = self._domain(name)
            self._write(d)
            stream = self._stream(d)
            stream.touch()
            if self.hash_split:
                val_w = _Windows(L, None if in_memory else self.folder / f"val_{d.index}.bin", limit=self.val_samples)
                taken = self._hash_validation(d, stream, val_w)
            else:
                val_w = d.val if d.val is not None else _Windows(L, None, limit=self.val_samples)
                taken = np.empty((0, 2), dtype=np.int64)
            val_arr = val_w.close()
            kept_tokens = d.tokens - int(taken[:, 1].sum())
            windows = kept_tokens // L
            if windows < 1 or val_w.windows < 1:
                raise ValueError(
                    f"{fn}: domain {name!r} must give at least one training and one validation sequence of seq_len={L} "
                    f"tokens; got {windows} training and {val_w.windows} validation sequences from its "
                    f"{kept_tokens + val_w.tokens} tokens ({d.docs} documents, max_val_fraction={self.max_val_fraction}). "
                    f"Lower seq_len or val_samples, or add data to {name!r}."
                )
            if self.hash_split and val_w.windows < self.val_samples:
                capped[name] = val_w.windows
            sha = _compact(stream, taken, windows * L)
            if in_memory:
                train_arrays.append(np.fromfile(stream, dtype=_DTYPE).reshape(windows, L))
                if val_arr is None:  # validation records: their windows were written to a file
                    val_arr = np.fromfile(self.folder / f"val_{d.index}.bin", dtype=_DTYPE).reshape(-1, L)
                val_arrays.append(val_arr)
                continue
            os.replace(stream, self.folder / f"train_{i}.bin")
            os.replace(self.folder / f"val_{d.index}.bin", self.folder / f"validation_{i}.bin")
            entries["train"].append({"file": f"train_{i}.bin", "shape": [windows, L], "sha256": sha})
            entries["validation"].append(
                {"file": f"validation_{i}.bin", "shape": [val_w.windows, L], "sha256": val_w.sha256}
            )
        return train_arrays, val_arrays, entries, capped

    def _hash_validation(self, d: _Domain, stream: Path, val_w: _Windows) -> np.ndarray:
        """Fill ``val_w`` with the domain's validation documents (hash order); return their
        ``(offset, tokens)`` rows, sorted by offset (what the training stream drops)."""
        cols = self._candidates(d) if (d.kept is not None or d.pending) else (np.empty(0),) * 4
        max_docs = math.floor(self.max_val_fraction * d.docs + 1e-9)
        total = np.cumsum(cols[3])
        reach = int(np.searchsorted(total, self.budget)) + 1 if len(total) and total[-1] >= self.budget else len(total)
        taken = min(max_docs, reach)
        offsets, sizes = cols[2][:taken].astype(np.int64), cols[3][:taken].astype(np.int64)
        with stream.open("rb") as f:
            for off, n in zip(offsets.tolist(), sizes.tolist()):
                f.seek(off * _DTYPE.itemsize)
                doc = np.frombuffer(f.read(n * _DTYPE.itemsize), dtype=_DTYPE)
                val_w.add(doc[:-1], doc[-1:])
        rows = np.stack([offsets, sizes], axis=1) if taken else np.empty((0, 2), dtype=np.int64)
        return rows[np.argsort(rows[:, 0], kind="stable")]


def _compact(path: Path, removed: np.ndarray, keep_tokens: int) -> str:
    """Rewrite the int32 stream ``path`` in place without the ``(offset, tokens)`` ranges of
    ``removed`` (sorted by offset), cut to its first ``keep_tokens`` tokens; return the SHA-256 of
    what is left. Data only moves towards the start, so a read always precedes the write over it."""
    item = _DTYPE.itemsize
    limit = keep_tokens * item
    sha = hashlib.sha256()
    with path.open("r+b") as f:
        end = os.fstat(f.fileno()).st_size
        write = 0

        def move(start: int, stop: int) -> None:
            nonlocal write
            pos = start
            while pos < stop and write < limit:
                size = min(_COPY, stop - pos, limit - write)
                f.seek(pos)
                data = f.read(size)
                sha.update(data)
                if write != pos:
                    f.seek(write)
                    f.write(data)
                write += size
                pos += size

        read = 0
        for off, n in removed.tolist():
            move(read, off * item)
            read = (off + n) * item
        move(read, end)
        f.truncate(limit)
    return sha.hexdigest()
