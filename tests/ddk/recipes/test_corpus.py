"""Corpus builder pieces on fake package folders and user data in tmp_path (no apt, no network)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from recipe_cases import user_jsonl as _user_jsonl

from ddk.recipes.cli import main
from ddk.recipes.corpus import (
    CorpusConfig,
    CorpusError,
    _chunks,
    build_corpus,
    domain_texts,
    jsonl_units,
    load_corpus,
    read_jsonl,
    split_units,
)
from ddk.recipes.rdata import read_lazyload_db, unserialize
from ddk.recipes.sources import PackageCache, dictd_entries, folder_units, html_to_text


def _folder(root: Path, n: int, size: int = 300, prefix: str = "f") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sub = root / f"d{i % 3}"
        sub.mkdir(exist_ok=True)
        (sub / f"{prefix}{i}.txt").write_text("\n".join(f"line {j} of file {i} " * 3 for j in range(size // 40 + 1)))
    return root


def _cfg(**kw) -> CorpusConfig:  # type: ignore[no-untyped-def]
    base = dict(domains=(), max_chars=None, validation_fraction=0.2, record_chars=200, offline=True)
    base.update(kw)
    return CorpusConfig(**base)


def _records(out: Path, domain: str, side: str) -> list[dict]:
    return read_jsonl(out / domain / f"{side}.jsonl")


def test_build_corpus_split_never_splits_a_file(tmp_path):
    src = _folder(tmp_path / "src", 40, size=900)  # each file > record_chars: several records per file
    out = tmp_path / "out"
    build_corpus(out, _cfg(user_folders={"mine": str(src)}), progress=False)
    tr, va = _records(out, "mine", "train"), _records(out, "mine", "validation")
    sides = {}
    for side, recs in (("train", tr), ("validation", va)):
        for r in recs:
            assert sides.setdefault(r["source"], side) == side, f"{r['source']} on both sides"
    assert tr and va
    assert max(sum(r["source"] == s for r in tr + va) for s in sides) > 1  # files were chunked
    assert all(set(r) == {"id", "domain", "source", "text"} and r["domain"] == "mine" for r in tr + va)
    assert len({r["id"] for r in tr + va}) == len(tr) + len(va)
    # every file's text is reassembled exactly from its records
    f0 = next(iter(sides))
    text = "".join(r["text"] for r in tr + va if r["source"] == f0)
    assert text == (src / f0.split("/", 1)[1]).read_text()


def test_split_units_is_stable_when_data_is_added(tmp_path):
    units = folder_units(_folder(tmp_path / "a", 30))
    more = units + folder_units(_folder(tmp_path / "b", 30, prefix="g"), prefix="b/")
    s1 = split_units(units, validation_fraction=0.3)
    s2 = split_units(more, validation_fraction=0.3)
    val1 = {u.source for u in s1["validation"]}
    val2 = {u.source for u in s2["validation"]}
    assert val1 <= val2 and not val1 & {u.source for u in s2["train"]}


def test_split_units_gives_both_sides_and_rejects_single_source(tmp_path):
    units = folder_units(_folder(tmp_path / "a", 2))
    s = split_units(units, validation_fraction=0.001)
    assert len(s["validation"]) == 1 and len(s["train"]) == 1
    with pytest.raises(ValueError, match="at least 2 distinct sources"):
        split_units(units[:1], validation_fraction=0.5)


def test_build_corpus_cap_limits_chars_per_domain(tmp_path):
    src = _folder(tmp_path / "src", 50, size=600)
    out = tmp_path / "out"
    man = build_corpus(out, _cfg(user_folders={"mine": str(src)}, max_chars=5000), progress=False)
    d = man["domains"]["mine"]
    assert d["train"]["chars"] == 4000 and d["validation"]["chars"] == 1000
    assert d["train"]["truncated"] and d["validation"]["truncated"]
    for side in ("train", "validation"):
        assert sum(len(r["text"]) for r in _records(out, "mine", side)) == d[side]["chars"]


def test_build_corpus_manifest_and_reuse(tmp_path, capsys):
    src = _folder(tmp_path / "src", 10)
    out = tmp_path / "out"
    man = build_corpus(out, _cfg(user_folders={"mine": str(src)}), progress=False)
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == man
    assert set(man["domains"]["mine"]) >= {"provenance", "licence", "train", "validation", "units"}
    assert man["domains"]["mine"]["units"] == 10
    assert man["domains"]["mine"]["train"]["sources"] + man["domains"]["mine"]["validation"]["sources"] == 10
    good = (out / "mine" / "train.jsonl").read_text()
    assert (
        build_corpus(out, _cfg(user_folders={"mine": str(src)}), progress=False)["created"] == man["created"]
    )  # reused
    (out / "mine" / "train.jsonl").write_text("")  # its SHA-256 no longer matches the manifest: rebuilt
    capsys.readouterr()
    build_corpus(out, _cfg(user_folders={"mine": str(src)}), progress=False)
    assert (out / "mine" / "train.jsonl").read_text() == good
    assert "train.jsonl is missing or changed since it was built" in capsys.readouterr().err


def test_build_corpus_reports_unavailable_domain_by_name(tmp_path, capsys):
    src = _folder(tmp_path / "src", 6)
    # offline with an empty cache: the built-in Debian domain cannot be had and is skipped, loudly
    man = build_corpus(
        tmp_path / "out",
        _cfg(domains=("math",), user_folders={"mine": str(src)}, cache_dir=str(tmp_path / "cache")),
        progress=False,
    )
    assert "math" in man["skipped"] and "pari-doc" in man["skipped"]["math"]
    assert list(man["domains"]) == ["mine"]
    assert "domain 'math' skipped" in capsys.readouterr().err


def test_build_corpus_rejects_unknown_domain(tmp_path):
    with pytest.raises(ValueError, match=r"build_corpus: domains must be among the built-in .* got unknown \['nope'\]"):
        build_corpus(tmp_path, _cfg(domains=("nope",)))


def test_read_jsonl_reports_corrupted_lines_with_file_and_line(tmp_path, capsys):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n{broken\n\n[1, 2]\n{"a": 2}\n')
    with pytest.raises(CorpusError) as e:
        read_jsonl(p)
    msg = str(e.value)
    assert f"{p}:2:" in msg and f"{p}:4:" in msg and "2 corrupted line(s)" in msg
    assert read_jsonl(p, on_error="skip") == [{"a": 1}, {"a": 2}]
    assert f"{p}:2:" in capsys.readouterr().err


def test_user_jsonl_domains_keep_conversations_together(tmp_path):
    p = tmp_path / "user.jsonl"
    lines = []
    for c in range(20):
        for turn in range(3):
            lines.append(
                {"domain": "chat" if c % 2 else "law", "source": f"conv{c}", "text": f"turn {turn} of conv {c} " * 5}
            )
    p.write_text("".join(json.dumps(r) + "\n" for r in lines))
    units = jsonl_units(p)
    assert sorted(units) == ["chat", "law"] and len(units["chat"]) == 10
    assert units["chat"][0].load().count("turn") == 3 * 5
    out = tmp_path / "out"
    man = build_corpus(out, _cfg(user_jsonl=(str(p),)), progress=False)
    assert sorted(man["domains"]) == ["chat", "law"]
    ds = load_corpus(out)
    assert set(ds["train"]["domain"]) == {"chat", "law"}
    assert set(ds["train"]["source"]).isdisjoint(set(ds["validation"]["source"]))


def test_user_jsonl_corrupted_line_is_an_error(tmp_path):
    p = tmp_path / "user.jsonl"
    p.write_text('{"domain": "a", "text": "x"}\n{"text": "no domain"}\n')
    with pytest.raises(CorpusError, match=r"user.jsonl:2: a record must have keys \['domain', 'text'\]"):
        build_corpus(tmp_path / "out", _cfg(user_jsonl=(str(p),)))


def test_chunks_cut_at_line_breaks_and_reassemble():
    text = "".join(f"line {i}\n" for i in range(200))
    pieces = list(_chunks(text, 100))
    assert "".join(pieces) == text and all(len(p) <= 100 for p in pieces)
    assert all(p.endswith("\n") for p in pieces)


def test_package_cache_offline_uses_cached_extraction(tmp_path):
    pkg = tmp_path / "fake-pkg"
    (pkg / "usr").mkdir(parents=True)
    (pkg / ".extracted").write_text("1.2-3\n")
    cache = PackageCache(tmp_path, offline=True)
    assert cache.deb("fake-pkg") == pkg and cache.versions["fake-pkg"] == "1.2-3"


def test_dictd_entries_decode_index_offsets(tmp_path):
    body = "00-database-info\nheader\nfoo\n   a thing\nbar\n   another\n"
    (tmp_path / "x.dict.dz").write_bytes(gzip.compress(body.encode()))
    b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    enc = lambda n: b64[n // 64] + b64[n % 64] if n >= 64 else b64[n]  # noqa: E731
    i_foo, i_bar = body.index("foo"), body.index("bar")
    (tmp_path / "x.index").write_text(
        f"00-database-info\tA\t{enc(i_foo)}\nbar\t{enc(i_bar)}\t{enc(len(body) - i_bar)}\nfoo\t{enc(i_foo)}\t{enc(i_bar - i_foo)}\n"
    )
    assert dictd_entries(tmp_path / "x.index", tmp_path / "x.dict.dz") == [
        ("bar", "bar\n   another\n"),
        ("foo", "foo\n   a thing\n"),
    ]


def _xdr_strsxp(values: list[str]) -> bytes:
    import struct

    out = b"X\n" + struct.pack(">iii", 2, 0x040201, 0x020300) + struct.pack(">ii", 16, len(values))
    for v in values:
        b = v.encode()
        out += struct.pack(">ii", 0x00040009, len(b)) + b
    return out


def test_rdata_unserialize_and_lazyload_db(tmp_path):
    import struct
    import zlib

    blob = _xdr_strsxp(["CHAPTER 1", "It is a truth.", ""])
    assert unserialize(blob) == ["CHAPTER 1", "It is a truth.", ""]
    payload = struct.pack(">I", len(blob)) + zlib.compress(blob)
    (tmp_path / "Rdata.rdb").write_bytes(payload)

    # index: list(variables = list(book = c(0L, n)), references = list(), compressed = TRUE)
    def intsxp(xs):  # type: ignore[no-untyped-def]
        return struct.pack(">ii", 13, len(xs)) + b"".join(struct.pack(">i", x) for x in xs)

    def names_attr(names):  # type: ignore[no-untyped-def]
        s = struct.pack(">i", 0x00000402) + struct.pack(">i", 1) + struct.pack(">ii", 0x00040009, 5) + b"names"
        s += struct.pack(">ii", 16, len(names))
        for n in names:
            s += struct.pack(">ii", 0x00040009, len(n)) + n.encode()
        return s + struct.pack(">i", 254)

    variables = struct.pack(">ii", 19 | (1 << 9), 1) + intsxp([0, len(payload)]) + names_attr(["book"])
    index = (
        b"X\n"
        + struct.pack(">iii", 2, 0x040201, 0x020300)
        + struct.pack(">ii", 19 | (1 << 9), 3)
        + variables
        + struct.pack(">ii", 19, 0)
        + struct.pack(">ii", 10, 1)
        + struct.pack(">i", 1)
        + names_attr(["variables", "references", "compressed"])
    )
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(index))
    assert read_lazyload_db(tmp_path / "Rdata") == {"book": ["CHAPTER 1", "It is a truth.", ""]}


def test_html_to_text_drops_markup():
    assert (
        html_to_text(
            "<html><head><title>x</title></head><body><p>Hallo <b>Welt</b></p><script>1</script></body></html>"
        )
        == "Hallo Welt\n"
    )


# ---------------------------------------------------------------------------- corrupted lines, cache keys, unsafe names
def test_build_corpus_corrupted_jsonl_lines_raise_with_file_and_line_unless_skipped(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    src = _user_jsonl(tmp_path / "user.jsonl")
    cfg = dict(domains=(), user_jsonl=(str(src),), max_chars=None, validation_fraction=0.25, offline=True)
    with pytest.raises(CorpusError) as info:
        build_corpus(tmp_path / "c1", CorpusConfig(**cfg), progress=False)
    msg = str(info.value)
    assert f"{src}:4: JSONDecodeError" in msg and f"{src}:8: JSONDecodeError" in msg and "2 corrupted line(s)" in msg
    assert "skip_bad_lines=True / --skip-bad-lines" in msg
    man = build_corpus(tmp_path / "c2", CorpusConfig(**cfg, skip_bad_lines=True), progress=False)
    assert man["skipped_lines"] == {str(src.resolve()): 2} and sorted(man["domains"]) == ["a", "b"]
    assert "skipped 2 corrupted line(s)" in capsys.readouterr().err
    assert CorpusConfig(**cfg).key() == CorpusConfig(**cfg, skip_bad_lines=True).key()


def test_corpus_readers_of_a_built_corpus_skip_only_when_asked(tmp_path: Path) -> None:
    src = _user_jsonl(tmp_path / "user.jsonl")
    out = tmp_path / "c"
    build_corpus(
        out,
        CorpusConfig(domains=(), user_jsonl=(str(src),), max_chars=None, validation_fraction=0.25, skip_bad_lines=True),
        progress=False,
    )
    train = out / "a" / "train.jsonl"
    n = len(read_jsonl(train))
    with train.open("a") as f:
        f.write('{"id": 1}\n')  # a record without "text"
    with pytest.raises(CorpusError, match=rf"{train}:{n + 1}: a record must have keys \['text'\]; missing \['text'\]"):
        domain_texts(out, "train", ["a"])
    assert len(domain_texts(out, "train", ["a"], on_error="skip")["a"]) == n


def test_corpus_key_follows_file_contents_and_a_partial_build_is_retried(tmp_path, capsys):
    from ddk.recipes.corpus import CorpusConfig, build_corpus

    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"domain": "mine", "text": f"text {i}\n" * 20}) + "\n" for i in range(8)))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("hello\n" * 50)
    (folder / "b.txt").write_text("world\n" * 50)
    base = dict(
        domains=("math",),
        user_jsonl=(str(data),),
        user_folders={"fold": str(folder)},
        max_chars=None,
        validation_fraction=0.3,
        cache_dir=str(tmp_path / "debs"),
        offline=True,
    )
    key = CorpusConfig(**base).key()
    assert CorpusConfig(**{**base, "offline": False}).key() == key
    with data.open("a") as f:  # the same path, other contents
        f.write(json.dumps({"domain": "mine", "text": "more\n" * 20}) + "\n")
    assert CorpusConfig(**base).key() != key
    key = CorpusConfig(**base).key()
    (folder / "a.txt").write_text("changed\n" * 50)
    assert CorpusConfig(**base).key() != key

    out = tmp_path / "corpus"
    man = build_corpus(out, CorpusConfig(**base), progress=False)  # offline, empty package cache: math skipped
    assert "math" in man["skipped"] and man["complete"] is False
    capsys.readouterr()
    build_corpus(out, CorpusConfig(**base), progress=False)
    assert "its last build skipped ['math']; trying them again" in capsys.readouterr().err


@pytest.mark.parametrize("domain", ["../../x", "{tmp}/abs", "..", ".hidden"])
def test_data_build_rejects_domain_names_that_leave_the_folder(tmp_path, capsys, domain):
    domain = domain.format(tmp=tmp_path)
    data = tmp_path / "evil.jsonl"
    data.write_text("".join(json.dumps({"domain": domain, "id": f"u{i}", "text": "a\n" * 40}) + "\n" for i in range(6)))
    out = tmp_path / "a" / "b" / "corpus"
    assert (
        main(
            [
                "data",
                "build",
                "--no-builtin",
                "--user-jsonl",
                str(data),
                "--out",
                str(out),
                "--validation-fraction",
                "0.4",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert f"jsonl_units: the domain of record 0 of {data} must " in err and repr(domain) in err
    assert sorted(p.name for p in tmp_path.rglob("*.jsonl")) == ["evil.jsonl"]  # nothing written, inside or out
    with pytest.raises(ValueError, match=r"build_corpus: user_folders names must not"):
        from ddk.recipes.corpus import CorpusConfig, build_corpus

        build_corpus(out, CorpusConfig(domains=(), user_folders={"../up": str(tmp_path)}))


def test_split_units_test_side_is_disjoint_stable_and_never_taken_from_validation(tmp_path):
    units = folder_units(_folder(tmp_path / "a", 60))
    two = split_units(units, validation_fraction=0.2)
    three = split_units(units, validation_fraction=0.2, test_fraction=0.2)
    src = {side: {u.source for u in three[side]} for side in three}
    assert set(three) == {"train", "validation", "test"} and all(src.values())
    assert not (src["train"] & src["test"]) and not (src["validation"] & src["test"])
    assert src["validation"] == {u.source for u in two["validation"]}  # the test side leaves validation alone
    assert src["test"] | src["train"] == {u.source for u in two["train"]}
    more = units + folder_units(_folder(tmp_path / "b", 30, prefix="g"), prefix="b/")
    grown = split_units(more, validation_fraction=0.2, test_fraction=0.2)
    assert src["test"] <= {u.source for u in grown["test"]}  # adding data never moves a test unit
    small = split_units(units[:3], validation_fraction=0.001, test_fraction=0.001)
    assert [len(small[s]) for s in ("validation", "test", "train")] == [1, 1, 1]
    with pytest.raises(ValueError, match="at least 3 distinct sources"):
        split_units(units[:2], validation_fraction=0.5, test_fraction=0.1)


def test_build_corpus_writes_a_test_side_and_keeps_old_keys(tmp_path):
    src = _folder(tmp_path / "src", 60, size=600)
    assert _cfg(user_folders={"mine": str(src)}).key() == _cfg(user_folders={"mine": str(src)}, test_fraction=0.0).key()
    assert _cfg(user_folders={"mine": str(src)}).key() != _cfg(user_folders={"mine": str(src)}, test_fraction=0.1).key()
    out = tmp_path / "out"
    man = build_corpus(out, _cfg(user_folders={"mine": str(src)}, max_chars=6000, test_fraction=0.1), progress=False)
    d = man["domains"]["mine"]
    assert (d["train"]["chars"], d["validation"]["chars"], d["test"]["chars"]) == (4200, 1200, 600)
    sources = {side: {r["source"] for r in _records(out, "mine", side)} for side in ("train", "validation", "test")}
    assert sources["test"] and not sources["test"] & (sources["train"] | sources["validation"])
    assert (
        build_corpus(out, _cfg(user_folders={"mine": str(src)}, max_chars=6000, test_fraction=0.1), progress=False)
        == man
    )
    (out / "mine" / "test.jsonl").write_text("")  # a changed test file is rebuilt like the others
    rebuilt = build_corpus(
        out, _cfg(user_folders={"mine": str(src)}, max_chars=6000, test_fraction=0.1), progress=False
    )
    assert rebuilt["domains"] == man["domains"]
    with pytest.raises(ValueError, match=r"test_fraction must be in \[0, 1 - validation_fraction\)"):
        build_corpus(out, _cfg(user_folders={"mine": str(src)}, test_fraction=0.8), progress=False)
