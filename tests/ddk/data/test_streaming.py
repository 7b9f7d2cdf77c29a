"""Tests of ``ddk.data.streaming.pack_files``: the same result as ``pack_domains(load_records(...))``
and as the former single-process packing (pinned digests), for every number of tokenizing
processes; the cache found again by the sources' fingerprint without reading them; bad records;
one build per cache folder under 2 gloo ranks; peak memory that does not grow with the corpus."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hf_models import domain_text, write_jsonl

from ddk.data import load_records, pack_domains, pack_files
from ddk.data.records import RecordStream

L = 16


def _same(a: Any, b: Any) -> None:
    assert a.key == b.key and a.names == b.names
    for x, y in zip(a.train + a.validation, b.train + b.validation):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _entries(root: Path) -> list[Any]:
    meta = json.loads((root / "meta.json").read_text())
    return [meta["key"], meta["train"], meta["validation"]]


def _jsonl(path: Path, recs: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


class Chars:
    """A toy tokenizer: one id per character, EOS 0 (no training: its ids never change)."""

    eos_token_id = 0

    def get_vocab(self) -> dict[str, int]:
        return {chr(i): i for i in range(32, 127)}

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict[str, Any]:
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def _chars_corpus(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    words = {
        d: ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(1, 7))) for _ in range(50)]
        for d in ("code", "math", "prose")
    }
    out = []
    for _ in range(n):
        d = rng.choice(("code", "math", "prose"))
        out.append({"domain": d, "text": " ".join(rng.choice(words[d]) for _ in range(rng.randint(0, 60)))})
    return out


# What the single-process packing of ddk before pack_files (commit 3d08808) wrote for
# _chars_corpus(3000, 0) with Chars: the key, and per file [shape, the first 16 hex digits of its
# SHA-256] (train_0..2, then validation_0..2).
FORMER = {
    "hash": [
        "2a34a5d96ab430f7",
        [[5058, 32], "1dbd618c907510f4"],
        [[4801, 32], "9870abf39bf3b4a7"],
        [[4753, 32], "83d56fcb2051d653"],
        [[20, 32], "76510a4a0fcffd17"],
        [[20, 32], "7a5dbe2344104689"],
        [[20, 32], "856128cf174e3f72"],
    ],
    "validation": [
        "e1007451da9c7b5c",
        [[10160, 16], "3b2eb187e80a3455"],
        [[9653, 16], "f4956a1ef4823e02"],
        [[9562, 16], "a21d73c6b5389227"],
        [[30, 16], "0389e43f1ddf495d"],
        [[30, 16], "bfa69a3e988f60e5"],
        [[30, 16], "d5e12d093da817c0"],
    ],
}
FORMER_OPTIONS = {"hash": dict(seq_len=32, val_samples=20), "validation": dict(seq_len=16, val_samples=30)}


def _pinned(root: Path) -> list[Any]:
    key, train, val = _entries(root)
    return [key] + [[e["shape"], e["sha256"][:16]] for e in train + val]


@pytest.mark.parametrize("case", ["hash", "validation"])
def test_pack_domains_and_pack_files_write_the_former_packing_byte_for_byte(tmp_path, case):
    """3,000 records (several batches, so 2 processes do start): the same key and files as the
    former packing, from memory with 1 and 2 processes and streamed from a JSONL file."""
    records = _chars_corpus(3000, 0)
    kw: dict[str, Any] = dict(FORMER_OPTIONS[case], progress=False)
    val_path = None
    if case == "validation":
        kw["validation"] = _chars_corpus(200, 1)
        val_path = _jsonl(tmp_path / "v.jsonl", kw["validation"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # empty texts are on both sides: the overlap warning
        for num_proc in (1, 2):
            packed = pack_domains(records, Chars(), cache_dir=tmp_path / f"mem{num_proc}", num_proc=num_proc, **kw)
            assert _pinned(packed.root) == FORMER[case]
            built = json.loads((packed.root / "meta.json").read_text())["built_by"]
            assert built["processes"] == num_proc and built["pid"] == os.getpid()
        kw["validation"] = val_path
        streamed = pack_files(_jsonl(tmp_path / "c.jsonl", records), Chars(), cache_dir=tmp_path / "files", **kw)
    assert _pinned(streamed.root) == FORMER[case]


def _formats(tmp_path: Path) -> dict[str, Path]:
    """One 3-domain corpus as a JSONL file, a Parquet file and one JSONL file per domain."""
    jl = write_jsonl(tmp_path / "c.jsonl", docs_per_domain=40, words=12)
    recs = [json.loads(line) for line in jl.read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "c.parquet")
    for d in ("code", "math", "prose"):
        _jsonl(tmp_path / f"{d}.jsonl", [{"text": r["text"]} for r in recs if r["domain"] == d])
    _jsonl(tmp_path / "v.jsonl", [{"domain": d, "text": " ".join([d] * 40)} for d in ("code", "math", "prose")])
    return {"jsonl": jl, "parquet": tmp_path / "c.parquet", "v": tmp_path / "v.jsonl"}


@pytest.mark.parametrize(
    "case",
    ["jsonl", "parquet", "pairs", "validation", "domains"],
)
def test_pack_files_equals_pack_domains_of_load_records(tok, tmp_path, case):
    f = _formats(tmp_path)
    paths: Any = {"jsonl": f["jsonl"], "parquet": f["parquet"]}.get(case, f["jsonl"])
    kw: dict[str, Any] = dict(seq_len=L, val_samples=3, progress=False)
    if case == "pairs":
        paths = [
            ("code", tmp_path / "code.jsonl"),
            ("math", tmp_path / "math.jsonl"),
            ("prose", tmp_path / "prose.jsonl"),
        ]
    if case == "domains":
        kw["domains"] = ["prose", "code"]
    val = f["v"] if case == "validation" else None
    ref = pack_domains(
        load_records(paths, progress=False),
        tok,
        validation=load_records(val, progress=False) if val else None,
        cache_dir=tmp_path / "ref",
        **kw,
    )
    for cache in (None, tmp_path / "files"):
        got = pack_files(paths, tok, validation=val, cache_dir=cache, num_proc=2, **kw)
        _same(got, ref)
    assert _entries(got.root) == _entries(ref.root)
    assert (got.root / "sources.json").is_file() and not (ref.root / "sources.json").exists()  # no fingerprint


def test_pack_files_same_files_for_any_number_of_processes(tok, tmp_path):
    """2,400 records of up to 400 words: several batches, tokenized in 1, 2 and 3 processes."""
    rng = random.Random(0)
    recs = [{"domain": d, "text": domain_text(d, rng, rng.randint(0, 400))} for d in ("code", "prose", "math")] * 800
    path = _jsonl(tmp_path / "c.jsonl", recs)
    runs = {n: pack_files(path, tok, seq_len=64, val_samples=20, cache_dir=tmp_path / str(n), num_proc=n, progress=False)
            for n in (1, 2, 3)}  # fmt: skip
    for n, packed in runs.items():
        assert _entries(packed.root) == _entries(runs[1].root)
        assert json.loads((packed.root / "meta.json").read_text())["built_by"]["processes"] == n


def test_pack_files_unchanged_files_open_the_cache_without_being_read(tok, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "c.jsonl", docs_per_domain=20, words=12)
    kw: dict[str, Any] = dict(seq_len=L, val_samples=3, cache_dir=tmp_path / "packed", progress=False)
    first = pack_files(path, tok, **kw)
    assert sorted(p.name for p in (tmp_path / "packed").iterdir()) == [first.key]  # no lock file, no index
    recorded = json.loads((first.root / "sources.json").read_text())
    assert len(recorded["stat"]) == len(recorded["contents"]) == 1

    def unread(self, *a, **k):  # type: ignore[no-untyped-def]
        raise AssertionError("the records must not be parsed")

    def untokenized(self, *a, **k):  # type: ignore[no-untyped-def]
        raise AssertionError("the records must not be tokenized")

    with monkeypatch.context() as m:
        m.setattr(RecordStream, "batches", unread)
        m.setattr(type(tok), "__call__", untokenized)
        _same(pack_files(path, tok, **kw), first)  # unchanged: a stat per file
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # touched, same bytes
        _same(pack_files(path, tok, **kw), first)  # hashed, not parsed
        moved = path.rename(tmp_path / "moved.jsonl")
        _same(pack_files(moved, tok, **kw), first)
    recorded = json.loads((first.root / "sources.json").read_text())
    assert len(recorded["stat"]) == 3 and len(recorded["contents"]) == 1
    with moved.open("a") as f:
        f.write(json.dumps({"domain": "code", "text": "def more(): return 1"}) + "\n")
    edited = pack_files(moved, tok, **kw)
    assert edited.key != first.key and edited.sizes[0] >= first.sizes[0]


def test_pack_files_finds_a_cache_pack_domains_built_by_parsing_without_tokenizing(tok, tmp_path, monkeypatch):
    """A cache of the same options without a contents fingerprint (pack_domains', or one packed
    before pack_files) may hold these records: they are parsed to find the key, not tokenized."""
    path = write_jsonl(tmp_path / "c.jsonl", docs_per_domain=20, words=12)
    kw: dict[str, Any] = dict(seq_len=L, val_samples=3, cache_dir=tmp_path / "packed", progress=False)
    first = pack_domains(load_records(path, progress=False), tok, **kw)

    def untokenized(self, *a, **k):  # type: ignore[no-untyped-def]
        raise AssertionError("the records must not be tokenized")

    with monkeypatch.context() as m:
        m.setattr(type(tok), "__call__", untokenized)
        _same(pack_files(path, tok, **kw), first)
    assert len(json.loads((first.root / "sources.json").read_text())["contents"]) == 1  # now it has one


def test_pack_files_bad_record_stops_the_tokenizing_and_is_listed(tok, tmp_path, monkeypatch):
    rng = random.Random(0)
    recs = [{"domain": d, "text": domain_text(d, rng, 50)} for _ in range(700) for d in ("code", "prose", "math")]
    del recs[5]["domain"]
    path = _jsonl(tmp_path / "c.jsonl", recs)
    calls = {"n": 0}
    real = type(tok).__call__

    def counting(self, *a, **k):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(type(tok), "__call__", counting)
    with pytest.raises(ValueError) as e:
        pack_files(path, tok, seq_len=L, val_samples=3, cache_dir=tmp_path / "packed", num_proc=1, progress=False)
    assert str(e.value).startswith(
        "pack_files: every record must have a str 'text' and a non-empty str 'domain', within the size cap; got 1 "
        f"bad record(s) (fix them, or drop them with on_missing='skip', CLI flag --skip-bad-records):\n  {path}:6: "
        "missing field 'domain'"
    )
    assert calls["n"] == 0  # the bad record is in the first batch: nothing was tokenized
    assert [p.name for p in (tmp_path / "packed").iterdir()] == []  # no cache, no build folder left
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = pack_files(path, tok, seq_len=L, val_samples=3, on_missing="skip", num_proc=1, progress=False)
    assert [str(w.message).split(";")[0] for w in caught] == [f"pack_files: skipped 1 bad record(s) ({path}: 1)"]
    assert caught[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _same(
            got,
            pack_domains(
                load_records(path, on_missing="skip", progress=False), tok, seq_len=L, val_samples=3, progress=False
            ),
        )


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_pack_files_num_proc_must_be_a_count(tok, tmp_path, bad):
    path = write_jsonl(tmp_path / "c.jsonl", docs_per_domain=4, words=4)
    with pytest.raises(
        ValueError,
        match=re.escape("pack_files: num_proc must be an int >= 1, or 0/None for the CPU count (")
        + r"\d+"
        + re.escape(f"); got {bad!r}."),
    ):
        pack_files(path, tok, seq_len=L, num_proc=bad, progress=False)


# ---------------------------------------------------------------------------- once per cache folder
_RANK = textwrap.dedent(
    """
    import json, os, sys
    rank, world, port, root = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    import numpy as np
    import torch.distributed as dist
    from transformers import AutoTokenizer
    from ddk.data.records import RecordStream
    from ddk.engine.components import load_run_data
    from ddk.recipes.config import make_config

    read = {"records": 0}
    batches = RecordStream.batches

    def counted(self, *a, **k):
        for texts, domains in batches(self, *a, **k):
            read["records"] += len(texts)
            yield texts, domains

    RecordStream.batches = counted
    dist.init_process_group("gloo", rank=rank, world_size=world)
    tok = AutoTokenizer.from_pretrained(os.path.join(root, "tok"))
    cfg = make_config(data=(os.path.join(root, "c.jsonl"),), student="s", teacher="t", data_dir=os.path.join(root, "cache"),
                      seq_len=32, val_samples=4, num_proc=1, progress=False)
    dist.barrier()  # both ranks ask for the cache at once, as torchrun's ranks do (no rank_zero_first here)
    packed = load_run_data(cfg, tok)
    meta = json.loads((packed.root / "meta.json").read_text())
    digest = [np.asarray(a).sum().item() for a in packed.train + packed.validation]
    with open(os.path.join(root, f"rank-{rank}.json"), "w") as f:
        json.dump({"pid": os.getpid(), "read": read["records"], "key": packed.key, "built_by": meta["built_by"]["pid"],
                   "digest": digest}, f)
    dist.barrier()
    dist.destroy_process_group()
    """
)


@pytest.mark.e2e
def test_pack_files_under_two_gloo_ranks_builds_once_and_the_other_rank_reads_nothing(tok, tmp_path):
    """Two ranks call the engine's ``load_run_data`` at the same moment on an empty cache: one
    takes the folder's lock and packs, the other waits, then opens the cache by the sources'
    fingerprint, having read no record."""
    from gloo_workers import run_workers

    tok.save_pretrained(str(tmp_path / "tok"))
    rng = random.Random(0)
    recs = [{"domain": d, "text": domain_text(d, rng, rng.randint(20, 300))} for d in ("code", "prose", "math")] * 600
    _jsonl(tmp_path / "c.jsonl", recs)
    script = tmp_path / "rank.py"
    script.write_text(_RANK)
    logs = run_workers(script, lambda r, port: [r, 2, port, tmp_path], timeout=240)
    got = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    builders = [g for g in got if g["read"] > 0]
    assert len(builders) == 1 and builders[0]["read"] == len(recs), (got, logs)
    assert {g["built_by"] for g in got} == {builders[0]["pid"]}  # the cache names the one builder
    assert got[0]["key"] == got[1]["key"] and got[0]["digest"] == got[1]["digest"]
    assert [p.name for p in (tmp_path / "cache" / "packed").iterdir()] == [got[0]["key"]]


# ---------------------------------------------------------------------------- memory
_PEAK = textwrap.dedent(
    """
    import json, sys
    corpus, warm, cache, num_proc = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    import datasets, pyarrow, tqdm.auto  # imported before the baseline, as a run has them
    from ddk.data import pack_files

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) << 10 for line in f if line.startswith(key + ":"))

    class Bytes:  # a fast toy tokenizer (a token per UTF-8 byte): the test measures the packing, not BPE
        eos_token_id = 256
        def get_vocab(self):
            return {f"<{i}>": i for i in range(257)}
        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [list(t.encode()) for t in texts]}

    kw = dict(seq_len=128, val_samples=8, progress=False, num_proc=num_proc)
    pack_files(warm, Bytes(), cache_dir=cache + "-warm", **kw)  # every code path once: its buffers allocated
    base = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    packed = pack_files(corpus, Bytes(), cache_dir=cache, **kw)
    print(json.dumps({"grew": status("VmHWM") - base, "tokens": sum(packed.sizes) * 128}))
    """
)


def _corpus(path: Path, megabytes: float) -> Path:
    """About ``megabytes`` MB of JSON lines: 900 distinct documents of 5 to 400 words, repeated."""
    rng = random.Random(0)
    pool = [json.dumps({"domain": d, "text": domain_text(d, rng, rng.randint(5, 400))}) + "\n"
            for d in ("code", "prose", "math") for _ in range(300)]  # fmt: skip
    rng.shuffle(pool)
    block = "".join(pool)
    with path.open("w") as f:
        for _ in range(max(1, round(megabytes * 1e6 / len(block)))):
            f.write(block)
    return path


def _peak_growth(tmp_path: Path, corpus: Path, warm: Path, num_proc: int) -> dict[str, int]:
    from recipe_cases import child_env

    cache = tmp_path / f"cache-{corpus.stem}-{num_proc}"
    res = subprocess.run(
        [sys.executable, "-c", _PEAK, str(corpus), str(warm), str(cache), str(num_proc)],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.splitlines()[-1])


@pytest.mark.e2e
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="resets VmHWM through /proc/self/clear_refs")
@pytest.mark.parametrize("num_proc", [1, 2])
def test_pack_files_peak_memory_does_not_grow_with_the_corpus(tmp_path, num_proc):
    """8 MB and 48 MB of JSONL (31M and 186M bytes of packed tokens), packed in a child process
    after a warm-up: the peak RSS above the warm process grows by at most 16 MiB (1 process) and
    24 MiB (2 processes: the main one's, the results in flight) from 8 MB to 48 MB, where reading
    the corpus into memory first grew it by about 4 bytes per byte of corpus, 160 MB."""
    small, large = _corpus(tmp_path / "small.jsonl", 8), _corpus(tmp_path / "large.jsonl", 48)
    warm = _corpus(tmp_path / "warm.jsonl", 8)
    a = _peak_growth(tmp_path, small, warm, num_proc)
    b = _peak_growth(tmp_path, large, warm, num_proc)
    assert b["tokens"] > 5 * a["tokens"]
    margin = (16 if num_proc == 1 else 24) << 20
    assert b["grew"] - a["grew"] <= margin, f"the peak grew by {(b['grew'] - a['grew']) >> 20} MiB: {a}, {b}"


_DISTILL_PEAK = textwrap.dedent(
    """
    import json, sys
    from ddk.recipes.cli import main

    code = main(sys.argv[1:])
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) << 10 for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"code": code, "peak": peak}))
    """
)


@pytest.mark.e2e
@pytest.mark.slow  # about 2 minutes on two cores: 56 MB of JSONL through the BPE tokenizer
def test_ddk_distill_packs_and_distills_a_corpus_six_times_its_memory_margin(tmp_path):
    """``ddk distill --num-proc 2`` on 8 MB and on 48 MB of JSONL (the tiny models of
    ``hf_models``, 2 steps): the whole run's peak RSS grows by at most 24 MiB from one to the other,
    a sixth of the 40 MB the corpus grew by (reading it into memory grew it by about 160 MB)."""
    from hf_models import make_pair
    from recipe_cases import child_env

    teacher, student = make_pair(tmp_path / "models", "llama")
    peaks = {}
    for name, mb in (("small", 8), ("large", 48)):
        corpus = _corpus(tmp_path / f"{name}.jsonl", mb)
        argv = ["distill", "--teacher", str(teacher), "--student", str(student), "--data", str(corpus)]
        argv += ["--data-dir", str(tmp_path / f"cache-{name}"), "--out", str(tmp_path / f"run-{name}")]
        argv += [
            "--seq-len",
            "128",
            "--val-samples",
            "4",
            "--eval-batch-size",
            "4",
            "--steps",
            "2",
            "--batch-size",
            "4",
        ]
        argv += ["--interval", "1", "--num-proc", "2", "--threads", "1", "--no-progress", "--device", "cpu"]
        res = subprocess.run(
            [sys.executable, "-c", _DISTILL_PEAK, *argv], env=child_env(), capture_output=True, text=True, timeout=1200
        )
        assert res.returncode == 0, res.stderr[-3000:]
        got = json.loads(res.stdout.splitlines()[-1])
        assert got["code"] == 0
        peaks[name] = got["peak"]
        summary = json.loads((tmp_path / f"run-{name}" / "summary.json").read_text())
        assert sum(summary["samples_per_domain"]) == 8  # 2 steps of 4 sequences: it distilled
    grew = peaks["large"] - peaks["small"]
    assert grew <= 24 << 20, f"the peak grew by {grew >> 20} MiB from 8 MB to 48 MB of corpus: {peaks}"
