"""Tests of ``ddk.data.packing``: packing per domain, the stable split, the cache key and the
tokenizer hash, on a tiny local tokenizer (no hub access). The records checks of
``ddk.data.tokens`` are tested here, through ``pack_domains``."""

from __future__ import annotations

import json
import random
import re
import warnings
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest
from hf_models import domain_text, make_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from ddk.data.packed import PackedDomains
from ddk.data.packing import pack_domains, tokenizer_hash
from ddk.partition.partitioner import stable_unit_hash

L = 16


def _docs(records: Any, domain: str) -> list[str]:
    return [r["text"] for r in records if r["domain"] == domain]


def _stream(tok: Any, texts: list[str]) -> np.ndarray:
    """The oracle: every document's ids followed by EOS, concatenated."""
    ids: list[int] = []
    for t in texts:
        ids += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return np.asarray(ids, dtype=np.int64)


def _hash_order(texts: list[str], seed: int = 0) -> list[int]:
    return sorted(range(len(texts)), key=lambda i: (stable_unit_hash(texts[i], seed), i))


def _split_of(tok: Any, packed: PackedDomains, d: int, texts: list[str], seed: int = 0) -> int:
    """The number k of validation documents (a prefix of the hash order) that reproduces both
    packed sides of domain ``d``; fails if no k does."""
    val = np.asarray(packed.validation[d], dtype=np.int64).ravel()
    train = np.asarray(packed.train[d], dtype=np.int64).ravel()
    order = _hash_order(texts, seed)
    for k in range(1, len(texts)):
        vs = _stream(tok, [texts[i] for i in order[:k]])
        if len(vs) < len(val) or not np.array_equal(vs[: len(val)], val):
            continue
        rest = sorted(order[k:])
        ts = _stream(tok, [texts[i] for i in rest])
        if len(ts) // L == len(train) // L and np.array_equal(ts[: len(train)], train):
            return k
    raise AssertionError(f"no hash-order prefix reproduces domain {packed.names[d]!r}")


def _quiet(**kw: Any) -> dict[str, Any]:
    return dict(seq_len=L, progress=False, **kw)


# ----------------------------------------------------------------------------- packing
def test_pack_domains_windows_are_the_documents_joined_with_eos(tok, records):
    half = len(records) // 2
    train, val = records.select(range(half)), records.select(range(half, len(records)))
    packed = pack_domains(train, tok, validation=val, **_quiet(val_samples=4))
    assert packed.names == ("code", "math", "prose") and packed.seq_len == L and packed.root is None
    assert packed.eos_token_id == tok.eos_token_id
    for d, name in enumerate(packed.names):
        for side, src, limit in (("train", train, None), ("validation", val, 4)):
            arr = getattr(packed, side)[d]
            assert isinstance(arr, np.ndarray) and arr.dtype == np.int32 and arr.ndim == 2 and arr.shape[1] == L
            stream = _stream(tok, _docs(src, name))
            n = len(stream) // L if limit is None else min(limit, len(stream) // L)
            assert arr.shape[0] == n >= 1, (side, name)
            np.testing.assert_array_equal(arr.ravel(), stream[: n * L])  # within the domain only: never mixed
    assert packed.sizes == [a.shape[0] for a in packed.train]


def test_pack_domains_hash_split_is_a_prefix_of_the_hash_order(tok, records):
    packed = pack_domains(records, tok, **_quiet(val_samples=3))
    for d, name in enumerate(packed.names):
        texts = _docs(records, name)
        k = _split_of(tok, packed, d, texts)
        order = _hash_order(texts)
        assert packed.validation[d].shape[0] == 3
        # k is the first prefix holding val_samples sequences
        assert (
            len(_stream(tok, [texts[i] for i in order[: k - 1]]))
            < 3 * L
            <= len(_stream(tok, [texts[i] for i in order[:k]]))
        )


