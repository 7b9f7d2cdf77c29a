"""The cost of verifying a cache at open (``ddk.data.verify``): the first open after the files
changed (every file's SHA-256 and the values pass), a later open (the stamp: a ``stat`` per file),
against the naive floor, reading every byte once.

Caches of the experiment's size (``ddk/recipes/configs/experiment.yaml``: 6,559 sequences of
L=128 tokens, V=4096, 839,552 positions over 6 domains, 64 validation sequences each): the
teacher cache at k in {8, 32, 128} (what ``ddk teacher-cache`` writes, 60.5 to 786 bytes per
position; the values drawn at random in the ranges a teacher gives, so that every check runs its
full pass) and the packed token cache (4 bytes per position), plus a packed cache of 100M tokens.
The files are written once per module; "warm" rounds read them from the page cache, "cold"
rounds first drop them from it (``posix_fadvise(DONTNEED)`` per file), so they are read from the
disk. ``extra_info``: the cache's MiB, the ratio to the naive read of the same round's kind, and
for the first open its two parts measured once (the hashes alone, the values pass alone).

Run: ``.venv/bin/python -m pytest bench/test_bench_verify.py --benchmark-only --benchmark-json bench/results/verify.json``
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import ddk.data.teacher_cache as tc
from ddk._io import file_sha256
from ddk.data.pack_cache import _open_cache
from ddk.data.tokens import _FORMAT
from ddk.data.verify import STAMP, check_teacher_values

L, V, D, VAL = 128, 4096, 6, 64
SEQUENCES = int(os.environ.get("DDK_BENCH_VERIFY_SEQUENCES", "6559"))  # the experiment's: 839,552 positions
BIG = int(os.environ.get("DDK_BENCH_VERIFY_BIG_TOKENS", "100000000")) // L  # sequences of the large packed cache
ROUNDS = int(os.environ.get("DDK_BENCH_ROUNDS", "3"))
KS = [int(k) for k in os.environ.get("DDK_BENCH_VERIFY_K", "8,32,128").split(",")]
_NAIVE: dict[tuple[str, str], float] = {}


def _split(total: int) -> list[tuple[int, int]]:
    """(train, validation) sequences per domain: ``VAL`` validation each, the rest spread evenly."""
    train = total - D * VAL
    return [(train // D + (d < train % D), VAL) for d in range(D)]


def _teacher_cache(root: Path, k: int) -> Path:
    """A finished teacher cache in the format ``build_teacher_cache`` writes (its manifest by the
    build's own ``_write_manifest``), with random values in a teacher's ranges."""
    rng = np.random.default_rng(k)
    plan = {"format": tc.FORMAT, "version": tc.VERSION, "teacher": "bench", "teacher_config_hash": "0",
            "tokenizer_hash": "0", "vocab_size": V, "top_k": k, "temperature": 1.0, "corpus_key": "bench",
            "names": [f"d{d}" for d in range(D)], "seq_len": L}  # fmt: skip
    arrays: dict[str, list[np.ndarray]] = {"train": [], "validation": []}
    for d, sizes in enumerate(_split(SEQUENCES)):
        for split, n in zip(tc.SPLITS, sizes):
            ids = rng.integers(0, V, (n, L), dtype=np.int32)
            arrays[split].append(ids)
            lp = -np.sort(rng.exponential(2.0, (n, L, k)).astype(np.float32), axis=-1) - 0.05
            data = {
                "input_ids": ids,
                "topk_ids": rng.integers(0, V, (n, L, k), dtype=np.int32),
                "topk_logprobs": lp.astype(np.float16),
                "tail": np.clip(1 - np.exp(lp).sum(-1), 0, 1).astype(np.float32),
                "label_logprob": -rng.exponential(3.0, (n, L)).astype(np.float32),
            }
            data["label_logprob"][:, -1] = np.nan
            folder = root / "shards" / f"{split}-{d}"
            folder.mkdir(parents=True)
            entry: dict[str, Any] = {"sequences": n, "seq_len": L, "files": {}}
            for name, a in data.items():
                np.save(folder / f"{name}.npy", a)
                entry["files"][name] = {"shape": list(a.shape), "sha256": file_sha256(folder / f"{name}.npy")}
            (folder / "shard.json").write_text(json.dumps(entry))
    packed = SimpleNamespace(names=plan["names"], **arrays)
    jobs = [(split, i) for split in tc.SPLITS for i in range(D)]
    tc._write_manifest(root, plan, packed, jobs)
    return root


def _packed_cache(root: Path, sequences: int) -> Path:
    """A finished packed token cache (``ddk.data.pack_cache``'s layout) of random ids."""
    rng = np.random.default_rng(sequences)
    root.mkdir(parents=True)
    entries: dict[str, list[dict[str, Any]]] = {"train": [], "validation": []}
    for d, sizes in enumerate(_split(sequences)):
        for side, n in zip(("train", "validation"), sizes):
            name = f"{side}_{d}.bin"
            rng.integers(0, V, (n, L), dtype=np.int32).astype("<i4").tofile(root / name)
            entries[side].append({"file": name, "shape": [n, L], "sha256": file_sha256(root / name)})
    meta = {"format": _FORMAT, "version": 1, "key": root.name, "names": [f"d{d}" for d in range(D)], "seq_len": L,
            "eos_token_id": 0, "capped": {}, **entries}  # fmt: skip
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".npy", ".bin"))


