"""Tests of ``ddk.data.pack_cache``, the cache of ``pack_domains``: a hit memory-maps without
tokenizing, a damaged cache is an error, a failed build leaves no cache (tiny local tokenizer, no
hub access)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ddk.data.mapped import MappedRows
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
        "verified.json",
    ]  # by index, never by name; the stamp of the check at open (ddk.data.verify)
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
        assert isinstance(a, MappedRows) and a.dtype == np.int32  # read on demand: no descriptor held
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    assert uncached.key == first.key


def test_pack_domains_damaged_cache_is_an_error(tok, records, tmp_path):
    packed = pack_domains(records, tok, cache_dir=tmp_path, **_quiet(val_samples=3))
    f = packed.root / "validation_1.bin"
    data = bytearray(f.read_bytes())
    data[0] ^= 1
    f.write_bytes(bytes(data))  # same size: passes the size check; the write moved the stamp's mtime
    with pytest.raises(ValueError, match=re.escape(f"pack_domains: cache file {f} must have sha256 ")):
        pack_domains(records, tok, cache_dir=tmp_path, **_quiet(val_samples=3))
    f.write_bytes(bytes(data[:-4]))
    with pytest.raises(
        ValueError,
        match=re.escape(f"pack_domains: cache file {f} must hold {len(data)} bytes") + r".*delete .* to rebuild it",
    ):
        pack_domains(records, tok, cache_dir=tmp_path, **_quiet(val_samples=3))


def test_pack_domains_failed_build_leaves_no_cache(tok, records, tmp_path, monkeypatch):
    import ddk.data.assemble as assemble

    calls = {"n": 0}
    real = assemble._compact

    def dies_later(*a, **k):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] > 1:  # the first domain's training file is written, the second's is not
            raise KeyboardInterrupt  # as a killed build
        return real(*a, **k)

    monkeypatch.setattr(assemble, "_compact", dies_later)
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


# ---------------------------------------------------------------------------- verify on read
def _meta(root: Path) -> dict[str, Any]:
    return json.loads((root / "meta.json").read_text())


def _write_meta(root: Path, meta: dict[str, Any]) -> None:
    (root / "meta.json").write_text(json.dumps(meta, indent=1))


def _forge(root: Path, name: str, ids: np.ndarray) -> None:
    """Write ``ids`` into the cache file ``name`` and its sha256 into meta.json (a consistent forgery)."""
    f = root / name
    f.write_bytes(ids.astype("<i4").tobytes())
    meta = _meta(root)
    for e in meta["train"] + meta["validation"]:
        if e["file"] == name:
            e["sha256"] = hashlib.sha256(f.read_bytes()).hexdigest()
    _write_meta(root, meta)


def _damaged(root: Path) -> str:
    return r".*The cache is damaged: delete " + re.escape(str(root)) + " to rebuild it"


def test_pack_domains_xored_token_ids_are_an_error(tok, records, tmp_path):
    root = pack_domains(records, tok, cache_dir=tmp_path, **_quiet(val_samples=3)).root
    f = root / "train_0.bin"
    ids = np.fromfile(f, dtype="<i4") ^ 0x5A5A5A
    f.write_bytes(ids.astype("<i4").tobytes())
    with pytest.raises(ValueError, match=re.escape(f"cache file {f} must have sha256 ") + _damaged(root)):
        pack_domains(records, tok, cache_dir=tmp_path, **_quiet(val_samples=3))
    _forge(root, "train_0.bin", ids)  # digests recomputed: the values are still out of range
    with pytest.raises(
        ValueError, match=re.escape(f"cache file {f} must hold token ids in [0, {len(tok)})") + _damaged(root)
    ):
        pack_domains(records, tok, cache_dir=tmp_path, **_quiet(val_samples=3))


def test_pack_domains_zeroed_validation_file_is_an_error(tok, records, tmp_path):
    root = pack_domains(records, tok, cache_dir=tmp_path, **_quiet(val_samples=3)).root
    f = root / "validation_2.bin"
    f.write_bytes(bytes(f.stat().st_size))  # zeros: in range, the same size
    with pytest.raises(ValueError, match=re.escape(f"cache file {f} must have sha256 ") + _damaged(root)):
        pack_domains(records, tok, cache_dir=tmp_path, **_quiet(val_samples=3))


def test_pack_domains_shrunk_meta_rows_are_an_error(tok, records, tmp_path):
    root = pack_domains(records, tok, cache_dir=tmp_path, **_quiet(val_samples=3)).root
    meta = _meta(root)
    meta["train"][1]["shape"][0] -= 2
    _write_meta(root, meta)
    f = root / "train_1.bin"
    with pytest.raises(ValueError, match=re.escape(f"cache file {f} must hold ") + r".* bytes" + _damaged(root)):
        pack_domains(records, tok, cache_dir=tmp_path, **_quiet(val_samples=3))
    f.write_bytes(f.read_bytes()[: meta["train"][1]["shape"][0] * L * 4])  # the file cut to match
    with pytest.raises(ValueError, match=re.escape(f"cache file {f} must have sha256 ") + _damaged(root)):
        pack_domains(records, tok, cache_dir=tmp_path, **_quiet(val_samples=3))
    meta["train"][1]["file"] = "../elsewhere.bin"
    _write_meta(root, meta)
    with pytest.raises(ValueError, match=re.escape("must hold in meta.json train[1] with file train_1.bin")):
        pack_domains(records, tok, cache_dir=tmp_path, **_quiet(val_samples=3))


def test_pack_domains_second_open_trusts_the_stamp_a_changed_file_is_hashed_again(tok, records, tmp_path, monkeypatch):
    import ddk.data.verify as verify

    hashed: list[str] = []
    real = verify.file_sha256

    def counting(path):  # type: ignore[no-untyped-def]
        hashed.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(verify, "file_sha256", counting)
    root = pack_domains(records, tok, cache_dir=tmp_path, **_quiet(val_samples=3)).root
    assert len(hashed) == 6 and (root / "verified.json").is_file()  # the build's open checked and stamped it
    hashed.clear()
    pack_domains(records, tok, cache_dir=tmp_path, **_quiet(val_samples=3))
    assert hashed == []  # unchanged since the stamp: a stat per file
    f = root / "validation_0.bin"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched: same bytes, another mtime
    pack_domains(records, tok, cache_dir=tmp_path, **_quiet(val_samples=3))
    assert sorted(hashed) == sorted(p.name for p in root.glob("*.bin"))  # checked again, then stamped
    hashed.clear()
    pack_domains(records, tok, cache_dir=tmp_path, **_quiet(val_samples=3))
    assert hashed == []
    pack_domains(records, tok, cache_dir=tmp_path, verify=True, **_quiet(val_samples=3))
    assert len(hashed) == 6  # verify=True: checked whatever the stamp says


def test_pack_domains_pretokenized_ids_beyond_the_vocabulary_are_an_error(tok, tmp_path):
    recs = [{"domain": "a", "input_ids": [5, 6, len(tok)]}]
    with pytest.raises(
        ValueError,
        match=re.escape(f"records[0]['input_ids'] must be ids in [0, {len(tok)} (the tokenizer's vocabulary))"),
    ):
        pack_domains(recs, tok, cache_dir=tmp_path, **_quiet())


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc/self/fd")
def test_pack_domains_cache_holds_no_descriptor_per_domain(tok, tmp_path):
    from ddk.data.mapped import MAX_OPEN

    recs = [{"domain": f"d{i:03d}", "text": f"document {j} of domain {i} " * 3} for i in range(300) for j in range(3)]
    kw: dict[str, Any] = dict(seq_len=8, val_samples=1, progress=False)
    pack_domains(recs, tok, cache_dir=tmp_path, **kw)
    before = len(os.listdir("/proc/self/fd"))
    packed = pack_domains(recs, tok, cache_dir=tmp_path, **kw)  # a hit: 600 files
    ds = packed.train_dataset()
    assert len(packed.names) == 300 and all(ds[i]["input_ids"].shape == (8,) for i in range(len(ds)))
    assert len(packed.validation_batches(4)) == 300
    assert len(os.listdir("/proc/self/fd")) <= before + MAX_OPEN  # a memmap per file held 600


def test_pack_domains_deep_meta_json_is_an_error_naming_it(tok, records, tmp_path):
    root = pack_domains(records, tok, cache_dir=tmp_path, **_quiet(val_samples=3)).root
    (root / "meta.json").write_text("{" * 1000 + "}" * 1000)
    with pytest.raises(ValueError, match=re.escape(f"{root / 'meta.json'} must be JSON nested at most")):
        pack_domains(records, tok, cache_dir=tmp_path, **_quiet(val_samples=3))
