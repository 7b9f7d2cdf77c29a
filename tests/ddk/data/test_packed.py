"""Tests of ``ddk.data.packed``: the packed result's datasets and validation batches, the dataset's
indices against ``MixtureSampler``, and the collator (tiny local tokenizer, no hub access)."""

from __future__ import annotations

import pickle
import re
from typing import Any

import numpy as np
import pytest
import torch

from ddk import MixtureSampler
from ddk.data.mapped import MappedRows
from ddk.data.packed import DomainCollator
from ddk.data.packing import pack_domains

L = 16


def _quiet(**kw: Any) -> dict[str, Any]:
    return dict(seq_len=L, progress=False, **kw)


def test_domain_sequence_dataset_indices_agree_with_mixture_sampler(tok, records, tmp_path):
    packed = pack_domains(records, tok, cache_dir=tmp_path, **_quiet(val_samples=3))
    ds = packed.train_dataset()
    assert ds.domain_names == packed.names and ds.domain_sizes == tuple(packed.sizes) and len(ds) == sum(packed.sizes)
    assert ds.offsets == (0, packed.sizes[0], packed.sizes[0] + packed.sizes[1])
    sampler = MixtureSampler(ds.domain_sizes, global_batch_size=6, weights=[0.5, 0.3, 0.2], seed=0, num_batches=5)
    assert ds.offsets == sampler.offsets
    for i in range(len(ds)):
        item = ds[i]
        d = item["domain_id"]
        assert d == sampler.domain_of(i)
        assert item["input_ids"].dtype == torch.int64 and item["input_ids"].shape == (L,)
        np.testing.assert_array_equal(item["input_ids"].numpy(), packed.train[d][i - ds.offsets[d]])
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=DomainCollator())
    for batch in loader:
        assert batch["input_ids"].shape == (6, L) and "attention_mask" not in batch
    with pytest.raises(
        IndexError, match=re.escape(f"DomainSequenceDataset: index must be in [0, {len(ds)}); got {len(ds)}.")
    ):
        ds[len(ds)]
    assert ds[-1]["domain_id"] == 2 and ds[np.int64(0)]["domain_id"] == 0
    clone = pickle.loads(pickle.dumps(ds))  # a DataLoader worker gets the files, not their contents
    assert isinstance(clone._arrays[0], MappedRows) and torch.equal(clone[5]["input_ids"], ds[5]["input_ids"])


def test_packed_domains_validation_sets(tok, records):
    packed = pack_domains(records, tok, **_quiet(val_samples=5))
    batches = packed.validation_batches(2)
    assert list(batches) == list(packed.names)
    for d, name in enumerate(packed.names):
        assert [b["input_ids"].shape for b in batches[name]] == [(2, L), (2, L), (1, L)]
        assert all(b["input_ids"].dtype == torch.int64 for b in batches[name])
        np.testing.assert_array_equal(torch.cat([b["input_ids"] for b in batches[name]]).numpy(), packed.validation[d])
    one = packed.validation_dataset("math")
    assert one.domain_names == ("math",) and len(one) == 5 and one[0]["domain_id"] == 0
    assert packed.validation_dataset(1).domain_names == ("math",)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "PackedDomains.validation_dataset: domain must be one of ['code', 'math', 'prose']; got 'web'."
        ),
    ):
        packed.validation_dataset("web")
    with pytest.raises(
        ValueError, match=re.escape("PackedDomains.validation_batches: batch_size must be an int >= 1; got 0.")
    ):
        packed.validation_batches(0)
    assert "train=[" in repr(packed)


def test_domain_collator_stacks_equal_lengths():
    feats = [{"input_ids": torch.arange(4), "domain_id": 2}, {"input_ids": np.arange(4, 8), "domain_id": np.int64(0)}]
    out = DomainCollator()(feats)
    assert sorted(out) == ["domain_ids", "input_ids", "labels"]
    assert out["input_ids"].dtype == out["labels"].dtype == out["domain_ids"].dtype == torch.int64
    assert out["input_ids"].shape == out["labels"].shape == (2, 4) and out["domain_ids"].tolist() == [2, 0]
    assert torch.equal(out["labels"], out["input_ids"])  # unshifted
    out["labels"][0, 0] = 99
    assert out["input_ids"][0, 0] == 0  # labels are a copy


def test_domain_collator_pads_unequal_lengths():
    feats = [
        {"input_ids": [1, 2], "domain_id": 0},
        {"input_ids": [3, 4, 5, 6], "domain_id": 1, "labels": [-100, 4, 5, 6]},
    ]
    out = DomainCollator(pad_token_id=7, ignore_index=-1)(feats)
    assert out["input_ids"].tolist() == [[1, 2, 7, 7], [3, 4, 5, 6]]
    assert out["labels"].tolist() == [[1, 2, -1, -1], [-100, 4, 5, 6]]
    assert out["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]] and out["attention_mask"].dtype == torch.int64
    with pytest.raises(
        ValueError,
        match=re.escape(
            "DomainCollator: features must all have the same length when pad_token_id is None; got lengths [2, 4] (pass DomainCollator(pad_token_id=tokenizer.pad_token_id))."
        ),
    ):
        DomainCollator()(feats)


def test_domain_collator_bad_features():
    c = DomainCollator()
    with pytest.raises(
        ValueError,
        match=re.escape(
            "DomainCollator: features[0] must be a mapping with 'input_ids' and 'domain_id' (items of DomainSequenceDataset); got ['input_ids']."
        ),
    ):
        c([{"input_ids": [1]}])
    with pytest.raises(ValueError, match=re.escape("DomainCollator: features must be a non-empty list of mappings")):
        c([])
    with pytest.raises(
        ValueError, match=re.escape("DomainCollator: features[0]['domain_id'] must be a non-negative int; got -1.")
    ):
        c([{"input_ids": [1], "domain_id": -1}])
    with pytest.raises(
        ValueError,
        match=re.escape(
            "DomainCollator: features[0]['input_ids'] must be a 1-D sequence of ints; got shape (1, 2), dtype torch.int64."
        ),
    ):
        c([{"input_ids": [[1, 2]], "domain_id": 0}])
    with pytest.raises(
        ValueError, match=re.escape("DomainCollator: pad_token_id must be a non-negative int or None; got -1.")
    ):
        DomainCollator(pad_token_id=-1)
