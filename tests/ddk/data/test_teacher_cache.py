"""Tests of ddk/data/teacher_cache.py: the offline top-k teacher cache (build, contents, kill and
resume, manifest checks) with tiny saved Llama and padded-vocabulary Qwen2 teachers."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_models import make_pair, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

import ddk.data.teacher_cache as tc
from ddk.data import TeacherCache, TeacherCacheCollator, build_teacher_cache, load_records, pack_domains, tokenizer_hash


def _setup(tmp_path: Path, family: str = "llama"):  # type: ignore[no-untyped-def]
    teacher_dir, student_dir = make_pair(tmp_path / family, family)
    tok = AutoTokenizer.from_pretrained(str(student_dir))
    corpus = write_jsonl(tmp_path / "c.jsonl", docs_per_domain=12)
    packed = pack_domains(load_records([str(corpus)], progress=False), tok, seq_len=16, val_samples=3, progress=False)
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir)).eval()
    return teacher, tok, packed


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_cache_holds_the_teachers_top_k_and_its_exact_validation_ce(tmp_path: Path, family: str) -> None:
    teacher, tok, packed = _setup(tmp_path, family)
    v = len(tok)
    cache = build_teacher_cache(teacher, packed, tmp_path / "cache", top_k=5, temperature=2.0, vocab_size=v,
                                tokenizer_hash=tokenizer_hash(tok), batch_size=3, progress=False)  # fmt: skip
    assert cache.names == list(packed.names) and cache.sizes == packed.sizes
    ds = cache.train_dataset()
    item = ds[len(ds) - 1]  # the last training sequence of the last domain
    d = len(packed.names) - 1
    ids = torch.from_numpy(np.asarray(packed.train[d][-1], dtype=np.int64))
    assert torch.equal(item["input_ids"], ids) and item["domain_id"] == d
    with torch.no_grad():
        logits = teacher(input_ids=ids[None]).logits[0, :, :v].double()  # padded rows cut off
    top = torch.log_softmax(logits / 2.0, -1).topk(5, -1)
    assert torch.equal(item["teacher_topk_ids"], top.indices)
    torch.testing.assert_close(item["teacher_topk_logprobs"].double(), top.values, atol=2e-3, rtol=2e-3)  # fp16
    torch.testing.assert_close(item["teacher_tail"].double(), 1 - top.values.exp().sum(-1), atol=1e-5, rtol=1e-4)
    # the teacher's per-domain validation CE, from the cache alone, equals a direct pass
    direct = []
    for arr in packed.validation:
        x = torch.from_numpy(np.asarray(arr, dtype=np.int64))
        with torch.no_grad():
            lp = torch.log_softmax(teacher(input_ids=x).logits.double(), -1)  # the teacher's own CE: all rows
        direct.append(float(-lp[:, :-1].gather(-1, x[:, 1:, None]).mean()))
    torch.testing.assert_close(cache.teacher_ce, torch.tensor(direct, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    man = cache.manifest
    assert man["tokens"]["validation"] == [int(a.shape[0]) * 15 for a in packed.validation]
    assert man["vocab_size"] == v and man["top_k"] == 5 and man["temperature"] == 2.0 and man["bytes_per_token"] == 42
    batch = TeacherCacheCollator()([ds[0], ds[1]])
    assert batch["teacher_topk_ids"].shape == (2, 16, 5) and batch["teacher_tail"].shape == (2, 16)
    assert int(batch["teacher_topk_ids"].max()) < v
    assert TeacherCache(tmp_path / "cache", verify=True).sizes == packed.sizes


def test_a_killed_build_resumes_and_equals_a_clean_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    teacher, tok, packed = _setup(tmp_path)
    clean = build_teacher_cache(teacher, packed, tmp_path / "clean", top_k=3, progress=False)
    calls = {"n": 0}
    orig = tc._write_shard

    def dies_on_the_third_shard(*a, **k):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return orig(*a, **k)

    monkeypatch.setattr(tc, "_write_shard", dies_on_the_third_shard)
    with pytest.raises(KeyboardInterrupt):
        build_teacher_cache(teacher, packed, tmp_path / "cut", top_k=3, progress=False)
    assert not (tmp_path / "cut" / "manifest.json").exists()
    assert len(list((tmp_path / "cut" / "shards").glob("*/shard.json"))) == 2
    calls["n"] = 10
    resumed = build_teacher_cache(teacher, packed, tmp_path / "cut", top_k=3, progress=False)
    assert calls["n"] == 10 + 2 * len(packed.names) - 2  # only the missing shards were computed
    for a, b in zip(
        clean.arrays("train") + clean.arrays("validation"), resumed.arrays("train") + resumed.arrays("validation")
    ):
        for name in a:
            assert np.array_equal(a[name], b[name], equal_nan=True), name
    assert clean.teacher_ce.tolist() == resumed.teacher_ce.tolist()
    # another plan in the same folder is an error naming the difference; the finished cache is reused
    with pytest.raises(ValueError, match=r"holds a cache of another plan \(differs in \['top_k'\]\)"):
        build_teacher_cache(teacher, packed, tmp_path / "cut", top_k=4, progress=False)
    monkeypatch.setattr(tc, "_write_shard", lambda *a, **k: pytest.fail("rebuilt a finished cache"))
    build_teacher_cache(teacher, packed, tmp_path / "cut", top_k=3, progress=False)


def test_the_cache_checks_a_runs_tokenizer_by_the_one_rule_and_names_what_differs(tmp_path: Path) -> None:
    """A cache stores its tokenizer's signature: a run whose tokenizer loads the same
    ``tokenizer.json`` as another class with other ids is refused naming the first differing
    tokens and the classes (not two hashes); the same tokenizer as another class that gives the
    same ids passes."""
    teacher, tok, packed = _setup(tmp_path)
    cache = build_teacher_cache(teacher, packed, tmp_path / "c", top_k=2, tokenizer=tok, progress=False)
    assert cache.manifest["tokenizer"]["size"] == len(tok) and cache.manifest["tokenizer_hash"] == tokenizer_hash(tok)
    src = tmp_path / "llama" / "student"

    def as_class(name: str, **conf: object):  # type: ignore[no-untyped-def]
        dst = tmp_path / name
        dst.mkdir()
        (dst / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
        (dst / "tokenizer_config.json").write_text(
            json.dumps({**json.loads((src / "tokenizer_config.json").read_text()), **conf})
        )
        return AutoTokenizer.from_pretrained(str(dst))

    cache.check(tokenizer=as_class("qwen", tokenizer_class="Qwen2Tokenizer"), vocab_size=len(tok))
    with pytest.raises(ValueError) as info:
        cache.check(tokenizer=as_class("gpt2", tokenizer_class="GPT2Tokenizer", add_prefix_space=True), fn="distill")
    msg = str(info.value)
    assert msg.startswith("distill: cache and run must tokenize identically (only padding rows ")
    assert "different ids of the probe text from token 0 on" in msg and "run GPT2Tokenizer from " in msg
    assert msg.endswith("rebuild it with `ddk teacher-cache` and the run's tokenizer.)") and "hash" not in msg


def test_a_damaged_shard_is_rebuilt_and_bad_caches_are_named(tmp_path: Path) -> None:
    teacher, tok, packed = _setup(tmp_path)
    build_teacher_cache(teacher, packed, tmp_path / "c", top_k=2, progress=False)
    (tmp_path / "c" / "manifest.json").unlink()  # as if killed before the manifest
    f = tmp_path / "c" / "shards" / "train-0" / "topk_ids.npy"
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    cache = build_teacher_cache(teacher, packed, tmp_path / "c", top_k=2, progress=False)
    TeacherCache(cache.root, verify=True)  # the damaged shard was recomputed
    with pytest.raises(
        ValueError, match=r"must match the run; got vocab_size: the cache has \d+, the run 7; temperature"
    ):
        cache.check(vocab_size=7, temperature=3.0, tokenizer_hash=cache.manifest["tokenizer_hash"])
    with pytest.raises(ValueError, match="must be a finished teacher cache"):
        TeacherCache(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, "):
        build_teacher_cache(teacher, packed, tmp_path / "d", top_k=0, progress=False)
    positions = sum(int(a.shape[0]) * a.shape[1] for a in (*packed.train, *packed.validation))
    files = 5 * 2 * len(packed.names)
    assert (
        positions * cache.manifest["bytes_per_token"]
        <= cache.disk_bytes()
        <= positions * cache.manifest["bytes_per_token"] + files * 128
    )  # + npy headers
    assert json.loads((cache.root / "plan.json").read_text())["top_k"] == 2


# ---------------------------------------------------------------------------- verify on read
@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished cache (k = 3), copied by each test that damages it."""
    root = tmp_path_factory.mktemp("built")
    teacher, tok, packed = _setup(root)
    return build_teacher_cache(teacher, packed, root / "cache", top_k=3, vocab_size=len(tok), progress=False).root


