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

The result is a ``ddk.data.packed.PackedDomains``. The build streams (``ddk.data.build``): the
records are read batch by batch, tokenized in ``num_proc`` processes in order, and each domain's
tokens go to disk as they come (``ddk.data.assemble``), so memory does not grow with the corpus
(beyond the records themselves, when they are a list in memory; a ``datasets.Dataset`` is read from
its Arrow files). The result is the same for every ``num_proc``, and byte for byte the one the
former single-process packing gave (same key, same files). The cache (``cache_dir`` given: one
folder per key, memory-mapped, built atomically) is laid out as ``ddk.data.pack_cache`` describes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ddk.data.build import _build, _Options, _Side
from ddk.data.packed import PackedDomains
from ddk.data.token_workers import resolve_num_proc
from ddk.data.tokens import _Batch, _Records

__all__ = ["pack_domains", "tokenizer_hash"]


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


def _options(
    fn: str,
    tokenizer: Any,
    *,
    seq_len: Any,
    val_samples: Any,
    seed: Any,
    max_val_fraction: Any,
    domains: Any,
    validation: bool,
) -> _Options:
    """The packing options checked (``fn`` names the public function in errors)."""
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
    return _Options(
        fn=fn,
        seq_len=L,
        val_samples=val_samples,
        seed=int(seed),
        max_val_fraction=float(max_val_fraction),
        keep=keep,
        eos_id=int(eos_id),
        vocab=_vocab_size(tokenizer),
        tokenizer_hash=tokenizer_hash(tokenizer),
        validation=validation,
    )


def _side(rec: _Records, validation: bool) -> _Side:
    def batches() -> Iterator[_Batch]:
        return rec.batches()

    return _Side(rec.arg, batches, rec.tokens, rec.has_text, validation, total=rec.n)


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
    num_proc: int | None = None,
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
        progress: show tqdm bars (``"tokenize records"``; ``"hash records"`` when an existing
            cache of the same options may hold them).
        verify: on a cache hit, check every file's sha256 and token ids even if the cache's stamp
            vouches for them (by default they are checked when the files changed since the last
            check, see ``ddk.data.pack_cache``).
        num_proc: processes that tokenize (``None`` or 0: the CPU count); the result does not
            depend on it. A corpus of one batch (1,000 records or 1 MiB of text) is tokenized
            in this process.

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
    sides = [_side(_Records(fn, "records", records), validation=False)]
    if validation is not None:
        sides.insert(0, _side(_Records(fn, "validation", validation), validation=True))
    return _build(
        opts,
        sides,
        tokenizer,
        cache_dir=Path(cache_dir).expanduser() if cache_dir is not None else None,
        num_proc=resolve_num_proc(fn, num_proc),
        progress=progress,
        verify=verify,
    )
