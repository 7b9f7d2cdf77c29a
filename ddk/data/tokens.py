"""From records to token windows, the steps of ``ddk.data.pack_domains`` and ``ddk.data.pack_files``
(no public names).

* ``_Records`` — uniform batch access to a ``datasets.Dataset`` or a list of dicts, with ``domain``
  and ``text`` (or pre-tokenized ``input_ids``) columns.
* ``_Scanner`` — the checking pass over record batches, one batch at a time: domain codes, the
  content digest of the cache key, the stable split hash of every document (and a hash of its text
  for the overlap check of validation records).
* ``_Windows`` — cuts a token stream into ``(n, L)`` windows, in memory or written to a cache file.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ddk.data.readers import _check_domain_name
from ddk.partition.partitioner import stable_unit_hash

__all__: list[str] = []

_FORMAT = "ddk.pack_domains"  # the format's name: seeds the content digest, tags the cache
_DTYPE = np.dtype("<i4")  # token ids, in memory and in the cache files
_SCAN_BATCH = 1000  # records per batch of a records pass


# ---------------------------------------------------------------------------- records access
def _is_hf_dataset(obj: Any) -> bool:
    mod = sys.modules.get("datasets")
    return mod is not None and isinstance(obj, getattr(mod, "Dataset", ()))


@dataclass(frozen=True)
class _Batch:
    """Records in order: their domains, and their texts and/or pre-tokenized ids (``None`` if absent)."""

    domains: list[Any]
    texts: list[Any] | None
    ids: list[Any] | None


class _Records:
    """Uniform batch access to a ``datasets.Dataset`` or a list of dicts with ``domain`` and ``text``
    (or ``input_ids``) columns."""

    def __init__(self, fn: str, arg: str, data: Any) -> None:
        self.fn, self.arg = fn, arg
        mod = sys.modules.get("datasets")
        if mod is not None and isinstance(data, (getattr(mod, "DatasetDict", ()), getattr(mod, "IterableDataset", ()))):
            raise TypeError(
                f"{fn}: {arg} must be a map-style datasets.Dataset (pick a split, e.g. ds['train'], and do not stream); got {type(data).__name__}."
            )
        if _is_hf_dataset(data):
            cols = list(data.column_names)
            self.is_ds = True
        elif isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
            bad = next((i for i, r in enumerate(data) if not isinstance(r, Mapping)), None)
            if bad is not None:
                raise TypeError(
                    f"{fn}: {arg} must be a datasets.Dataset or a list of dicts; got {type(data[bad]).__name__} at index {bad}."
                )
            cols = sorted({k for r in data for k in r}) if data else []
            self.is_ds = False
        else:
            raise TypeError(
                f"{fn}: {arg} must be a datasets.Dataset (as load_records returns) or a list of dicts; got {type(data).__name__}."
            )
        if len(data) == 0:
            raise ValueError(f"{fn}: {arg} must hold at least one record; got 0.")
        tokens = "input_ids" if "input_ids" in cols else "text" if "text" in cols else None
        if "domain" not in cols or tokens is None:
            raise ValueError(
                f"{fn}: {arg} must have a 'domain' column and a 'text' (or pre-tokenized 'input_ids') column; got columns {cols}."
            )
        self.data = data
        self.tokens = tokens  # the column the token ids come from
        self.has_text = "text" in cols  # the split key is the text when there is one
        self.n = len(data)
        self._cols = ["domain", "text", "input_ids"] if tokens == "input_ids" and self.has_text else ["domain", tokens]
        self._view = data.select_columns(self._cols) if self.is_ds else None

    def batches(self) -> Iterator[_Batch]:
        """All records, in order, ``_SCAN_BATCH`` at a time."""
        if self._view is not None:  # a datasets.Dataset: read batch by batch from its Arrow files
            parts: Iterator[dict[str, list[Any]]] = self._view.iter(batch_size=_SCAN_BATCH)
        else:
            parts = (
                {c: [r.get(c) for r in self.data[s : s + _SCAN_BATCH]] for c in self._cols}
                for s in range(0, self.n, _SCAN_BATCH)
            )
        for cols in parts:
            yield _Batch(
                cols["domain"],
                cols["text"] if self.has_text else None,
                cols["input_ids"] if self.tokens == "input_ids" else None,
            )


def _ids_array(fn: str, arg: str, i: int, value: Any, vocab: int | None) -> np.ndarray:
    """Pre-tokenized ids of record ``i`` as int32, checked against ``vocab``."""
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError):
        arr = np.asarray([], dtype=object)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{fn}: {arg}[{i}]['input_ids'] must be a list of ints; got {value!r:.60}.")
    high = vocab if vocab is not None else 2**31
    if arr.size and (arr.min() < 0 or arr.max() >= high):
        bound = f"{high} (the tokenizer's vocabulary)" if vocab is not None else "2**31"
        raise ValueError(
            f"{fn}: {arg}[{i}]['input_ids'] must be ids in [0, {bound}); got {int(arr.min())}..{int(arr.max())}."
        )
    return arr.astype(_DTYPE, copy=False)


# ---------------------------------------------------------------------------- the checking pass
@dataclass
class _Scanned:
    """What ``_Scanner.feed`` learnt of one batch (per record, in order)."""

    codes: np.ndarray  # (n,) int32 domain codes (``_Scanner.names[code]``)
    split_hash: np.ndarray | None  # (n,) float64 stable_unit_hash of each document, if asked
    key_hash: np.ndarray | None  # (n,) int64 hash of each document's text (ids), if asked
    ids: list[np.ndarray] | None  # the pre-tokenized ids, checked, when the records have them


class _Scanner:
    """The checks and hashes of one side's records, fed one batch at a time in record order.

    The digest (sha256 of the format tag, then every record's domain and text and/or ids, each
    length-prefixed) is the one the records' cache key has always had: the same records give the
    same key whether they come from memory or are streamed from files. ``want_keys`` hashes each
    text with Python's ``hash`` (to compare two sides within one process).
    """

    def __init__(
        self,
        fn: str,
        arg: str,
        *,
        tokens: str,
        has_text: bool,
        seed: int,
        want_hash: bool,
        want_keys: bool = False,
        vocab: int | None = None,
    ) -> None:
        self.fn, self.arg = fn, arg
        self.tokens, self.has_text = tokens, has_text
        self.seed, self.want_hash, self.want_keys, self.vocab = seed, want_hash, want_keys, vocab
        self.n = 0  # records fed so far
        self.code_of: dict[str, int] = {}
        self.names: list[str] = []  # code -> domain name, in order of first appearance
        self._sha = hashlib.sha256()
        self._sha.update(f"{_FORMAT}/{tokens}/{has_text}".encode())

    @property
    def digest(self) -> str:
        return self._sha.hexdigest()

    def feed(self, batch: _Batch) -> _Scanned:
        """Check and hash one batch; raise ``ValueError`` naming the first bad record (global index)."""
        fn, arg = self.fn, self.arg
        n = len(batch.domains)
        codes = np.empty(n, dtype=np.int32)
        split_hash = np.empty(n, dtype=np.float64) if self.want_hash else None
        key_hash = np.empty(n, dtype=np.int64) if self.want_keys else None
        ids_out: list[np.ndarray] | None = [] if self.tokens == "input_ids" else None
        sha, pack, code_of, seed = self._sha, struct.Struct("<Q").pack, self.code_of, self.seed
        for j, dom in enumerate(batch.domains):
            i = self.n + j
            if not isinstance(dom, str) or not dom:
                raise ValueError(f"{fn}: {arg}[{i}]['domain'] must be a non-empty str; got {dom!r:.60}.")
            c = code_of.get(dom)
            if c is None:
                _check_domain_name(fn, dom, f"{arg}[{i}]")
                c = code_of[dom] = len(self.names)
                self.names.append(dom)
            codes[j] = c
            d = dom.encode("utf-8")
            sha.update(pack(len(d)))
            sha.update(d)
            key = None
            if batch.texts is not None:
                text = batch.texts[j]
                if not isinstance(text, str):
                    raise ValueError(f"{fn}: {arg}[{i}]['text'] must be a str; got {text!r:.60}.")
                t = text.encode("utf-8", "surrogatepass")
                sha.update(pack(len(t)))
                sha.update(t)
                key = text
            if ids_out is not None:
                assert batch.ids is not None
                arr = _ids_array(fn, arg, i, batch.ids[j], self.vocab)
                ids_out.append(arr)
                b = arr.tobytes()
                sha.update(pack(len(b)))
                sha.update(b)
                if key is None:
                    key = hashlib.sha256(b).hexdigest()
            if split_hash is not None:
                assert key is not None  # every record has a text or an input_ids column
                split_hash[j] = stable_unit_hash(key, seed)
            if key_hash is not None:
                key_hash[j] = hash(key)
        self.n += n
        return _Scanned(codes, split_hash, key_hash, ids_out)


# ---------------------------------------------------------------------------- window writer
class _Windows:
    """Cuts a token stream into ``(n, L)`` int32 windows, written to ``path`` (incrementally,
    with a running sha256) or kept in memory; at most ``limit`` windows are kept."""

    def __init__(self, seq_len: int, path: Path | None, limit: int | None = None) -> None:
        self.L = seq_len
        self.limit = limit
        self.windows = 0
        self.tokens = 0  # tokens offered, kept or not (for messages)
        self._buf: list[np.ndarray] = []
        self._buf_len = 0
        self._flush_at = max(16 * seq_len, 1 << 20)
        self._sha = hashlib.sha256()
        self._fh = path.open("wb") if path is not None else None
        self._chunks: list[np.ndarray] = []

    @property
    def full(self) -> bool:
        return self.limit is not None and self.windows >= self.limit

    def add(self, ids: np.ndarray, eos: np.ndarray) -> None:
        """Append one document's ids and the EOS."""
        self.tokens += len(ids) + 1
        if self.full:
            return
        self._buf += (ids, eos)
        self._buf_len += len(ids) + 1
        if self._buf_len >= self._flush_at or (
            self.limit is not None and self._buf_len >= (self.limit - self.windows) * self.L
        ):
            self._flush()

    def _flush(self) -> None:
        if not self._buf or self.full:
            self._buf, self._buf_len = [], 0
            return
        data = np.concatenate(self._buf)
        n = len(data) // self.L
        if self.limit is not None:
            n = min(n, self.limit - self.windows)
        out = data[: n * self.L]
        if n:
            if self._fh is not None:
                b = out.astype(_DTYPE, copy=False).tobytes()
                self._fh.write(b)
                self._sha.update(b)
            else:
                self._chunks.append(out.astype(_DTYPE, copy=True))
            self.windows += n
        rest = data[n * self.L :]
        self._buf = [rest] if rest.size and not self.full else []
        self._buf_len = int(rest.size) if self._buf else 0

    def close(self) -> np.ndarray | None:
        """Write what is left (the last partial window is dropped); the array when in memory."""
        self._flush()
        self._buf = []
        if self._fh is not None:
            self._fh.close()
            return None
        if not self._chunks:
            return np.empty((0, self.L), dtype=_DTYPE)
        return np.concatenate(self._chunks).reshape(self.windows, self.L)

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()