def test_pack_domains_list_of_dicts_and_pretokenized_ids_give_the_same_arrays(tok, records):
    ref = pack_domains(records, tok, **_quiet(val_samples=3))
    as_list = pack_domains(list(records), tok, **_quiet(val_samples=3))
    ids = [
        {"domain": r["domain"], "text": r["text"], "input_ids": tok(r["text"], add_special_tokens=False)["input_ids"]}
        for r in records
    ]
    pre = pack_domains(datasets.Dataset.from_list(ids), tok, **_quiet(val_samples=3))
    for other in (as_list, pre):
        assert other.names == ref.names
        for a, b in zip(ref.train + ref.validation, other.train + other.validation):
            np.testing.assert_array_equal(a, b)
    only_ids = pack_domains(
        [{"domain": r["domain"], "input_ids": r["input_ids"]} for r in ids], tok, **_quiet(val_samples=3)
    )
    assert [a.shape[0] for a in only_ids.validation] == [3, 3, 3]
    for d, name in enumerate(only_ids.names):  # every token still from its own domain's documents
        allowed = set(np.concatenate([_stream(tok, _docs(records, name))]).tolist())
        assert set(only_ids.train[d].ravel().tolist()) <= allowed


def test_pack_domains_domains_keeps_only_the_named_ones(tok, records):
    packed = pack_domains(records, tok, domains=["prose", "code"], **_quiet(val_samples=2))
    assert packed.names == ("code", "prose")
    with pytest.raises(
        ValueError,
        match=re.escape(
            "pack_domains: domains must be names found in records ['code', 'math', 'prose']; got unknown ['web']."
        ),
    ):
        pack_domains(records, tok, domains=["code", "web"], **_quiet())


# ----------------------------------------------------------------------------- split
@settings(max_examples=15)
@given(seed=st.integers(0, 2**20), n_new=st.integers(1, 30))
def test_pack_domains_adding_documents_never_moves_training_documents_to_validation(tok, records, seed, n_new):
    rng = random.Random(seed)
    base = list(records)
    added = base + [{"domain": "math", "text": domain_text("math", rng, 12)} for _ in range(n_new)]
    before = pack_domains(base, tok, **_quiet(val_samples=3))
    after = pack_domains(added, tok, **_quiet(val_samples=3))
    d = before.names.index("math")
    old, new = _docs(base, "math"), _docs(added, "math")
    k_old, k_new = _split_of(tok, before, d, old), _split_of(tok, after, d, new)
    val_old = {old[i] for i in _hash_order(old)[:k_old]}
    val_new = {new[i] for i in _hash_order(new)[:k_new]}
    assert (val_new & set(old)) <= val_old  # no old training document entered validation
    # the validation documents that left are the highest-hash ones
    left, stayed = val_old - val_new, val_old & val_new
    if left and stayed:
        assert min(stable_unit_hash(t) for t in left) > max(stable_unit_hash(t) for t in stayed)
    # the other domains did not change at all
    for e, name in enumerate(before.names):
        if name != "math":
            np.testing.assert_array_equal(before.validation[e], after.validation[e])
            np.testing.assert_array_equal(before.train[e], after.train[e])


def test_pack_domains_documents_hashing_above_the_cutoff_change_no_side(tok, records):
    base = list(records)
    before = pack_domains(base, tok, **_quiet(val_samples=3))
    d = before.names.index("code")
    old = _docs(base, "code")
    cutoff = stable_unit_hash(old[_hash_order(old)[_split_of(tok, before, d, old) - 1]])
    rng = random.Random(1)
    high = [t for t in (domain_text("code", rng, 12) for _ in range(200)) if stable_unit_hash(t) > cutoff][:10]
    after = pack_domains(base + [{"domain": "code", "text": t} for t in high], tok, **_quiet(val_samples=3))
    np.testing.assert_array_equal(after.validation[d], before.validation[d])
    # appended at the end, the new documents only extend the training stream
    np.testing.assert_array_equal(after.train[d][: before.train[d].shape[0]], before.train[d])
    assert after.train[d].shape[0] > before.train[d].shape[0]


