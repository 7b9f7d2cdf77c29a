"""Tests of ``ddk.data.pack_cache``, the cache of ``pack_domains``: a hit memory-maps without
tokenizing, a damaged cache is an error, a failed build leaves no cache (tiny local tokenizer, no
hub access)."""

from __future__ import annotations

import json
import re
import warnings
from typing import Any

import numpy as np
import pytest

from ddk.data.packing import pack_domains, tokenizer_hash

L = 16


def _quiet(**kw: Any) -> dict[str, Any]:
    return dict(seq_len=L, progress=False, **kw)


def test_pack_domains_cache_hit_memory_maps_without_tokenizing(tok, records, tmp_path, monkeypatch):
    first = pack_domains(records, tok, cache_dir=tmp_path, **_quiet(val_samples=3))
    assert first.root == tmp_path / first.key
    files = sorted(p.name for p in first.root.iterdir())
    assert files == [
        "meta.json",
        "train_0.bin",
        "train_1.bin",
        "train_2.bin",
        "validation_0.bin",
        "validation_1.bin",
        "validation_2.bin",
    ]  # by index, never by name
    assert [p.name for p in tmp_path.iterdir()] == [first.key]  # the temp folder was renamed
    meta = json.loads((first.root / "meta.json").read_text())
    assert (
        meta["names"] == ["code", "math", "prose"] and meta["seq_len"] == L and meta["eos_token_id"] == tok.eos_token_id
    )
    assert meta["tokenizer_hash"] == tokenizer_hash(tok)
    assert [e["shape"] for e in meta["train"]] == [[n, L] for n in first.sizes]
    assert all(len(e["sha256"]) == 64 for e in meta["train"] + meta["validation"])

    def no_tokenizing(self, *a, **k):  # type: ignore[no-untyped-def]
        raise AssertionError("the tokenizer must not be called on a cache hit")

    monkeypatch.setattr(type(tok), "__call__", no_tokenizing)
    again = pack_domains(records, tok, cache_dir=tmp_path, **_quiet(val_samples=3))
    assert again.key == first.key and again.names == first.names
    monkeypatch.undo()
    uncached = pack_domains(records, tok, **_quiet(val_samples=3))
    for a, b, c in zip(
        again.train + again.validation, first.train + first.validation, uncached.train + uncached.validation
    ):
        assert isinstance(a, np.memmap) and a.dtype == np.int32
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    assert uncached.key == first.key


def test_pack_domains_damaged_cache_is_an_error(tok, records, tmp_path):
    packed = pack_domains(records, tok, cache_dir=tmp_path, **_quiet(val_samples=3))
    f = packed.root / "validation_1.bin"
    data = bytearray(f.read_bytes())
    data[0] ^= 1
    f.write_bytes(bytes(data))  # same size: passes the cheap check, fails verify=True
    pack_domains(records, tok, cache_dir=tmp_path, **_quiet(val_samples=3))
    with pytest.raises(ValueError, match=re.escape(f"pack_domains: cache file {f} must have sha256 ")):
        pack_domains(records, tok, cache_dir=tmp_path, verify=True, **_quiet(val_samples=3))
    f.write_bytes(bytes(data[:-4]))
    with pytest.raises(
        ValueError,
        match=re.escape(f"pack_domains: cache file {f} must hold {len(data)} bytes") + r".*delete .* to rebuild it",
    ):
        pack_domains(records, tok, cache_dir=tmp_path, **_quiet(val_samples=3))


def test_pack_domains_failed_build_leaves_no_cache(tok, records, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = type(tok).__call__

    def dies_later(self, *a, **k):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt  # as a killed build
        return real(self, *a, **k)

    monkeypatch.setattr(type(tok), "__call__", dies_later)
    with pytest.raises(KeyboardInterrupt):
        pack_domains(records, tok, cache_dir=tmp_path, **_quiet(val_samples=3))
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    packed = pack_domains(records, tok, cache_dir=tmp_path, **_quiet(val_samples=3))
    assert (packed.root / "meta.json").is_file()


def test_pack_domains_capped_validation_warns_the_caller_on_build_and_on_hit(tok, records, tmp_path):
    for _ in ("build", "hit"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pack_domains(records, tok, cache_dir=tmp_path, **_quiet(val_samples=1000, max_val_fraction=0.25))
        assert len(caught) == 1 and caught[0].filename == __file__
        assert str(caught[0].message).startswith("pack_domains: validation capped at max_val_fraction=0.25")


def test_pack_cache_folder_and_files_are_readable_by_the_team(tok, records, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The finished cache gets the modes of a plain mkdir()/open() under the umask (0755/0644 under
    022), not mkdtemp's 0700, so a teammate's run can reuse it."""
    import stat

    pack_domains(records, tok, seq_len=16, val_samples=2, cache_dir=tmp_path, progress=False)
    entries = [p for p in tmp_path.rglob("*")]
    assert entries
    for p in entries:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode & 0o044 == 0o044, (p, oct(mode))
        if p.is_dir():
            assert mode & 0o011 == 0o011, (p, oct(mode))
