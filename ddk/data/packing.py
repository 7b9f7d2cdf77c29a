"""``pack_domains``: domain-labelled records -> fixed-length token sequences per domain, split into
train and validation, cached memory-mapped under a content hash.

Packing. Each document's ids (``tokenizer(texts, add_special_tokens=False)``) are followed by
``eos_token_id``; a domain's documents are concatenated and cut into non-overlapping windows of
``seq_len`` tokens, the last partial window dropped. Windows never cross domains, so every token
of a sequence belongs to that sequence's domain (the per-sequence ``domain_id`` is exact).

Split (no ``validation=`` records). Within a domain, documents are ranked by
``stable_unit_hash(text, seed)``; in that order they go to validation until it holds
``val_samples`` sequences (the surplus tokens of the last one are dropped), but never more than
``floor(max_val_fraction * documents)`` documents; the rest are training documents, in record
order. A document's rank depends only on its own text and the seed, so for a domain whose
validation is full (it reached ``val_samples`` before the cap): adding documents never moves a
training document into validation (only the highest-hash validation documents can move to
training, the rule of ``DomainPartitioner.split``), and adding documents that hash above the
cutoff changes no document's side. A capped domain grows its validation as documents are added.

Cache layout (``cache_dir`` given), one folder per key::

    <cache_dir>/<key>/meta.json            names, shapes, seq_len, eos id, tokenizer hash, sha256s
    <cache_dir>/<key>/train_<i>.bin        (n_i, seq_len) int32 little-endian, domain index i
    <cache_dir>/<key>/validation_<i>.bin   (m_i, seq_len) int32 little-endian

A build writes into ``<cache_dir>/.tmp-<key>-*`` and renames it with ``os.replace``, so a killed
build leaves no half cache (only a ``.tmp-*`` folder, safe to delete).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import operator
import os
import shutil
import struct
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddk._io import json_fingerprint
from ddk.data.records import _check_domain_name
from ddk.partition.partitioner import stable_unit_hash

__all__ = ["DomainCollator", "DomainSequenceDataset", "PackedDomains", "pack_domains", "tokenizer_hash"]

_FORMAT = "ddk.pack_domains"
_VERSION = 1
_DTYPE = np.dtype("<i4")
_SCAN_BATCH = 1000  # records per batch of the hashing pass
_TOKENIZE_BATCH = 1000  # documents per tokenizer call (training side)
_META = "meta.json"


# ---------------------------------------------------------------------------- dataset / collator
class DomainSequenceDataset(torch.utils.data.Dataset):
    """Packed sequences of several domains as one map-style dataset.

    The global index of row ``j`` of domain ``d`` is ``offsets[d] + j``: domains are concatenated
    in ``domain_names`` order, the convention of ``ddk.MixtureSampler``, so
    ``MixtureSampler(dataset.domain_sizes, ...)`` draws indices of this dataset and its
    ``domain_of(i)`` equals ``dataset[i]["domain_id"]``.

    Args:
        arrays: per domain a ``(n_d, L)`` integer array (``np.ndarray`` or ``np.memmap``); ``L``
            is the same for all.
        names: ``(D,)`` domain names, one per array.

    Examples:
        >>> import numpy as np
        >>> ds = DomainSequenceDataset([np.arange(6, dtype=np.int32).reshape(2, 3),
        ...                             np.full((1, 3), 9, dtype=np.int32)], ["a", "b"])
        >>> ds.domain_sizes, ds.offsets, len(ds)
        ((2, 1), (0, 2), 3)
        >>> item = ds[2]
        >>> item["input_ids"].tolist(), item["input_ids"].dtype, item["domain_id"]
        ([9, 9, 9], torch.int64, 1)
    """

    def __init__(self, arrays: Sequence[np.ndarray], names: Sequence[str]) -> None:
        fn = "DomainSequenceDataset"
        if isinstance(names, str) or len(arrays) != len(names) or not arrays:
            raise ValueError(
                f"{fn}: names must give one name per array (at least one); got {len(arrays)} arrays and names {names!r}."
            )
        lengths = {a.shape[1] for a in arrays if getattr(a, "ndim", 0) == 2}
        if len(lengths) != 1 or any(getattr(a, "ndim", 0) != 2 for a in arrays):
            raise ValueError(
                f"{fn}: arrays must all be 2-D (n_d, L) with the same L; got shapes {[np.shape(a) for a in arrays]}."
            )
        self._arrays = list(arrays)
        self._names = tuple(names)
        self._sizes = tuple(int(a.shape[0]) for a in arrays)
        bounds = np.cumsum(self._sizes)
        self._bounds = [int(b) for b in bounds]  # end (exclusive) of each domain
        self._offsets = tuple([0] + self._bounds[:-1])

    @property
    def domain_names(self) -> tuple[str, ...]:
        """``(D,)`` domain names, in index order."""
        return self._names

    @property
    def domain_sizes(self) -> tuple[int, ...]:
        """``(D,)`` sequences per domain (pass to ``ddk.MixtureSampler``)."""
        return self._sizes

    @property
    def offsets(self) -> tuple[int, ...]:
        """``(D,)`` global index of each domain's first sequence."""
        return self._offsets

    @property
    def seq_len(self) -> int:
        """Tokens per sequence ``L``."""
        return int(self._arrays[0].shape[1])

    def __len__(self) -> int:
        return self._bounds[-1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Sequence ``index``: ``{"input_ids": (L,) int64 tensor, "domain_id": int}``."""
        i = operator.index(index)
        total = self._bounds[-1]
        if i < 0:
            i += total
        if not 0 <= i < total:
            raise IndexError(f"DomainSequenceDataset: index must be in [0, {total}); got {index}.")
        d = bisect.bisect_right(self._bounds, i)
        row = np.array(self._arrays[d][i - self._offsets[d]], dtype=np.int64)
        return {"input_ids": torch.from_numpy(row), "domain_id": d}

    def __getstate__(self) -> dict[str, Any]:
        # A memory-mapped array travels to DataLoader workers as its file, not as its contents.
        state = self.__dict__.copy()
        state["_arrays"] = [
            ("memmap", a.filename, a.offset, a.shape, a.dtype.str)
            if isinstance(a, np.memmap) and a.filename is not None
            else a
            for a in self._arrays
        ]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state["_arrays"] = [
            np.memmap(a[1], dtype=np.dtype(a[4]), mode="r", offset=a[2], shape=a[3])
            if isinstance(a, tuple) and a and a[0] == "memmap"
            else a
            for a in state["_arrays"]
        ]
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"DomainSequenceDataset(domains={dict(zip(self._names, self._sizes))}, seq_len={self.seq_len})"


class DomainCollator:
    """``collate_fn`` of a ``DataLoader`` and ``data_collator`` of ``transformers.Trainer``.

    Args:
        pad_token_id: id padding features shorter than the longest; needed only when lengths
            differ.
        ignore_index: label of padded positions (and the value the loss ignores).

    A feature is a mapping with ``"input_ids"`` (a 1-D tensor, array or list of ints),
    ``"domain_id"`` (an int) and optionally ``"labels"`` (same length; default: the ids). A batch
    is ``{"input_ids": (B, L) int64, "labels": (B, L) int64, "domain_ids": (B,) int64}``; labels
    are *unshifted* (equal to ``input_ids``; the loss shifts them). When lengths differ, features
    are right-padded to the longest with ``pad_token_id``, labels are ``ignore_index`` there and
    ``"attention_mask"`` ``(B, L)`` int64 (1 = token, 0 = pad) is added.

    Examples:
        >>> import torch
        >>> collate = DomainCollator(pad_token_id=0)
        >>> batch = collate([{"input_ids": torch.tensor([5, 6, 7]), "domain_id": 1},
        ...                  {"input_ids": [8, 9], "domain_id": 0}])
        >>> batch["input_ids"].tolist(), batch["labels"].tolist()
        ([[5, 6, 7], [8, 9, 0]], [[5, 6, 7], [8, 9, -100]])
        >>> batch["attention_mask"].tolist(), batch["domain_ids"].tolist()
        ([[1, 1, 1], [1, 1, 0]], [1, 0])
        >>> batch["input_ids"].dtype, batch["domain_ids"].shape
        (torch.int64, torch.Size([2]))
    """

    def __init__(self, pad_token_id: int | None = None, ignore_index: int = -100) -> None:
        fn = "DomainCollator"
        if pad_token_id is not None and (
            not isinstance(pad_token_id, (int, np.integer)) or isinstance(pad_token_id, bool) or pad_token_id < 0
        ):
            raise ValueError(f"{fn}: pad_token_id must be a non-negative int or None; got {pad_token_id!r}.")
        if not isinstance(ignore_index, (int, np.integer)) or isinstance(ignore_index, bool):
            raise TypeError(f"{fn}: ignore_index must be an int; got {ignore_index!r}.")
        self.pad_token_id = None if pad_token_id is None else int(pad_token_id)
        self.ignore_index = int(ignore_index)

    @staticmethod
    def _ids(fn: str, i: int, key: str, value: Any) -> torch.Tensor:
        t = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
        if t.dim() != 1 or (t.numel() and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)):
            raise ValueError(
                f"{fn}: features[{i}][{key!r}] must be a 1-D sequence of ints; got shape {tuple(t.shape)}, dtype {t.dtype}."
            )
        return t.to(torch.long)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Collate ``B`` features into one batch.

        Args:
            features: ``B`` mappings with ``"input_ids"`` ``(L_b,)`` ints, ``"domain_id"`` int and
                optionally ``"labels"`` ``(L_b,)`` ints.

        Returns:
            ``"input_ids"`` ``(B, L)`` int64, ``"labels"`` ``(B, L)`` int64 (unshifted),
            ``"domain_ids"`` ``(B,)`` int64, and ``"attention_mask"`` ``(B, L)`` int64 only when the
            lengths differ (``L = max L_b``).

        Raises:
            ValueError: malformed features, or unequal lengths without ``pad_token_id``.
        """
        fn = "DomainCollator"
        if isinstance(features, Mapping) or not isinstance(features, Sequence) or not features:
            raise ValueError(
                f"{fn}: features must be a non-empty list of mappings; got {type(features).__name__} {features!r:.60}."
            )
        ids: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []
        domains: list[int] = []
        for i, f in enumerate(features):
            if not isinstance(f, Mapping) or "input_ids" not in f or "domain_id" not in f:
                got = sorted(f) if isinstance(f, Mapping) else type(f).__name__
                raise ValueError(
                    f"{fn}: features[{i}] must be a mapping with 'input_ids' and 'domain_id' (items of DomainSequenceDataset); got {got}."
                )
            x = self._ids(fn, i, "input_ids", f["input_ids"])
            y = self._ids(fn, i, "labels", f["labels"]) if f.get("labels") is not None else x
            if y.shape != x.shape:
                raise ValueError(
                    f"{fn}: features[{i}]['labels'] must have the length of its input_ids {x.numel()}; got {y.numel()}."
                )
            d = f["domain_id"]
            if isinstance(d, torch.Tensor) and d.numel() == 1:
                d = d.item()
            if not isinstance(d, (int, np.integer)) or isinstance(d, bool) or d < 0:
                raise ValueError(f"{fn}: features[{i}]['domain_id'] must be a non-negative int; got {d!r}.")
            ids.append(x)
            labels.append(y)
            domains.append(int(d))
        lengths = [x.numel() for x in ids]
        out: dict[str, torch.Tensor] = {}
        if len(set(lengths)) == 1:
            out["input_ids"] = torch.stack(ids)
            out["labels"] = torch.stack(labels).clone()
        else:
            if self.pad_token_id is None:
                raise ValueError(
                    f"{fn}: features must all have the same length when pad_token_id is None; got lengths "
                    f"{sorted(set(lengths))} (pass DomainCollator(pad_token_id=tokenizer.pad_token_id))."
                )
            n, width = len(ids), max(lengths)
            out["input_ids"] = torch.full((n, width), self.pad_token_id, dtype=torch.long)
            out["labels"] = torch.full((n, width), self.ignore_index, dtype=torch.long)
            out["attention_mask"] = torch.zeros((n, width), dtype=torch.long)
            for r, (x, y) in enumerate(zip(ids, labels)):
                out["input_ids"][r, : x.numel()] = x
                out["labels"][r, : y.numel()] = y
                out["attention_mask"][r, : x.numel()] = 1
        out["domain_ids"] = torch.tensor(domains, dtype=torch.long)
        return out

    def __repr__(self) -> str:
        return f"DomainCollator(pad_token_id={self.pad_token_id}, ignore_index={self.ignore_index})"


# ---------------------------------------------------------------------------- result
@dataclass(frozen=True, eq=False)
class PackedDomains:
    """Packed train/validation sequences of every domain (what ``pack_domains`` returns).

    Attributes:
        names: ``(D,)`` sorted domain names; the order of weights, sampler domains and
            ``domain_id`` everywhere.
        seq_len: tokens per sequence ``L``.
        train: per domain a ``(n_i, L)`` int32 array (``np.memmap`` when cached).
        validation: per domain a ``(m_i, L)`` int32 array, ``1 <= m_i <= val_samples``.
        eos_token_id: the id appended after every document.
        key: content hash of the records, the tokenizer and the packing options (the cache
            folder's name).
        root: the cache folder ``<cache_dir>/<key>``, or ``None`` when not cached.
    """

    names: tuple[str, ...]
    seq_len: int
    train: tuple[np.ndarray, ...]
    validation: tuple[np.ndarray, ...]
    eos_token_id: int
    key: str
    root: Path | None

    @property
    def sizes(self) -> list[int]:
        """``(D,)`` training sequences per domain ``n_i``."""
        return [int(a.shape[0]) for a in self.train]

    def _index(self, domain: str | int) -> int:
        if isinstance(domain, str):
            if domain not in self.names:
                raise ValueError(
                    f"PackedDomains.validation_dataset: domain must be one of {list(self.names)}; got {domain!r}."
                )
            return self.names.index(domain)
        if isinstance(domain, (int, np.integer)) and not isinstance(domain, bool) and 0 <= domain < len(self.names):
            return int(domain)
        raise ValueError(
            f"PackedDomains.validation_dataset: domain must be a name or an index in [0, {len(self.names)}); got {domain!r}."
        )

    def train_dataset(self) -> DomainSequenceDataset:
        """All training sequences, domains concatenated in ``names`` order (``MixtureSampler`` indices)."""
        return DomainSequenceDataset(self.train, self.names)

    def validation_dataset(self, domain: str | int) -> DomainSequenceDataset:
        """The validation sequences of one domain (by name or index); its ``domain_id`` is 0."""
        i = self._index(domain)
        return DomainSequenceDataset([self.validation[i]], [self.names[i]])

    def validation_batches(self, batch_size: int) -> dict[str, list[dict[str, torch.Tensor]]]:
        """Validation batches per domain, the input of ``ddk.DiscrepancyEstimator``.

        Args:
            batch_size: sequences per batch (the last batch of a domain may be smaller).

        Returns:
            ``name -> [{"input_ids": (b, L) int64 tensor}, ...]`` in ``names`` order.
        """
        if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"PackedDomains.validation_batches: batch_size must be an int >= 1; got {batch_size!r}.")
        return {
            name: [
                {"input_ids": torch.from_numpy(np.array(arr[s : s + batch_size], dtype=np.int64))}
                for s in range(0, arr.shape[0], batch_size)
            ]
            for name, arr in zip(self.names, self.validation)
        }

    def __repr__(self) -> str:
        return (
            f"PackedDomains(names={self.names}, seq_len={self.seq_len}, train={self.sizes}, "
            f"validation={[int(a.shape[0]) for a in self.validation]}, key={self.key!r}, root={self.root})"
        )