def _copy(built: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(built, tmp_path / "cache"))


def _forge(root: Path, shard: str, name: str, change) -> Path:  # type: ignore[no-untyped-def]
    """Rewrite one shard file with ``change(array)`` and its SHA-256 in the manifest (a consistent forgery)."""
    from ddk._io import file_sha256

    p = root / "shards" / shard / f"{name}.npy"
    np.save(p, change(np.load(p).copy()))
    man = json.loads((root / "manifest.json").read_text())
    man["shards"][shard]["files"][name]["sha256"] = file_sha256(p)
    (root / "manifest.json").write_text(json.dumps(man, indent=1))
    return p


def _rebuild(root: Path, folder: Path | None) -> str:
    what = f"{folder} and {root / 'manifest.json'}" if folder is not None else str(root / "manifest.json")
    return re.escape(f"To rebuild it, delete {what} and run `ddk teacher-cache` again")


def test_teacher_cache_flipped_byte_is_named_with_how_to_rebuild(built: Path, tmp_path: Path) -> None:
    root = _copy(built, tmp_path)
    f = root / "shards" / "validation-1" / "topk_logprobs.npy"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x80
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=re.escape(f"TeacherCache: {f} must have the SHA-256 its manifest gives")
                       + ".*" + _rebuild(root, f.parent)):  # fmt: skip
        TeacherCache(root)


