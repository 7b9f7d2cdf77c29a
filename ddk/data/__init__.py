"""Users' corpora in: load domain-labelled records, split per domain, pack and cache token sequences.

* :func:`load_records` — JSONL, JSON, Parquet, CSV or a ``datasets.save_to_disk`` folder (a hub
  dataset name passes to ``datasets.load_dataset``) -> a ``datasets.Dataset`` of ``text``/``domain``.
* :func:`pack_domains` — tokenize, split each domain into train/validation by a stable hash, pack
  fixed-length sequences *within* each domain, cache them memory-mapped under a content hash.
* :func:`pack_files` — the same from the files, for a corpus larger than memory: records streamed
  batch by batch (:class:`RecordStream`), tokenized in parallel processes, packed to disk as they
  come, built once per cache folder (the other ``torchrun`` ranks wait, then open it).
* :class:`DomainSequenceDataset` / :class:`DomainCollator` — the packed sequences with their
  ``domain_id`` for a ``DataLoader`` driven by :class:`ddk.MixtureSampler`.
* :func:`check_tokenizers` — the one tokenizer rule: teacher and student tokenize identically
  (ids of a probe text, size, special tokens); only padding rows of the models may differ.
* :func:`build_teacher_cache` / :class:`TeacherCache` — an offline teacher: its top-k
  log-probabilities over the packed data, per domain, memory-mapped and resumable.

``datasets`` and ``transformers`` are imported only when used. (The demo corpus builder, which
downloads Debian and PyPI packages, is part of the application: ``ddk.recipes.corpus``.)
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "load_records": "ddk.data.records",
    "RecordStream": "ddk.data.records",
    "DomainCollator": "ddk.data.packed",
    "DomainSequenceDataset": "ddk.data.packed",
    "PackedDomains": "ddk.data.packed",
    "pack_domains": "ddk.data.packing",
    "pack_files": "ddk.data.streaming",
    "tokenizer_hash": "ddk.data.packing",
    "check_tokenizers": "ddk.data.tokenizer_check",
    "tokenizer_signature": "ddk.data.tokenizer_check",
    "TeacherCache": "ddk.data.teacher_cache",
    "TeacherCacheCollator": "ddk.data.teacher_cache",
    "TeacherCacheDataset": "ddk.data.teacher_cache",
    "build_teacher_cache": "ddk.data.teacher_cache",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ddk.data' has no attribute {name!r}")