def test_pack_domains_warns_once_when_validation_is_capped(tok, records):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        packed = pack_domains(records, tok, **_quiet(val_samples=1000, max_val_fraction=0.25))
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert msg.startswith(
        "pack_domains: validation capped at max_val_fraction=0.25 of each domain's documents, below val_samples=1000 sequences, for "
    )
    for d, name in enumerate(packed.names):
        assert f"{name!r} ({packed.validation[d].shape[0]})" in msg
        assert _split_of(tok, packed, d, _docs(records, name)) == int(0.25 * 20)  # exactly the cap


def test_pack_domains_warns_per_domain_about_validation_records_that_are_training_records(tok, records):
    """Validation records whose exact text is also a training record's: one warning counting them
    per domain, attributed to the caller's line (not a line of ddk)."""
    code, math = _docs(records, "code"), _docs(records, "math")
    val = [{"domain": "code", "text": t} for t in code[:3]] + [{"domain": "math", "text": math[0]}]
    val += [{"domain": d, "text": f"{d} fresh text {i}"} for d in ("code", "math", "prose") for i in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pack_domains(records, tok, validation=val, **_quiet(val_samples=2))
    assert [str(w.message) for w in caught] == [
        "pack_domains: validation records must not occur in the training records; got 2 domain(s) with the same "
        "text in both: 'code' 3 of 5, 'math' 1 of 3 validation records. Their validation CE measures memorised "
        "text: remove these records from the training data or from the validation data."
    ]
    assert caught[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pack_domains(records, tok, validation=val[4:], **_quiet(val_samples=2))  # no overlap: silent


def test_pack_domains_too_small_domain_is_an_error(tok, records):
    small = list(records) + [{"domain": "tiny", "text": "def x"}, {"domain": "tiny", "text": "return y"}]
    with pytest.raises(ValueError) as e:
        pack_domains(small, tok, **_quiet(val_samples=2))
    msg = str(e.value)
    assert msg.startswith(
        "pack_domains: domain 'tiny' must give at least one training and one validation sequence of seq_len=16 tokens; got 0 training and 0 validation"
    )
    assert "tokens (2 documents" in msg and "Lower seq_len or val_samples, or add data to 'tiny'." in msg


def test_pack_domains_validation_records(tok, records):
    val = [{"domain": d, "text": " ".join([d] * 40)} for d in ("code", "math", "prose")]
    packed = pack_domains(records, tok, validation=datasets.Dataset.from_list(val), **_quiet(val_samples=2))
    for d, name in enumerate(packed.names):
        np.testing.assert_array_equal(packed.validation[d].ravel(), _stream(tok, [val[d]["text"]])[: 2 * L])
        np.testing.assert_array_equal(
            packed.train[d].ravel(), _stream(tok, _docs(records, name))[: packed.sizes[d] * L]
        )
    with pytest.raises(
        ValueError,
        match=re.escape(
            "pack_domains: validation must have exactly the training domains ['code', 'math', 'prose']; got missing ['prose'], extra ['web']."
        ),
    ):
        pack_domains(records, tok, validation=val[:2] + [{"domain": "web", "text": "a b"}], **_quiet())
    packed = pack_domains(
        records, tok, validation=val, domains=["math"], **_quiet(val_samples=2)
    )  # others dropped on both sides
    assert packed.names == ("math",)


def test_pack_domains_bad_arguments(tok, records):
    with pytest.raises(ValueError, match=re.escape("pack_domains: seq_len must be an int >= 2; got 1.")):
        pack_domains(records, tok, seq_len=1, progress=False)
    with pytest.raises(ValueError, match=re.escape("pack_domains: val_samples must be an int >= 1; got 0.")):
        pack_domains(records, tok, **_quiet(val_samples=0))
    with pytest.raises(ValueError, match=re.escape("pack_domains: max_val_fraction must be in (0, 1); got 1.0.")):
        pack_domains(records, tok, **_quiet(max_val_fraction=1.0))
    with pytest.raises(
        ValueError,
        match=re.escape(
            "pack_domains: records must have a 'domain' column and a 'text' (or pre-tokenized 'input_ids') column; got columns ['body', 'domain']."
        ),
    ):
        pack_domains([{"domain": "a", "body": "x"}], tok, **_quiet())
    with pytest.raises(
        ValueError, match=re.escape("pack_domains: records[1]['domain'] must be a non-empty str; got 3.")
    ):
        pack_domains([{"domain": "a", "text": "x"}, {"domain": 3, "text": "y"}], tok, **_quiet())
    with pytest.raises(ValueError, match=re.escape("pack_domains: domain names must not contain '/'")):
        pack_domains([{"domain": "a/b", "text": "x"}], tok, **_quiet())
    with pytest.raises(
        ValueError, match=re.escape("pack_domains: records[0]['input_ids'] must be a list of ints; got [0.5].")
    ):
        pack_domains([{"domain": "a", "input_ids": [0.5]}], tok, **_quiet())
    with pytest.raises(TypeError, match="pack_domains: records must be a datasets.Dataset"):
        pack_domains("c.jsonl", tok, **_quiet())
    with pytest.raises(
        TypeError, match=re.escape("pack_domains: records must be a map-style datasets.Dataset (pick a split")
    ):
        pack_domains(datasets.DatasetDict({"train": records}), tok, **_quiet())
    with pytest.raises(ValueError, match="pack_domains: records must hold at least one record; got 0."):
        pack_domains([], tok, **_quiet())


def test_pack_domains_tokenizer_without_eos_is_an_error(tok, records):
    class NoEos:
        eos_token_id = None

    with pytest.raises(
        ValueError,
        match=re.escape(
            "pack_domains: tokenizer must have an EOS token (appended after every document); got eos_token_id=None. Set tokenizer.eos_token"
        ),
    ):
        pack_domains(records, NoEos(), **_quiet())


# ----------------------------------------------------------------------------- cache key
def test_pack_domains_cache_key_changes_with_contents_and_options(tok, records):
    recs = list(records)
    key = pack_domains(recs, tok, **_quiet(val_samples=3)).key
    edited = [dict(r) for r in recs]
    edited[7]["text"] += " x"
    relabelled = [dict(r) for r in recs]
    relabelled[7]["domain"] = "math" if relabelled[7]["domain"] != "math" else "code"
    keys = {
        pack_domains(edited, tok, **_quiet(val_samples=3)).key,
        pack_domains(relabelled, tok, **_quiet(val_samples=3)).key,
        pack_domains(recs[::-1], tok, **_quiet(val_samples=3)).key,
        pack_domains(recs, tok, **_quiet(val_samples=4)).key,
        pack_domains(recs, tok, **_quiet(val_samples=3, seed=1)).key,
        pack_domains(recs, tok, seq_len=L + 1, val_samples=3, progress=False).key,
        pack_domains(recs, tok, **_quiet(val_samples=3, max_val_fraction=0.4)).key,
        pack_domains(recs, tok, **_quiet(val_samples=3, domains=["code", "math"])).key,
    }
    assert key not in keys and len(keys) == 8


# ----------------------------------------------------------------------------- tokenizer hash
def test_tokenizer_hash_is_stable_and_sees_the_vocabulary(tok, tmp_path):
    from transformers import AutoTokenizer

    h = tokenizer_hash(tok)
    assert re.fullmatch(r"[0-9a-f]{16}", h)
    tok.save_pretrained(str(tmp_path / "t"))
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path / "t"))
    assert tokenizer_hash(reloaded) == h
    reloaded("some text to tokenize", add_special_tokens=False)
    assert tokenizer_hash(reloaded) == h  # calling it does not change it
    reloaded.add_tokens(["<|new|>"])
    assert tokenizer_hash(reloaded) != h
    other = make_tokenizer(tmp_path / "other", vocab_size=320)
    assert tokenizer_hash(other) != h


# ----------------------------------------------------------------------------- through ddk distill
def test_recipe_domain_too_small_for_its_validation_split_is_an_error_naming_it(recipe, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    from ddk.recipes.distill import distill

    root, cfg = recipe
    src = tmp_path / "mine.jsonl"
    src.write_text(Path(cfg.data[0]).read_text() + json.dumps({"domain": "tiny", "text": "x y"}) + "\n")
    with pytest.raises(ValueError, match="tiny"):
        distill(dataclasses.replace(cfg, data=(str(src),), out=str(tmp_path / "run")))