def _set(value: float, at: tuple[int, ...] = (0, 1)):  # type: ignore[no-untyped-def]
    def change(a: np.ndarray) -> np.ndarray:
        a[at] = value
        return a

    return change


ATTACKS = {
    "sign-flipped log-probabilities (p > 1)": ("train-0", "topk_logprobs", lambda a: -a, "log-probabilities <= 0 and finite"),
    "NaN log-probability": ("train-1", "topk_logprobs", _set(np.nan, (0, 2, 1)), "log-probabilities <= 0 and finite"),
    "infinite log-probability": ("validation-0", "topk_logprobs", _set(-np.inf, (0, 0, 0)), "log-probabilities <= 0 and finite"),
    "tail mass 5.0": ("train-2", "tail", lambda a: np.full_like(a, 5.0), "tail masses in [0, 1]"),
    "tail mass -1.0": ("validation-2", "tail", _set(-1.0, (0, 3)), "tail masses in [0, 1]"),
    "top-k id = V": ("train-1", "topk_ids", _set(10**6, (0, 4, 2)), "token ids in [0, "),
    "top-k id -1": ("validation-1", "topk_ids", _set(-1, (0, 0, 0)), "token ids in [0, "),
    "input id = V": ("train-0", "input_ids", _set(10**6, (0, 5)), "token ids in [0, "),
    "input id -1": ("validation-0", "input_ids", _set(-1, (0, 0)), "token ids in [0, "),
    "positive label log-probability": ("validation-1", "label_logprob", _set(3.0, (0, 2)), "log-probabilities <= 0"),
}  # fmt: skip


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_teacher_cache_values_out_of_range_are_an_error(built: Path, tmp_path: Path, attack: str) -> None:
    shard, name, change, what = ATTACKS[attack]
    root = _copy(built, tmp_path)
    TeacherCache(root)  # the intact copy opens
    p = _forge(root, shard, name, change)
    with pytest.raises(
        ValueError, match=re.escape(f"TeacherCache: {p} must hold {what}") + ".*" + _rebuild(root, p.parent)
    ):
        TeacherCache(root)


@pytest.mark.parametrize("key", ["teacher_ce", "tokens"])
def test_teacher_cache_edited_manifest_teacher_ce_is_an_error(built: Path, tmp_path: Path, key: str) -> None:
    root = _copy(built, tmp_path)
    man = json.loads((root / "manifest.json").read_text())
    true = man[key]["validation"][1]
    man[key]["validation"][1] = true * 0.5 if key == "teacher_ce" else true - 1
    (root / "manifest.json").write_text(json.dumps(man, indent=1))
    with pytest.raises(ValueError, match=re.escape(f"manifest.json {key}['validation'][1] must equal") + ".*"
                       + _rebuild(root, None)):  # fmt: skip
        TeacherCache(root)
    man["shards"].pop("train-0")
    (root / "manifest.json").write_text(json.dumps(man, indent=1))
    with pytest.raises(ValueError, match=re.escape("must hold shards, one entry per split and domain")):
        TeacherCache(root)