def _drop(root: Path) -> None:
    """Drop the cache's files from the page cache (the next read comes from the disk)."""
    for p in _files(root):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _read_all(root: Path) -> None:
    for p in _files(root):
        with p.open("rb") as f:
            while f.read(1 << 24):
                pass


CACHES = [f"teacher k={k}" for k in KS] + ["packed", "packed 100M tokens"]


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("verify")
    out: dict[str, Any] = {}
    for k in KS:
        root = _teacher_cache(base / f"teacher-{k}", k)
        out[f"teacher k={k}"] = (root, lambda r=root: tc.TeacherCache(r))
    for name, n in (("packed", SEQUENCES), ("packed 100M tokens", BIG)):
        root = _packed_cache(base / f"packed-{n}", n)
        out[name] = (root, lambda r=root: _open_cache(r, key=r.name, verify=False, vocab=V))
    return out


def _parts(name: str, root: Path) -> dict[str, float]:
    """The first open's two parts, once each, warm: every file's SHA-256, the values pass."""
    t = time.perf_counter()
    for p in _files(root):
        file_sha256(p)
    hashes = time.perf_counter() - t
    if name.startswith("teacher"):
        cache = tc.TeacherCache(root)
        t = time.perf_counter()
        check_teacher_values(root, cache.manifest, {s: cache.arrays(s) for s in tc.SPLITS})
    else:
        from ddk.data.verify import check_token_values

        packed, _ = _open_cache(root, key=root.name, verify=False, vocab=V)
        t = time.perf_counter()
        check_token_values(root, {"train": packed.train, "validation": packed.validation}, V, 0)
    return {"hashes_s": round(hashes, 4), "values_s": round(time.perf_counter() - t, 4)}


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize(
    "case", ["read every byte (warm)", "first open (warm)", "later open", "read every byte (cold)", "first open (cold)"]
)
def test_bench_verify_cache_open(benchmark: Any, caches: dict[str, Any], cache: str, case: str) -> None:
    root, open_ = caches[cache]
    open_()  # stamped
    cold = case.endswith("(cold)")

    def setup() -> None:
        if case.startswith("first open"):
            (root / STAMP).unlink()
        if cold:
            _drop(root)

    run = _read_all if case.startswith("read") else (lambda _r: open_())
    benchmark.group = f"verify at open: {cache}"
    benchmark.pedantic(run, args=(root,), setup=setup, rounds=ROUNDS, iterations=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info["MiB"] = round(sum(p.stat().st_size for p in _files(root)) / 2**20, 1)
    kind = "cold" if cold else "warm"
    if case.startswith("read"):
        _NAIVE[(cache, kind)] = median
    elif (cache, kind) in _NAIVE:
        benchmark.extra_info["x_read"] = round(median / _NAIVE[(cache, kind)], 3)
    if case == "first open (warm)":
        benchmark.extra_info.update(_parts(cache, root))
