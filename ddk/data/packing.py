"""``pack_domains``: domain-labelled records -> fixed-length token sequences per domain, split into
train and validation, cached memory-mapped under a content hash; and ``tokenizer_hash``, the
tokenizer's part of that hash.

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

The result is a ``ddk.data.packed.PackedDomains``. The steps from records to token windows are in
``ddk.data.tokens``; the cache (``cache_dir`` given: one folder per key, memory-mapped, built
atomically) is laid out as ``ddk.data.pack_cache`` describes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ddk._io import json_fingerprint, warn_user
from ddk.data.pack_cache import _META, _VERSION, _commit, _entry, _new_build_folder, _open_cache
from ddk.data.packed import PackedDomains
from ddk.data.tokens import _DTYPE, _FORMAT, _Records, _Scan, _scan, _token_lists, _Windows

__all__ = ["pack_domains", "tokenizer_hash"]

_TOKENIZE_BATCH = 1000  # documents per tokenizer call (training side)


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


def _vocab_size(tokenizer: Any) -> int:
    """The bound of the tokenizer's ids: ``len(tokenizer)`` (added tokens included), else one past
    its largest vocabulary id (and its EOS)."""
    try:
        n = len(tokenizer)
    except TypeError:
        get_vocab = getattr(tokenizer, "get_vocab", None)
        ids = list(get_vocab().values()) if callable(get_vocab) else []
        n = max((int(i) for i in ids), default=-1) + 1
    eos = getattr(tokenizer, "eos_token_id", None)
    return max(int(n), int(eos) + 1 if eos is not None else 0)


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


def _warn_capped(capped: Mapping[str, int], val_samples: int, max_val_fraction: float) -> None:
    """Warn the caller of ``pack_domains`` (once, all domains in one message) if any validation was capped."""
    if capped:
        warn_user(_cap_message(capped, val_samples, max_val_fraction))


def _warn_overlap(scan: _Scan, val_scan: _Scan, names: Sequence[str]) -> None:
    """Warn (once, per domain) about validation records whose text is also a training record's."""
    assert scan.key_hash is not None and val_scan.key_hash is not None
    found = {}
    for name in names:
        train = scan.key_hash[scan.codes == scan.names.index(name)]
        val = val_scan.key_hash[val_scan.codes == val_scan.names.index(name)]
        n = int(np.isin(val, train).sum())
        if n:
            found[name] = f"{name!r} {n} of {val.size}"
    if found:
        warn_user(
            f"pack_domains: validation records must not occur in the training records; got {len(found)} domain(s) "
            f"with the same text in both: {', '.join(found.values())} validation records. Their validation CE "
            "measures memorised text: remove these records from the training data or from the validation data."
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

    See the module docstring for the packing and the split rule, and ``ddk.data.pack_cache`` for
    the cache layout.

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
        verify: on a cache hit, check every file's sha256 and token ids even if the cache's stamp
            vouches for them (by default they are checked when the files changed since the last
            check, see ``ddk.data.pack_cache``).

    Returns:
        ``PackedDomains``: per domain, in sorted name order, ``train`` ``(n_i, L)`` and
        ``validation`` ``(m_i, L)`` int32 arrays (``ddk.data.mapped.MappedRows`` when cached: read
        on demand, no file held open per domain), with the cache key.

    Raises:
        ValueError: bad arguments or records, a tokenizer without EOS, unknown ``domains``,
            validation records with other domains, a domain too small for one training and one
            validation sequence, a damaged cache file.
        TypeError: records of the wrong type.

    Warns:
        UserWarning: once, naming every domain whose validation was capped by
            ``max_val_fraction`` below ``val_samples`` sequences, with its count.
        UserWarning: once, naming every domain of ``validation`` records whose text is also a
            training record's (exact match), with their count.

    Examples:
        >>> class Chars:  # a toy tokenizer: one id per character, EOS 0
        ...     eos_token_id = 0
        ...     def get_vocab(self):
        ...         return {chr(i): i for i in range(32, 127)}
        ...     def __call__(self, texts, add_special_tokens=False):
        ...         return {"input_ids": [[ord(c) for c in t] for t in texts]}
        >>> records = [{"domain": d, "text": f"{d} document {i}"} for d in ("math", "code") for i in range(6)]
        >>> packed = pack_domains(records, Chars(), seq_len=8, val_samples=2, progress=False)
        >>> packed.names, packed.sizes, [a.shape for a in packed.validation]
        (('code', 'math'), [10, 10], [(2, 8), (2, 8)])
        >>> packed.train[0].dtype, int(packed.train[0][1, -1]) == Chars.eos_token_id
        (dtype('int32'), True)
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
    vocab = _vocab_size(tokenizer)
    train_rec = _Records(fn, "records", records, vocab=vocab)
    val_rec = _Records(fn, "validation", validation, vocab=vocab) if validation is not None else None

    keys = val_rec is not None  # validation records: find those that are training records too
    scan = _scan(train_rec, seed=int(seed), want_hash=val_rec is None, progress=progress, want_keys=keys)
    val_scan = (
        _scan(val_rec, seed=int(seed), want_hash=False, progress=progress, want_keys=True)
        if val_rec is not None
        else None
    )
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
        _warn_overlap(scan, val_scan, names)

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
        root = Path(cache_dir).expanduser() / key
        if (root / _META).is_file():
            packed, capped = _open_cache(root, key=key, verify=verify, vocab=vocab)
            _warn_capped(capped, val_samples, max_val_fraction)
            return packed
        tmp = _new_build_folder(root)

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
        _warn_capped(capped, val_samples, max_val_fraction)
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
    _commit(tmp, root, meta)
    packed, capped = _open_cache(root, key=key, verify=False, vocab=vocab)
    _warn_capped(capped, val_samples, max_val_fraction)
    return packed


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