# ---------------------------------------------------------------------------- tokenizer hash
def tokenizer_hash(tokenizer: Any) -> str:
    """Stable hash of what decides a ``transformers`` tokenizer's ids: vocabulary, merges,
    normalizer/pre-tokenizer, added and special tokens.

    For a fast tokenizer it hashes the canonical JSON of ``backend_tokenizer`` (less its
    padding/truncation state, which the calls here reset); otherwise the class name, the
    vocabulary with added tokens, the BPE ranks or SentencePiece model when present.

    Returns:
        16 hex digits, equal across processes and machines for the same tokenizer files.
    """
    parts: dict[str, Any] = {
        "special": {k: str(v) for k, v in sorted(dict(getattr(tokenizer, "special_tokens_map", {}) or {}).items())},
        "eos_token_id": getattr(tokenizer, "eos_token_id", None),
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and callable(getattr(backend, "to_str", None)):
        spec = json.loads(backend.to_str())
        spec.pop("padding", None)
        spec.pop("truncation", None)
        parts["backend"] = spec
    else:
        get_vocab = getattr(tokenizer, "get_vocab", None)
        if not callable(get_vocab):
            raise TypeError(
                f"tokenizer_hash: tokenizer must be a transformers tokenizer (with get_vocab); got {type(tokenizer).__name__}."
            )
        parts["class"] = type(tokenizer).__name__
        parts["vocab"] = sorted((int(i), str(t)) for t, i in get_vocab().items())
        ranks = getattr(tokenizer, "bpe_ranks", None)
        if isinstance(ranks, Mapping):
            parts["bpe_ranks"] = sorted((int(r), str(m)) for m, r in ranks.items())
        sp = getattr(tokenizer, "sp_model", None)
        if sp is not None and callable(getattr(sp, "serialized_model_proto", None)):
            parts["sp_model"] = hashlib.sha256(sp.serialized_model_proto()).hexdigest()
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------------------- records access
def _is_hf_dataset(obj: Any) -> bool:
    mod = sys.modules.get("datasets")
    return mod is not None and isinstance(obj, getattr(mod, "Dataset", ()))


class _Records:
    """Uniform access to a ``datasets.Dataset`` or a list of dicts with ``domain`` and ``text``
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

    def batches(self) -> Any:
        """``(start, columns dict of lists)`` over all records, in order."""
        if self._view is not None:  # a datasets.Dataset
            start = 0
            for b in self._view.iter(batch_size=_SCAN_BATCH):
                yield start, b
                start += len(b["domain"])
        else:
            for start in range(0, self.n, _SCAN_BATCH):
                chunk = self.data[start : start + _SCAN_BATCH]
                yield start, {c: [r.get(c) for r in chunk] for c in self._cols}

    def column(self, name: str, indices: np.ndarray) -> list[Any]:
        """Values of column ``name`` at ``indices`` (in that order)."""
        idx = [int(i) for i in indices]
        if self._view is not None:  # a datasets.Dataset
            return self._view[idx][name]
        return [self.data[i][name] for i in idx]

    def ids_array(self, i: int, value: Any) -> np.ndarray:
        """Pre-tokenized ids of record ``i`` as int32, checked."""
        try:
            arr = np.asarray(value)
        except (TypeError, ValueError):
            arr = np.asarray([], dtype=object)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"{self.fn}: {self.arg}[{i}]['input_ids'] must be a list of ints; got {value!r:.60}.")
        if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.int32).max):
            raise ValueError(
                f"{self.fn}: {self.arg}[{i}]['input_ids'] must be ids in [0, 2**31); got {int(arr.min())}..{int(arr.max())}."
            )
        return arr.astype(_DTYPE, copy=False)


@dataclass
class _Scan:
    codes: np.ndarray  # (N,) int32 domain code of each record
    names: list[str]  # code -> domain name
    digest: str  # sha256 of every domain and text/ids, in order
    split_hash: np.ndarray | None  # (N,) float64 stable_unit_hash of each document, if asked


def _scan(rec: _Records, *, seed: int, want_hash: bool, progress: bool) -> _Scan:
    """One pass over the records: check them, code the domains, hash the contents."""
    from tqdm.auto import tqdm

    fn, arg = rec.fn, rec.arg
    codes = np.empty(rec.n, dtype=np.int32)
    split_hash = np.empty(rec.n, dtype=np.float64) if want_hash else None
    code_of: dict[str, int] = {}
    sha = hashlib.sha256()
    sha.update(f"{_FORMAT}/{rec.tokens}/{rec.has_text}".encode())
    pack = struct.Struct("<Q").pack
    bar = tqdm(total=rec.n, desc=f"hash {arg}", unit=" rec", disable=not progress)
    for start, cols in rec.batches():
        for j, dom in enumerate(cols["domain"]):
            i = start + j
            if not isinstance(dom, str) or not dom:
                raise ValueError(f"{fn}: {arg}[{i}]['domain'] must be a non-empty str; got {dom!r:.60}.")
            c = code_of.get(dom)
            if c is None:
                _check_domain_name(fn, dom, f"{arg}[{i}]")
                c = code_of[dom] = len(code_of)
            codes[i] = c
            d = dom.encode("utf-8")
            sha.update(pack(len(d)))
            sha.update(d)
            key = None
            if rec.has_text:
                text = cols["text"][j]
                if not isinstance(text, str):
                    raise ValueError(f"{fn}: {arg}[{i}]['text'] must be a str; got {text!r:.60}.")
                t = text.encode("utf-8", "surrogatepass")
                sha.update(pack(len(t)))
                sha.update(t)
                key = text
            if rec.tokens == "input_ids":
                b = rec.ids_array(i, cols["input_ids"][j]).tobytes()
                sha.update(pack(len(b)))
                sha.update(b)
                if key is None:
                    key = hashlib.sha256(b).hexdigest()
            if split_hash is not None:
                assert key is not None  # every record has a text or an input_ids column
                split_hash[i] = stable_unit_hash(key, seed)
        bar.update(len(cols["domain"]))
    bar.close()
    return _Scan(codes, list(code_of), sha.hexdigest(), split_hash)


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


def _token_lists(rec: _Records, tokenizer: Any, indices: np.ndarray) -> list[np.ndarray]:
    """int32 ids of the documents at ``indices`` (tokenized, or read when pre-tokenized)."""
    if rec.tokens == "input_ids":
        return [rec.ids_array(int(i), v) for i, v in zip(indices, rec.column("input_ids", indices))]
    enc = tokenizer(rec.column("text", indices), add_special_tokens=False)
    return [np.asarray(x, dtype=_DTYPE) for x in enc["input_ids"]]


# ---------------------------------------------------------------------------- building
def _check_int(fn: str, arg: str, value: Any, low: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        raise ValueError(f"{fn}: {arg} must be an int >= {low}; got {value!r}.")
    return int(value)


def _cap_message(capped: Mapping[str, int], val_samples: int, max_val_fraction: float) -> str:
    listing = ", ".join(f"{n!r} ({c})" for n, c in capped.items())
    return (
        f"pack_domains: validation capped at max_val_fraction={max_val_fraction} of each domain's documents, "
        f"below val_samples={val_samples} sequences, for {listing}. Add documents to these domains, lower "
        "val_samples, or pass validation= records for a full validation set."
    )


def _entry(name: str, windows: _Windows) -> dict[str, Any]:
    return {"file": name, "shape": [windows.windows, windows.L], "sha256": windows.sha256}


def _open_cache(root: Path, *, key: str, verify: bool, val_samples: int, max_val_fraction: float) -> PackedDomains:
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
    if meta.get("capped"):
        warnings.warn(_cap_message(meta["capped"], val_samples, max_val_fraction), stacklevel=3)
    return PackedDomains(
        names=tuple(meta["names"]),
        seq_len=L,
        train=tuple(arrays["train"]),
        validation=tuple(arrays["validation"]),
        eos_token_id=int(meta["eos_token_id"]),
        key=key,
        root=root,
    )


def pack_domains(
    records: Any,
    tokenizer: Any,
    *,
    seq_len: int,
    val_samples: int = 500,
    validation: Any = None,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    domains: Sequence[str] | None = None,
    max_val_fraction: float = 0.5,
    progress: bool = True,
    verify: bool = False,
) -> PackedDomains:
    """Tokenize, split and pack each domain's documents into ``(n, seq_len)`` int32 sequences.

    See the module docstring for the packing, the split rule and the cache layout.

    Args:
        records: a ``datasets.Dataset`` (as ``load_records`` returns) or a list of dicts with a
            ``"domain"`` (str) and a ``"text"`` (str) column, or a pre-tokenized
            ``"input_ids"`` column (list of ints per record; then the text, if present, is only
            the split key, else the ids' digest is).
        tokenizer: a ``transformers`` tokenizer with an EOS token; called as
            ``tokenizer(texts, add_special_tokens=False)`` in batches.
        seq_len: tokens per sequence ``L`` (``>= 2``).
        val_samples: at most this many validation sequences per domain (paper: 500).
        validation: optional records of the same form packed as the validation split (file
            order, the first ``val_samples`` sequences of each domain); its domains must be the
            training domains. Without it, each domain is split by the stable hash of its texts.
        seed: seed of the split hash.
        cache_dir: folder of the cache (``<cache_dir>/<key>``); ``None`` keeps everything in
            memory. A second call with the same contents memory-maps the files without
            tokenizing.
        domains: keep only these domains (each must occur in ``records``); default all.
        max_val_fraction: most documents of a domain the hash split may give to validation, in
            ``(0, 1)``.
        progress: show tqdm bars (``"tokenize <domain>"``).
        verify: on a cache hit, check every file's sha256 (default: only its size).

    Returns:
        ``PackedDomains``: per domain, in sorted name order, ``train`` ``(n_i, L)`` and
        ``validation`` ``(m_i, L)`` int32 arrays (``np.memmap`` when cached), with the cache key.

    Raises:
        ValueError: bad arguments or records, a tokenizer without EOS, unknown ``domains``,
            validation records with other domains, a domain too small for one training and one
            validation sequence, a damaged cache file.
        TypeError: records of the wrong type.

    Warns:
        UserWarning: once, naming every domain whose validation was capped by
            ``max_val_fraction`` below ``val_samples`` sequences, with its count.
    """
    fn = "pack_domains"
    L = _check_int(fn, "seq_len", seq_len, 2)
    val_samples = _check_int(fn, "val_samples", val_samples, 1)
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"{fn}: seed must be an int; got {seed!r}.")
    if (
        not isinstance(max_val_fraction, (int, float))
        or isinstance(max_val_fraction, bool)
        or not 0.0 < max_val_fraction < 1.0
    ):
        raise ValueError(f"{fn}: max_val_fraction must be in (0, 1); got {max_val_fraction!r}.")
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is None:
        raise ValueError(
            f"{fn}: tokenizer must have an EOS token (appended after every document); got eos_token_id=None. "
            "Set tokenizer.eos_token = '<its end-of-text token>' first."
        )
    eos_id = int(eos_id)
    keep: list[str] | None = None
    if domains is not None:
        if (
            isinstance(domains, str)
            or not all(isinstance(d, str) for d in domains)
            or not domains
            or len(set(domains)) != len(domains)
        ):
            raise ValueError(f"{fn}: domains must be a non-empty list of unique domain names or None; got {domains!r}.")
        keep = sorted(domains)
    train_rec = _Records(fn, "records", records)
    val_rec = _Records(fn, "validation", validation) if validation is not None else None

    scan = _scan(train_rec, seed=int(seed), want_hash=val_rec is None, progress=progress)
    val_scan = _scan(val_rec, seed=int(seed), want_hash=False, progress=progress) if val_rec is not None else None
    present = sorted(scan.names)
    if keep is not None:
        unknown = [d for d in keep if d not in scan.names]
        if unknown:
            raise ValueError(f"{fn}: domains must be names found in records {present}; got unknown {unknown}.")
    names = keep if keep is not None else present
    if val_scan is not None:
        val_names = {d for d in val_scan.names if keep is None or d in keep}
        missing, extra = sorted(set(names) - val_names), sorted(val_names - set(names))
        if missing or extra:
            raise ValueError(
                f"{fn}: validation must have exactly the training domains {names}; got missing {missing}, extra {extra}."
            )

    tok_hash = tokenizer_hash(tokenizer)
    key = json_fingerprint(
        {
            "format": _FORMAT,
            "version": _VERSION,
            "records": scan.digest,
            "validation": val_scan.digest if val_scan is not None else None,
            "tokenizer": tok_hash,
            "eos_token_id": eos_id,
            "seq_len": L,
            "val_samples": val_samples,
            "seed": int(seed),
            "max_val_fraction": float(max_val_fraction),
            "domains": keep,
        }
    )

    root: Path | None = None
    tmp: Path | None = None
    if cache_dir is not None:
        base = Path(cache_dir).expanduser()
        root = base / key
        if (root / _META).is_file():
            return _open_cache(root, key=key, verify=verify, val_samples=val_samples, max_val_fraction=max_val_fraction)
        if root.exists():
            raise ValueError(
                f"{fn}: cache folder {root} must hold {_META} (it is not a finished cache); got a folder "
                "without it. Delete the folder to rebuild it."
            )
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=base))

    try:
        built = _build(
            train_rec,
            val_rec,
            scan,
            val_scan,
            names,
            tokenizer,
            L=L,
            val_samples=val_samples,
            max_val_fraction=float(max_val_fraction),
            eos_id=eos_id,
            tmp=tmp,
            progress=progress,
        )
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    train_arrays, val_arrays, entries, capped = built
    if tmp is None or root is None:
        if capped:
            warnings.warn(_cap_message(capped, val_samples, max_val_fraction), stacklevel=2)
        return PackedDomains(
            names=tuple(names),
            seq_len=L,
            train=tuple(train_arrays),
            validation=tuple(val_arrays),
            eos_token_id=eos_id,
            key=key,
            root=None,
        )

    meta = {
        "format": _FORMAT,
        "version": _VERSION,
        "key": key,
        "names": names,
        "seq_len": L,
        "eos_token_id": eos_id,
        "tokenizer_hash": tok_hash,
        "dtype": _DTYPE.str,
        "capped": capped,
        "options": {
            "val_samples": val_samples,
            "seed": int(seed),
            "max_val_fraction": float(max_val_fraction),
            "domains": keep,
            "split": "validation records" if val_rec is not None else "hash",
        },
        "train": entries["train"],
        "validation": entries["validation"],
    }
    (tmp / _META).write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    try:
        os.replace(tmp, root)
    except OSError:
        # Another process finished the same key first: its cache is as good as ours.
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / _META).is_file():
            raise
    return _open_cache(root, key=key, verify=False, val_samples=val_samples, max_val_fraction=max_val_fraction)


def _build(
    train_rec: _Records,
    val_rec: _Records | None,
    scan: _Scan,
    val_scan: _Scan | None,
    names: list[str],
    tokenizer: Any,
    *,
    L: int,
    val_samples: int,
    max_val_fraction: float,
    eos_id: int,
    tmp: Path | None,
    progress: bool,
) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, list[dict[str, Any]]], dict[str, int]]:
    """Pack every domain, one at a time; returns in-memory arrays (``tmp`` None) or file entries."""
    from tqdm.auto import tqdm

    fn = "pack_domains"
    eos = np.array([eos_id], dtype=_DTYPE)
    train_arrays: list[np.ndarray] = []
    val_arrays: list[np.ndarray] = []
    entries: dict[str, list[dict[str, Any]]] = {"train": [], "validation": []}
    capped: dict[str, int] = {}
    for d, name in enumerate(names):
        idx = np.flatnonzero(scan.codes == scan.names.index(name))  # record order
        n_docs = len(idx)
        bar = tqdm(total=n_docs, desc=f"tokenize {name}", unit=" doc", disable=not progress)
        val_w = _Windows(L, tmp / f"validation_{d}.bin" if tmp is not None else None, limit=val_samples)
        leftover: dict[int, np.ndarray] = {}  # tokenized while filling validation, then not taken
        if val_rec is not None and val_scan is not None:
            vidx = np.flatnonzero(val_scan.codes == val_scan.names.index(name))
            for s in range(0, len(vidx), 64):
                if val_w.full:
                    break
                for ids in _token_lists(val_rec, tokenizer, vidx[s : s + 64]):
                    if val_w.full:
                        break
                    val_w.add(ids, eos)
            train_idx = idx
        else:
            assert scan.split_hash is not None
            h = scan.split_hash[idx]
            order = idx[np.lexsort((idx, h))]  # hash order, ties by record position
            max_docs = math.floor(max_val_fraction * n_docs + 1e-9)
            taken = 0
            step = 16
            while taken < max_docs and not val_w.full:
                chunk = order[taken : min(taken + step, max_docs)]
                for i, ids in zip(chunk, _token_lists(train_rec, tokenizer, chunk)):
                    if val_w.full:
                        leftover[int(i)] = ids
                    else:
                        val_w.add(ids, eos)
                        taken += 1
                step = min(2 * step, _TOKENIZE_BATCH)
            bar.update(taken)
            train_idx = idx[~np.isin(idx, order[:taken])]
        val_arr = val_w.close()

        train_w = _Windows(L, tmp / f"train_{d}.bin" if tmp is not None else None)
        for s in range(0, len(train_idx), _TOKENIZE_BATCH):
            chunk = train_idx[s : s + _TOKENIZE_BATCH]
            need = np.array([i for i in chunk if int(i) not in leftover], dtype=np.int64)
            fresh = iter(_token_lists(train_rec, tokenizer, need)) if len(need) else iter(())
            for i in chunk:
                known = leftover.pop(int(i), None)
                train_w.add(next(fresh) if known is None else known, eos)
            bar.update(len(chunk))
        train_arr = train_w.close()
        bar.close()

        if train_w.windows < 1 or val_w.windows < 1:
            raise ValueError(
                f"{fn}: domain {name!r} must give at least one training and one validation sequence of seq_len={L} "
                f"tokens; got {train_w.windows} training and {val_w.windows} validation sequences from its "
                f"{train_w.tokens + val_w.tokens} tokens ({n_docs} documents, max_val_fraction={max_val_fraction}). Lower seq_len or "
                f"val_samples, or add data to {name!r}."
            )
        if val_rec is None and val_w.windows < val_samples:
            capped[name] = val_w.windows
        if tmp is not None:
            entries["train"].append(_entry(f"train_{d}.bin", train_w))
            entries["validation"].append(_entry(f"validation_{d}.bin", val_w))
        else:
            assert train_arr is not None and val_arr is not None
            train_arrays.append(train_arr)
            val_arrays.append(val_arr)
    return train_arrays, val_arrays, entries, capped
