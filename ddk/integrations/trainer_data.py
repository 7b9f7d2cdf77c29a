"""The data side of ``DDKTrainer``: the records it packs, the items and batches it feeds
``transformers.Trainer`` (the sampler's global index on each item, one domain id per sequence),
and the per-domain validation sets it evaluates on."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ddk.engine.components import VALIDATION_SPLIT_SEED

__all__: list[str] = []  # private to ddk.integrations.transformers

INDEX_KEY = "ddk_index"


class IndexedDataset(Dataset[dict[str, Any]]):
    """Adds the sampler's global index to each item (checked against the item's own domain)."""

    def __init__(self, base: Any) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.base[i]
        if not isinstance(item, Mapping):
            raise TypeError(
                f"DDKTrainer: train_dataset items must be dicts (e.g. {{'input_ids': ...}}); got {type(item).__name__}."
            )
        return {**item, INDEX_KEY: int(i)}


class DomainBatcher:
    """The ``collate_fn``: batches items and attaches ``domain_ids`` ``(B,)`` int64 and ``labels``.

    Training items carry the sampler's global index; their domain is the item's ``domain_id`` (the
    domain column, through ``pack_domains``), which must equal the domain of the index in the
    sampler's layout (``domain_bounds``), or, for items without one, that domain. Evaluation items
    (no index) keep their ``domain_id`` if every item has one. ``labels`` default to ``input_ids``
    with padding (``attention_mask == 0``) set to -100, unshifted.
    """

    def __init__(
        self, collate: Any, domain_bounds: Sequence[int], domain_names: Sequence[str], keeps_domain_id: bool
    ) -> None:
        self.collate = collate
        self.bounds = np.asarray(domain_bounds, dtype=np.int64)  # end (exclusive) of each domain's indices
        self.names = tuple(domain_names)
        self.keeps_domain_id = keeps_domain_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        index = [f.get(INDEX_KEY) for f in features]
        own = [f.get("domain_id") for f in features]
        if all(i is not None for i in index):
            layout = np.searchsorted(self.bounds, np.asarray(index, dtype=np.int64), side="right")
            for i, d, s in zip(index, own, layout.tolist()):
                if d is not None and int(d) != s:
                    raise ValueError(
                        f"DDKTrainer: train_dataset item {i} must belong to domain {self.names[s]!r} (the sampler's "
                        f"domain of global index {i}: items ordered by domain, in the sampler's domain order); got "
                        f"domain_id {int(d)}."
                    )
            domains: list[int] | None = layout.tolist()
        elif all(d is not None for d in own):
            domains = [int(d) for d in own if d is not None]
        else:
            domains = None
        per_item: list[int | None] = [None] * len(features) if domains is None else list(domains)
        items = []
        for f, d in zip(features, per_item):
            item = {k: v for k, v in f.items() if k not in (INDEX_KEY, "domain_id")}
            if self.keeps_domain_id:
                item["domain_id"] = d if d is not None else 0
            items.append(item)
        batch = dict(self.collate(items))
        batch.pop("domain_id", None)
        if domains is not None:
            batch["domain_ids"] = torch.tensor(domains, dtype=torch.long)
        else:
            batch.pop("domain_ids", None)
        if batch.get("labels") is None:
            ids = batch["input_ids"]
            mask = batch.get("attention_mask")
            batch["labels"] = ids.clone() if mask is None else ids.masked_fill(mask == 0, -100)
        if all(i is not None for i in index):
            batch[INDEX_KEY] = torch.tensor(index, dtype=torch.long)
        return batch


class ValidationDataset(Dataset[dict[str, Any]]):
    """One domain's validation sequences as items ``{"input_ids": (L,), "domain_id": d}`` (for ``evaluate``)."""

    def __init__(self, batches: Sequence[Mapping[str, torch.Tensor]], domain_id: int) -> None:
        self.rows = [r for b in batches for r in b["input_ids"]]
        self.domain_id = domain_id

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.rows[i], "domain_id": self.domain_id}