def test_teacher_cache_second_open_trusts_the_stamp_a_changed_file_is_hashed_again(
    built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ddk.data.verify as verify

    root = _copy(built, tmp_path)  # a copy: new inodes, so the first open checks every file
    hashed: list[Path] = []
    real = verify.file_sha256

    def counting(path):  # type: ignore[no-untyped-def]
        hashed.append(Path(path))
        return real(path)

    monkeypatch.setattr(verify, "file_sha256", counting)
    files = sorted((root / "shards").rglob("*.npy"))
    assert TeacherCache(root).verified_now and sorted(hashed) == files
    hashed.clear()
    assert not TeacherCache(root).verified_now and hashed == []  # unchanged: a stat per file
    f = root / "shards" / "train-1" / "tail.npy"
    f.write_bytes(f.read_bytes() + b"")  # rewritten in place: the same bytes, a newer mtime
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert TeacherCache(root).verified_now and sorted(hashed) == files
    hashed.clear()
    assert not TeacherCache(root).verified_now and hashed == []
    with (root / "shards" / "train-0" / "input_ids.npy").open("ab") as g:
        g.write(b"\0" * 8)  # another size
    with pytest.raises(ValueError, match="must have the SHA-256 its manifest gives"):
        TeacherCache(root)
    assert TeacherCache(built, verify=True).verified_now  # verify=True: checked whatever the stamp says


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc/self/fd")
def test_teacher_cache_holds_no_descriptor_per_shard(tmp_path: Path) -> None:
    from ddk.data.mapped import MAX_OPEN

    teacher_dir, student_dir = make_pair(tmp_path / "m", "llama")
    tok = AutoTokenizer.from_pretrained(str(student_dir))
    recs = [{"domain": f"d{i:02d}", "text": f"document {j} of domain {i} " * 3} for i in range(20) for j in range(3)]
    packed = pack_domains(recs, tok, seq_len=8, val_samples=1, progress=False)
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir)).eval()
    build_teacher_cache(teacher, packed, tmp_path / "cache", top_k=2, progress=False)
    before = len(os.listdir("/proc/self/fd"))
    cache = TeacherCache(tmp_path / "cache")  # 20 domains x 2 splits x 5 files: 200 files
    ds = cache.train_dataset()
    assert all(ds[i]["teacher_topk_ids"].shape == (8, 2) for i in range(len(ds)))
    assert len(cache.validation_batches(4)) == 20
    assert len(os.listdir("/proc/self/fd")) <= before + MAX_OPEN  # a memmap per file held 200


def test_teacher_cache_deep_or_huge_manifest_and_shard_json_are_errors_naming_them(
    built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ddk._io

    root = _copy(built, tmp_path)
    good = (root / "manifest.json").read_text()
    (root / "manifest.json").write_text("[" * 900 + "]" * 900)
    with pytest.raises(ValueError, match=re.escape(f"{root / 'manifest.json'} must be JSON nested at most")):
        TeacherCache(root)
    (root / "manifest.json").write_text(good)
    monkeypatch.setattr(ddk._io, "JSON_MAX_BYTES", 64)
    monkeypatch.setattr(ddk._io.read_capped, "__kwdefaults__", {"max_bytes": 64, "fn": "ddk"})
    with pytest.raises(
        ValueError, match=re.escape(f"{root / 'manifest.json'} must be a JSON file of at most 64 bytes")
    ):
        TeacherCache(root)


def test_teacher_cache_rows_that_are_no_distribution_are_an_error(built: Path, tmp_path: Path) -> None:
    """Each value in range, every digest forged, but the top-k probabilities and the tail sum to k + 1."""
    root = _copy(built, tmp_path)
    _forge(root, "train-0", "topk_logprobs", lambda a: np.zeros_like(a))
    p = _forge(root, "train-0", "tail", lambda a: np.ones_like(a))
    with pytest.raises(ValueError, match=re.escape(f"{p.parent}/topk_logprobs.npy and tail.npy must hold distributions")
                       + r".*got 4 at index \(0, 0\)"):  # fmt: skip
        TeacherCache(root)


def test_teacher_cache_label_logprob_above_its_topk_entry_is_an_error(built: Path, tmp_path: Path) -> None:
    """label_logprob forged to near 0 (and teacher_ce recomputed from it): the top-k says otherwise."""
    root = _copy(built, tmp_path)
    p = _forge(root, "validation-0", "label_logprob", lambda a: np.where(np.isnan(a), a, -1e-6).astype(a.dtype))
    man = json.loads((root / "manifest.json").read_text())
    man["teacher_ce"]["validation"][0] = 1e-6  # what the forged shard gives
    (root / "manifest.json").write_text(json.dumps(man, indent=1))
    with pytest.raises(ValueError, match=re.escape(f"{p} must agree with the top-k of the same position")):
        TeacherCache(root)
