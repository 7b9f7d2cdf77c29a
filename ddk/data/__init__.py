"""The real multi-domain corpus: package sources, the builder, JSONL I/O and the tokenizer.

``build_corpus`` collects the eight built-in domains (DESIGN.md section 4) and any user domains
into per-domain ``train``/``validation`` JSONL with a manifest; ``load_corpus`` returns them as a
``datasets.DatasetDict``; ``train_tokenizer`` fits a byte-level BPE on the training split.
``datasets``, ``tokenizers`` and ``transformers`` are imported only when used.
"""

from ddk.data.corpus import (
    CorpusConfig,
    CorpusError,
    build_corpus,
    domain_texts,
    jsonl_units,
    load_corpus,
    load_manifest,
    read_jsonl,
    split_units,
)
from ddk.data.sources import DOMAINS, DomainUnavailable, PackageCache, Unit, folder_units
from ddk.data.tokenizer import load_tokenizer, train_tokenizer

__all__ = [
    "DOMAINS",
    "CorpusConfig",
    "CorpusError",
    "DomainUnavailable",
    "PackageCache",
    "Unit",
    "build_corpus",
    "domain_texts",
    "folder_units",
    "jsonl_units",
    "load_corpus",
    "load_manifest",
    "load_tokenizer",
    "read_jsonl",
    "split_units",
    "train_tokenizer",
]