def pack_records(cfg: Any, train_dataset: Any, eval_dataset: Any, tokenizer: Any) -> Any:
    """``PackedDomains`` of a ``DDKTrainer``'s ``train_dataset`` (and ``eval_dataset`` ``{domain: Dataset}``),
    packed to ``cfg.seq_len`` with the engine's validation split (``VALIDATION_SPLIT_SEED``)."""
    from ddk.data.packing import pack_domains

    fn = "DDKTrainer"
    if train_dataset is None:
        raise ValueError(
            f"{fn}: train_dataset must be a datasets.Dataset with a {cfg.domain_field!r} column; got None."
        )
    records = _records(fn, "train_dataset", train_dataset, cfg, tokenizer)
    seq_len = cfg.seq_len
    assert seq_len is not None  # _records raised for a None seq_len
    validation = None
    if eval_dataset is not None:
        if not isinstance(eval_dataset, Mapping) or not eval_dataset:
            raise TypeError(
                f"{fn}: eval_dataset must be None or a dict {{domain: Dataset}}; got {type(eval_dataset).__name__}."
            )
        import datasets

        parts = [
            _records(fn, f"eval_dataset[{name!r}]", ds, cfg, tokenizer, domain=str(name))
            for name, ds in eval_dataset.items()
        ]
        validation = datasets.concatenate_datasets(parts)
    with cfg.main_process_first(desc="DDK packing"):
        packed = pack_domains(
            records,
            tokenizer,
            seq_len=int(seq_len),
            val_samples=cfg.val_samples,
            validation=validation,
            seed=VALIDATION_SPLIT_SEED,  # the split of every client, whatever the training seed
            cache_dir=cfg.pack_cache_dir,
            progress=not cfg.disable_tqdm,
        )
    return packed


def _records(fn: str, name: str, data: Any, cfg: Any, tokenizer: Any, domain: str | None = None) -> Any:
    """``data`` checked and reduced to the columns ``pack_domains`` reads: ``domain`` (str) and
    ``text`` or ``input_ids``. ``domain``: the domain of every record (an ``eval_dataset`` entry)."""
    import datasets

    if isinstance(data, (list, tuple)) and all(isinstance(r, Mapping) for r in data):
        data = datasets.Dataset.from_list([dict(r) for r in data])
    if not isinstance(data, datasets.Dataset):
        raise TypeError(
            f"{fn}: {name} must be a datasets.Dataset (or a list of dicts) with a {cfg.domain_field!r} column; "
            f"got {type(data).__name__}."
        )
    cols = list(data.column_names)
    if domain is None and cfg.domain_field not in cols:
        raise ValueError(
            f"{fn}: {name} must have the domain column {cfg.domain_field!r} (DDKConfig.domain_field); "
            f"got columns {cols}."
        )
    tokens = "input_ids" if "input_ids" in cols else cfg.text_field
    if tokens not in cols:
        raise ValueError(
            f"{fn}: {name} must have the text column {cfg.text_field!r} (DDKConfig.text_field) or a "
            f"pre-tokenized 'input_ids' column; got columns {cols}."
        )
    if tokenizer is None:
        raise ValueError(
            f"{fn}: processing_class must be the tokenizer of the student and the teacher (packing appends its "
            "EOS token after every document); got None."
        )
    if cfg.seq_len is None:
        raise ValueError(
            f"{fn}: args.seq_len must be set (tokens per packed sequence, e.g. 1024; text and input_ids rows are "
            "both packed); got None."
        )
    keep = [tokens] + ([cfg.text_field] if tokens == "input_ids" and cfg.text_field in cols else [])
    data = data.select_columns(keep + ([cfg.domain_field] if domain is None else []))
    if cfg.text_field in data.column_names and cfg.text_field != "text":
        data = data.rename_column(cfg.text_field, "text")  # with input_ids: the split key only
    if domain is not None:
        return data.add_column("domain", [domain] * len(data))
    if cfg.domain_field != "domain":
        data = data.rename_column(cfg.domain_field, "domain")
    feature = data.features["domain"]
    if isinstance(feature, datasets.ClassLabel):
        data = data.cast_column("domain", datasets.Value("string"))  # the label names
    elif getattr(feature, "dtype", None) != "string":
        data = data.map(
            lambda b: {"domain": [str(x) for x in b["domain"]]},
            batched=True,
            features=datasets.Features({**data.features, "domain": datasets.Value("string")}),
        )
    return data
