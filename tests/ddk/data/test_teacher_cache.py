"""Tests of ddk/data/teacher_cache.py: the offline top-k teacher cache (build, contents, kill and
resume, manifest checks) with tiny saved Llama and padded-vocabulary Qwen2 teachers."""

from __future__ import annotations

import json
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
