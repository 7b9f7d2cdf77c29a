"""The packed sequences and their batches: what ``pack_domains`` returns and how a ``DataLoader``
reads it.

* :class:`PackedDomains` — every domain's train/validation ``(n, L)`` int32 arrays (in memory, or
  memory-mapped from the cache), with their training and validation datasets.
* :class:`DomainSequenceDataset` — the sequences of several domains as one map-style dataset, indexed
  as ``ddk.MixtureSampler`` draws.
* :class:`DomainCollator` — its items (or any ``input_ids``/``domain_id`` features) as a batch.
"""

from __future__ import annotations

import bisect
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddk.data.mapped import Rows

__all__ = ["DomainCollator", "DomainSequenceDataset", "PackedDomains"]


# ---------------------------------------------------------------------------- dataset / collator
class DomainSequenceDataset(torch.utils.data.Dataset):
    """Packed sequences of several domains as one map-style dataset.

    The global index of row ``j`` of domain ``d`` is ``offsets[d] + j``: domains are concatenated
    in ``domain_names`` order, the convention of ``ddk.MixtureSampler``, so
    ``MixtureSampler(dataset.domain_sizes, ...)`` draws indices of this dataset and its
    ``domain_of(i)`` equals ``dataset[i]["domain_id"]``.

    Args:
        arrays: per domain a ``(n_d, L)`` integer array (``np.ndarray``, ``np.memmap`` or
            ``ddk.data.mapped.MappedRows``); ``L``
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

    def __init__(self, arrays: Sequence[Rows], names: Sequence[str]) -> None:
        fn = "DomainSequenceDataset"
        if isinstance(names, str) or len(arrays) != len(names) or not arrays:
            raise ValueError(
                f"{fn}: names must give one name per array (at least one); got {len(arrays)} arrays and names {names!r}."
            )
        lengths = {a.shape[1] for a in arrays if getattr(a, "ndim", 0) == 2}
        if len(lengths) != 1 or any(getattr(a, "ndim", 0) != 2 for a in arrays):
            raise ValueError(
                f"{fn}: arrays must all be 2-D (n_d, L) with the same L; got shapes {[getattr(a, 'shape', None) for a in arrays]}."
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
        train: per domain a ``(n_i, L)`` int32 array (when cached a ``ddk.data.mapped.MappedRows``,
            read from its file on demand: no file stays open per domain).
        validation: per domain a ``(m_i, L)`` int32 array, ``1 <= m_i <= val_samples``.
        eos_token_id: the id appended after every document.
        key: content hash of the records, the tokenizer and the packing options (the cache
            folder's name).
        root: the cache folder ``<cache_dir>/<key>``, or ``None`` when not cached.
    """

    names: tuple[str, ...]
    seq_len: int
    train: tuple[Rows, ...]
    validation: tuple[Rows, ...]
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
