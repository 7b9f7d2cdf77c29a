"""``ddk teacher-cache`` then ``ddk distill --teacher-cache``: a run without the teacher in memory,
against the online teacher (ddk/recipes/teacher_cache.py and the cached path of distill.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from recipe_cases import own_cfg, own_models
from transformers import AutoTokenizer

import ddk.engine.models as models_mod
from ddk.data import TeacherCache
from ddk.recipes.cli import main
from ddk.recipes.distill import distill

SMALL = ["--seq-len", "16", "--val-samples", "4", "--eval-batch-size", "4", "--no-progress", "--device", "cpu"]


def _build(tmp_path: Path, family: str, k: int, out: str = "tcache") -> Path:
    teacher, _, corpus = own_models(tmp_path, family)
    argv = ["teacher-cache", "--teacher", str(teacher), "--data", str(corpus), "--out", str(tmp_path / out)]
    assert main([*argv, "--top-k", str(k), "--data-dir", str(tmp_path / "cache"), *SMALL]) == 0
    return tmp_path / out


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_distill_from_a_full_cache_matches_the_online_teacher(tmp_path: Path, family: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    _, student, _ = own_models(tmp_path, family)
    vocab = len(AutoTokenizer.from_pretrained(str(student)))
    cache_dir = _build(tmp_path, family, k=vocab)  # every token cached: the sparse loss is the full one
    online = distill(own_cfg(tmp_path, family, method="kd", out=str(tmp_path / "online")))
    orig = models_mod.load_pretrained

    def no_teacher(kind, name, *a, **kw):  # type: ignore[no-untyped-def]
        assert kind != "teacher", "the cached run loaded the teacher"
        return orig(kind, name, *a, **kw)

    monkeypatch.setattr(models_mod, "load_pretrained", no_teacher)
    cached = distill(
        own_cfg(
            tmp_path, family, method="kd", teacher="", data=(), teacher_cache=str(cache_dir), out=str(tmp_path / "c")
        )
    )
    assert cached["teacher_params"] == 0 and cached["tokens"] == online["tokens"]
    assert cached["teacher_ce"] == pytest.approx(online["teacher_ce"], rel=1e-5)  # exact CE from the manifest
    assert cached["student_ce"] == pytest.approx(online["student_ce"], rel=2e-3)  # fp16 cached log-probabilities
    m_on = [json.loads(x) for x in (tmp_path / "online" / "metrics.jsonl").read_text().splitlines()]
    m_ca = [json.loads(x) for x in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert m_ca[0]["kd"] == pytest.approx(m_on[0]["kd"], rel=2e-3, abs=1e-4)


def test_ddk_from_a_top_k_cache_runs_and_a_mismatched_cache_is_named(tmp_path: Path) -> None:
    cache_dir = _build(tmp_path, "llama", k=8)
    cache = TeacherCache(cache_dir, verify=True)
    assert cache.top_k == 8 and cache.manifest["bytes_per_token"] == 4 + 8 * 6 + 8
    summary = distill(own_cfg(tmp_path, method="ddk", teacher="", data=(), teacher_cache=str(cache_dir)))
    recs = [json.loads(x) for x in (tmp_path / "runs" / "ddk" / "controller.jsonl").read_text().splitlines()]
    assert recs[0]["teacher_ce"] == cache.teacher_ce.tolist() and len(recs) == 3  # init + 2 updates
    assert summary["final_weights"] != pytest.approx([1 / 3] * 3)
    with pytest.raises(
        ValueError,
        match=r"teacher cache .* must match the run; got temperature: the cache has 1.0, the run 2.0\. Pass "
        r"--temperature 1.0 \(the cache's\) to use it as built, or rebuild it",
    ):
        distill(own_cfg(tmp_path, method="kd", teacher="", data=(), teacher_cache=str(cache_dir), temperature=2.0))
    with pytest.raises(ValueError, match="teacher_cache needs student and replaces teacher and data"):
        own_cfg(tmp_path, method="kd", teacher_cache=str(cache_dir))
    teacher, student, corpus = own_models(tmp_path)
    assert main(["teacher-cache", "--teacher", str(teacher), "--data", str(corpus), *SMALL]) == 2  # no --out


def test_a_damaged_cache_stops_teacher_cache_and_distill_until_rebuilt_as_told(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """A finished cache is verified before ``ddk teacher-cache`` reuses it and before ``ddk distill``
    reads it; the message names the file and how to rebuild, and doing so gives a good cache."""
    import shutil

    import numpy as np

    cache_dir = _build(tmp_path, "llama", k=4)
    f = cache_dir / "shards" / "train-1" / "topk_logprobs.npy"
    np.save(f, -np.load(f))  # sign-flipped log-probabilities: p > 1
    teacher, _, corpus = own_models(tmp_path)
    argv = ["teacher-cache", "--teacher", str(teacher), "--data", str(corpus), "--out", str(cache_dir)]
    argv += ["--top-k", "4", "--data-dir", str(tmp_path / "cache"), *SMALL]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{f} must have the SHA-256 its manifest gives" in err, err
    told = f"delete {f.parent} and {cache_dir / 'manifest.json'} and run `ddk teacher-cache` again"
    assert told in err, err
    with pytest.raises(ValueError, match="must have the SHA-256 its manifest gives"):
        distill(own_cfg(tmp_path, method="kd", teacher="", data=(), teacher_cache=str(cache_dir)))
    shutil.rmtree(f.parent)  # as told
    (cache_dir / "manifest.json").unlink()
    assert main(argv) == 0
    assert not TeacherCache(cache_dir).verified_now  # checked and stamped by the build: not hashed again
    assert float(np.load(f).max()) <= 0.0


@pytest.mark.e2e
def test_a_sigkilled_teacher_cache_build_resumes_to_the_same_cache(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    import numpy as np
    from hf_models import write_jsonl

    teacher, _, _ = own_models(tmp_path)
    corpus = write_jsonl(tmp_path / "big.jsonl", docs_per_domain=200)
    base = ["teacher-cache", "--teacher", str(teacher), "--data", str(corpus), "--top-k", "8", "--eval-batch-size", "1"]
    base += ["--data-dir", str(tmp_path / "cache"), *SMALL]
    assert main([*base, "--out", str(tmp_path / "clean")]) == 0
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[3]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "ddk.recipes.cli", *base, "--out", str(tmp_path / "cut")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "cut" / "shards").glob("*/shard.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list((tmp_path / "cut" / "shards").glob("*/shard.json")))
    assert 1 <= done < 6 and not (tmp_path / "cut" / "manifest.json").exists(), done  # killed mid-build
    assert main([*base, "--out", str(tmp_path / "cut")]) == 0  # the same command resumes
    clean, cut = TeacherCache(tmp_path / "clean"), TeacherCache(tmp_path / "cut", verify=True)
    for split in ("train", "validation"):
        for a, b in zip(clean.arrays(split), cut.arrays(split)):
            assert all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)
    assert not list((tmp_path / "cut" / "shards").glob(".*.tmp-*"))  # the killed shard's folder is gone


def test_a_full_disk_during_the_build_is_an_error_naming_the_folder_and_the_build_resumes(
    tmp_path: Path, monkeypatch, capsys
) -> None:  # type: ignore[no-untyped-def]
    """ENOSPC while a shard is written (shards were written through a memory map: a bare "Bus error")."""
    import errno

    import ddk.data.teacher_cache as tc

    teacher, _, corpus = own_models(tmp_path)
    argv = ["teacher-cache", "--teacher", str(teacher), "--data", str(corpus), "--out", str(tmp_path / "tc")]
    argv += ["--top-k", "4", "--data-dir", str(tmp_path / "cache"), *SMALL]
    orig = tc._NpyWriter.append

    def full(self, rows):  # type: ignore[no-untyped-def]
        if self.path.parent.name.startswith(".train-2."):  # the third shard runs out of space
            raise OSError(errno.ENOSPC, "No space left on device")
        return orig(self, rows)

    monkeypatch.setattr(tc._NpyWriter, "append", full)
    assert main(argv) == 2
    err = capsys.readouterr().err
    shards = tmp_path / "tc" / "shards"
    assert (
        f"ddk teacher-cache: error: build_teacher_cache: out must be on a disk with free space; got no space left "
        f"while writing '{shards}/.train-2.tmp-" in err
    ), err
    assert "the finished shards are kept and the build resumes." in err
    assert sorted(p.name for p in shards.iterdir()) == ["train-0", "train-1"]  # the torn shard's folder removed
    monkeypatch.setattr(tc._NpyWriter, "append", orig)
    assert main(argv) == 0  # the same command resumes
    cache = TeacherCache(tmp_path / "tc", verify=True)
    assert cache.top_k == 4 and len(list(shards.iterdir())) == 6


def test_a_shards_folder_that_is_a_link_is_refused_nothing_written_through_it(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    teacher, _, corpus = own_models(tmp_path)
    victim = tmp_path / "victim" / "shards"
    victim.mkdir(parents=True)
    out = tmp_path / "tc"
    out.mkdir()
    (out / "shards").symlink_to(victim)
    argv = ["teacher-cache", "--teacher", str(teacher), "--data", str(corpus), "--out", str(out)]
    argv += ["--top-k", "4", "--data-dir", str(tmp_path / "cache"), *SMALL]
    assert main(argv) == 2
    assert f"{out / 'shards'} must not be a symbolic link" in capsys.readouterr().err
    assert list(victim.iterdir()) == []
