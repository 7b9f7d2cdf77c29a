"""Tests of ``ddk.data.assemble``: the streamed build against the rule of ``pack_domains`` written
out plainly (every document in memory, sorted by hash, taken until validation is full or capped),
with the validation candidates pruned after every batch, ties of the hash, empty documents, caps and
too-small domains; and the in-place compaction."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ddk.data.assemble as assemble
from ddk.data.assemble import _Assembler, _compact

EOS = 7


def _oracle(docs: list[tuple[str, float, list[int]]], names: list[str], L: int, val_samples: int, frac: float) -> Any:
    """``(train, validation, capped)`` per domain by the documented rule, or the name of the first
    domain too small for one window on each side."""
    train, val, capped = [], [], {}
    for name in names:
        mine = [(h, i, ids) for i, (d, h, ids) in enumerate(docs) if d == name]
        order = sorted(range(len(mine)), key=lambda k: (mine[k][0], k))
        max_docs = math.floor(frac * len(mine) + 1e-9)
        stream: list[int] = []
        taken: list[int] = []
        for k in order:
            if len(taken) >= max_docs or len(stream) >= val_samples * L:
                break
            stream += mine[k][2] + [EOS]
            taken.append(k)
        n_val = min(val_samples, len(stream) // L)
        rest = [t for k in range(len(mine)) if k not in set(taken) for t in mine[k][2] + [EOS]]
        n_train = len(rest) // L
        if n_train < 1 or n_val < 1:
            return name
        train.append(np.array(rest[: n_train * L]).reshape(n_train, L))
        val.append(np.array(stream[: n_val * L]).reshape(n_val, L))
        if n_val < val_samples:
            capped[name] = n_val
    return train, val, capped


def _assemble(tmp: Path, docs: Any, cuts: list[int], L: int, val_samples: int, frac: float, in_memory: bool) -> Any:
    names = sorted({d for d, _, _ in docs})
    codes_of = {n: i for i, n in enumerate(names)}
    asm = _Assembler(tmp, seq_len=L, val_samples=val_samples, max_val_fraction=frac, eos_id=EOS, hash_split=True)
    bounds = [0, *sorted(c % (len(docs) + 1) for c in cuts), len(docs)]
    for a, b in zip(bounds, bounds[1:]):  # the documents in batches, as the pass hands them over
        part = docs[a:b]
        ids = [np.asarray(x, dtype=np.int32) for _, _, x in part]
        asm.add_train(
            names,
            np.array([codes_of[d] for d, _, _ in part], dtype=np.int32),
            np.array([h for _, h, _ in part], dtype=np.float64),
            np.concatenate(ids) if ids else np.empty(0, dtype=np.int32),
            np.array([len(x) for x in ids], dtype=np.int64),
        )
    try:
        return asm.finish("test", names, in_memory=in_memory)
    except ValueError as e:
        return str(e).split("domain ")[1].split(" must")[0].strip("'")


docs_strategy = st.lists(
    st.tuples(
        st.sampled_from(["a", "b"]),
        st.sampled_from([0.1, 0.2, 0.3, 0.5, 0.7, 0.9]),  # few values: ties of the hash
        st.lists(st.integers(0, 6), max_size=9),  # empty documents too
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=60)
@given(
    docs=docs_strategy,
    cuts=st.lists(st.integers(0, 60), max_size=5),
    L=st.integers(2, 5),
    val_samples=st.integers(1, 4),
    frac=st.sampled_from([0.1, 0.3, 0.5, 0.9]),
)
def test_assembler_hash_split_equals_the_rule_with_candidates_pruned(
    tmp_path_factory, monkeypatch_module, docs, cuts, L, val_samples, frac
):
    tmp = tmp_path_factory.mktemp("asm")
    want = _oracle(docs, sorted({d for d, _, _ in docs}), L, val_samples, frac)
    got = _assemble(tmp, docs, cuts, L, val_samples, frac, in_memory=True)
    if isinstance(want, str):
        assert got == want
        return
    train, val, _, capped = got
    assert capped == want[2]
    for a, b in zip(train + val, want[0] + want[1]):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def monkeypatch_module():  # type: ignore[no-untyped-def]
    """Prune the candidates after every batch (the real floor, 4096, is never reached here)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(assemble, "_MIN_CANDIDATES", 1)
    yield mp
    mp.undo()


def test_assembler_files_equal_the_arrays_and_keep_few_candidates(tmp_path, monkeypatch_module):
    rng = np.random.default_rng(0)
    docs = [("a", float(rng.random()), rng.integers(0, 7, rng.integers(0, 30)).tolist()) for _ in range(3000)]
    (tmp_path / "m").mkdir()
    arrays = _assemble(tmp_path / "m", docs, [100 * k for k in range(1, 30)], 8, 5, 0.5, in_memory=True)
    (tmp_path / "f").mkdir()
    asm = _Assembler(tmp_path / "f", seq_len=8, val_samples=5, max_val_fraction=0.5, eos_id=EOS, hash_split=True)
    for s in range(0, 3000, 100):
        part = docs[s : s + 100]
        ids = [np.asarray(x, dtype=np.int32) for _, _, x in part]
        asm.add_train(["a"], np.zeros(len(part), dtype=np.int32), np.array([h for _, h, _ in part]),
                      np.concatenate(ids), np.array([len(x) for x in ids]))  # fmt: skip
        kept = asm.domains["a"].kept
        assert kept is None or len(kept[0]) <= 5 * 8 + 1  # at most one document per validation token, plus one
    _, _, entries, _ = asm.finish("test", ["a"], in_memory=False)
    for side, arr in (("train", arrays[0][0]), ("validation", arrays[1][0])):
        data = (tmp_path / "f" / entries[side][0]["file"]).read_bytes()
        assert data == arr.astype("<i4").tobytes() and entries[side][0]["shape"] == list(arr.shape)
        assert entries[side][0]["sha256"] == hashlib.sha256(data).hexdigest()


def test_compact_moves_data_towards_the_start_only(tmp_path, monkeypatch):
    monkeypatch.setattr(assemble, "_COPY", 12)  # 3 tokens per read: many reads and writes
    data = np.arange(100, dtype="<i4")
    path = tmp_path / "s.bin"
    path.write_bytes(data.tobytes())
    removed = np.array([[0, 2], [10, 5], [50, 1], [99, 1]], dtype=np.int64)  # (offset, tokens)
    keep = np.delete(data, [0, 1, *range(10, 15), 50, 99])
    sha = _compact(path, removed, 80)
    assert path.read_bytes() == keep[:80].tobytes()
    assert sha == hashlib.sha256(keep[:80].tobytes()).hexdigest()
