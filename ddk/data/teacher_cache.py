"""An offline teacher: top-k teacher log-probabilities of packed per-domain data, memory-mapped.

``build_teacher_cache(teacher, packed, out, top_k=K)`` runs the teacher once over the packed
training and validation sequences and writes, per split and domain, one shard folder::

    <out>/manifest.json                      written last: the cache is complete
    <out>/plan.json                          what is being built (checked when a build resumes)
    <out>/shards/<split>-<i>/input_ids.npy   (n, L) int32: the token ids (the cache is self-contained)
    <out>/shards/<split>-<i>/topk_ids.npy    (n, L, k) int32: the teacher's k most likely next tokens
    <out>/shards/<split>-<i>/topk_logprobs.npy  (n, L, k) float16: their log-probabilities at T
    <out>/shards/<split>-<i>/tail.npy        (n, L) float32: the teacher's mass outside them, at T
    <out>/shards/<split>-<i>/label_logprob.npy  (n, L) float32: log p_T(next token) at T = 1, over
                                             all the teacher's rows (its CE, as measured online)
    <out>/shards/<split>-<i>/shard.json      shapes and SHA-256 of the files above (written last)
    <out>/verified.json                      the stamp of the last open that checked every file

Position ``j`` holds the teacher's distribution of token ``j + 1`` (the last position's
``label_logprob`` is NaN: it has no next token), aligned with the student's hidden states as
``ddk.fused_linear_sparse_kd_loss(..., shift=True)`` expects. The teacher's vocabulary is cut to
``vocab_size`` (the student's) before the softmax, as the online loss slices a padded teacher.

A shard is written into a temporary folder (ordinary file writes, no memory map, so a full disk
is an error naming the folder; each file ``fsync``-ed) and renamed, so a killed build loses at
most the shard it was writing; running the build again skips the finished shards (their digests
checked). Under ``torch.distributed`` the shards are dealt round-robin to the ranks; rank 0
writes the manifest.

``TeacherCache(out)`` opens a complete cache, verified (every file's SHA-256 and its values the
first time it is opened after it changed, a stamp for later opens: ``ddk.data.verify``; ``check``
compares it with a run's tokenizer, vocabulary, k and temperature and names any mismatch); it
offers the interface of
``ddk.data.PackedDomains`` (``names``, ``sizes``, ``train_dataset``, ``validation_batches``)
plus the teacher's exact per-domain validation CE (``teacher_ce``), so a run needs no teacher.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddk._io import (
    atomic_write_text,
    disk_full_message,
    file_sha256,
    folder_lock,
    fresh_dir,
    fsync_dir,
    is_disk_full,
    json_fingerprint,
    loads_json,
    open_nofollow,
    read_capped,
    read_json,
    refuse_link,
)
from ddk.data.mapped import Rows, open_npy
from ddk.data.verify import (
    check_teacher_manifest,
    check_teacher_values,
    teacher_files,
    teacher_rebuild_hint,
    verify_cache,
)

__all__ = ["TeacherCache", "TeacherCacheCollator", "TeacherCacheDataset", "build_teacher_cache", "bytes_per_token"]

FORMAT = "ddk.teacher_cache"
VERSION = 1
SPLITS = ("train", "validation")
_FILES = {
    "input_ids": ("<i4", 2),
    "topk_ids": ("<i4", 3),
    "topk_logprobs": ("<f2", 3),
    "tail": ("<f4", 2),
    "label_logprob": ("<f4", 2),
}


def _model_fingerprint(teacher: Any) -> tuple[str, str]:
    """``(name, config hash)`` of a transformers model (name: its ``name_or_path``)."""
    config = getattr(teacher, "config", None)
    name = str(getattr(config, "_name_or_path", "") or type(teacher).__name__)
    to_dict = getattr(config, "to_dict", None)
    blob = to_dict() if callable(to_dict) else {"class": type(teacher).__name__}
    return name, json_fingerprint({k: v for k, v in blob.items() if not k.startswith("_")})


def _teacher_topk(
    teacher: Any, input_ids: torch.Tensor, vocab: int, k: int, temperature: float
) -> dict[str, torch.Tensor]:
    """The cached quantities of one batch ``(b, L)`` (on the teacher's device)."""
    full = teacher(input_ids=input_ids).logits.float()
    logits = full[..., :vocab]  # the divergence's distribution: over the student's vocabulary, as online
    top = torch.log_softmax(logits / temperature, dim=-1).topk(k, dim=-1)
    tail = (1.0 - top.values.double().exp().sum(-1)).clamp(0.0, 1.0).float()
    label = torch.full(input_ids.shape, float("nan"), device=logits.device)
    # the teacher's own CE (all its rows, padding included), as DiscrepancyEstimator measures it online
    nxt = input_ids[:, 1:].unsqueeze(-1)
    label[:, :-1] = full[:, :-1].gather(-1, nxt).squeeze(-1) - torch.logsumexp(full[:, :-1], dim=-1)
    return {
        "input_ids": input_ids.int(),
        "topk_ids": top.indices.int(),
        "topk_logprobs": top.values.clamp_min(-65504.0).half(),  # finite in float16 (p = 0 either way)
        "tail": tail,
        "label_logprob": label,
    }


_RESUMES = "the finished shards are kept and the build resumes."


class _NpyWriter:
    """One ``.npy`` file written front to back with ordinary file I/O (no memory map: a full disk
    is an ``OSError``, not a SIGBUS), never through a link, hashed (SHA-256) as it is written."""

    def __init__(self, path: Path, dtype: str, shape: tuple[int, ...]) -> None:
        self.path, self.dtype, self.shape = path, np.dtype(dtype), shape
        self.sha = hashlib.sha256()
        self.f: Any = open_nofollow(path, "wb", fn="build_teacher_cache")
        head = io.BytesIO()
        descr = np.lib.format.dtype_to_descr(self.dtype)
        np.lib.format.write_array_header_1_0(head, {"descr": descr, "fortran_order": False, "shape": shape})
        self._write(head.getvalue())
        self.rows = 0

    def _write(self, b: bytes) -> None:
        self.f.write(b)
        self.sha.update(b)

    def append(self, rows: np.ndarray) -> None:
        """Write the next ``rows`` (along the first axis) of the array."""
        self._write(np.ascontiguousarray(rows, dtype=self.dtype).tobytes())
        self.rows += int(rows.shape[0])

    def close(self) -> str:
        """Flush, ``fsync`` and close; return the file's SHA-256."""
        if self.rows != (self.shape[0] if self.shape else 0):
            raise RuntimeError(f"build_teacher_cache: {self.path} got {self.rows} rows; its header says {self.shape}.")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return self.sha.hexdigest()

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.f.close()


def _write_shard(
    folder: Path, arrays: Sequence[Rows], teacher: Any, vocab: int, k: int, temperature: float,
    batch_size: int, device: torch.device, autocast: torch.dtype | None, bar: Any,
) -> None:  # fmt: skip
    """One shard: the teacher over ``arrays`` (one domain's split), written atomically into ``folder``."""
    n = int(arrays[0].shape[0]) if len(arrays) else 0
    seq = int(arrays[0].shape[1]) if n else 0
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    fresh_dir(tmp, "build_teacher_cache")  # a link there is an error, never written through
    shapes = {"input_ids": (n, seq), "topk_ids": (n, seq, k), "topk_logprobs": (n, seq, k), "tail": (n, seq),
              "label_logprob": (n, seq)}  # fmt: skip
    files: dict[str, _NpyWriter] = {}
    try:
        for name, (dt, _) in _FILES.items():
            files[name] = _NpyWriter(tmp / f"{name}.npy", dt, shapes[name])
        data = arrays[0]
        with (
            torch.no_grad(),
            torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None),
        ):
            for s in range(0, n, batch_size):
                ids = torch.from_numpy(np.asarray(data[s : s + batch_size], dtype=np.int64)).to(device)
                out = _teacher_topk(teacher, ids, vocab, k, temperature)
                for name, t in out.items():
                    files[name].append(t.cpu().numpy())
                bar.update(int(ids.shape[0]))
        entry: dict[str, Any] = {"sequences": n, "seq_len": seq, "files": {}}
        for name, w in files.items():
            entry["files"][name] = {"shape": list(shapes[name]), "sha256": w.close()}
        atomic_write_text(tmp / "shard.json", json.dumps(entry, indent=1))
        fsync_dir(tmp)
        if refuse_link(folder, "build_teacher_cache").exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException as exc:  # a killed, interrupted or failed shard leaves no temporary folder
        for w in files.values():
            w.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(exc):
            raise ValueError(disk_full_message("build_teacher_cache", "out", tmp, exc, then=_RESUMES)) from None
        raise


def _shard_ok(folder: Path, seq_len: int, k: int, n: int) -> bool:
    try:
        entry = read_json(folder / "shard.json", fn="TeacherCache")
    except (OSError, ValueError):
        return False
    files = entry.get("files", {})
    return (
        entry.get("sequences") == n
        and (n == 0 or entry.get("seq_len") == seq_len)
        and set(files) == set(_FILES)
        and files["topk_ids"]["shape"][2:] == [k]
        and all(file_sha256(folder / f"{name}.npy") == f["sha256"] for name, f in files.items())
    )


def build_teacher_cache(
    teacher: Any,
    packed: Any,
    out: str | os.PathLike[str],
    *,
    top_k: int,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    tokenizer_hash: str = "",
    tokenizer: Any = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    autocast: torch.dtype | None = None,
    progress: bool = True,
) -> TeacherCache:
    """Run ``teacher`` once over ``packed`` (a ``PackedDomains``) and write the cache into ``out``.

    Args:
        teacher: a causal LM (``teacher(input_ids=...).logits``), in eval mode, on ``device``.
        packed: the packed per-domain training and validation sequences.
        out: the cache folder; a finished build there with the same plan is reused, a partial
            one resumed, one with another plan is an error.
        top_k: k >= 1 ids stored per position (at most ``vocab_size``).
        temperature: T of the stored log-probabilities (the divergence's; the CE uses T = 1).
        vocab_size: the student's vocabulary V (the teacher's logits are cut to it); default the
            teacher's ``config.vocab_size``.
        tokenizer_hash: ``ddk.data.tokenizer_hash`` of the shared tokenizer, stored and checked
            (default: the hash of ``tokenizer``).
        tokenizer: the tokenizer the data were packed with; its ``tokenizer_signature`` goes to the
            manifest, so that ``TeacherCache.check(tokenizer=...)`` applies the one tokenizer rule
            (``ddk.data.check_tokenizers``) and names what differs.
        batch_size: sequences per teacher forward.
        device: where the inputs go (default: the teacher's parameters' device).
        autocast: autocast dtype of the teacher's forward (e.g. ``torch.bfloat16`` on CUDA) or None.
        progress: a tqdm bar over sequences (rank 0).

    Returns:
        The opened ``TeacherCache``.
    """
    from ddk.distributed import rank_world

    fn = "build_teacher_cache"
    vocab = int(vocab_size if vocab_size is not None else teacher.config.vocab_size)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= vocab:
        raise ValueError(f"{fn}: top_k must be an int in [1, {vocab}] (the vocabulary); got {top_k!r}.")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{fn}: temperature must be a finite number > 0; got {temperature!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{fn}: batch_size must be an int >= 1; got {batch_size!r}.")
    signature: dict[str, Any] | None = None
    if tokenizer is not None:
        from ddk.data.packing import tokenizer_hash as hash_of
        from ddk.data.tokenizer_check import tokenizer_signature

        tokenizer_hash, signature = tokenizer_hash or hash_of(tokenizer), tokenizer_signature(tokenizer)
    root = Path(out)
    rank, world = rank_world()
    name, config_hash = _model_fingerprint(teacher)
    plan = {
        "format": FORMAT,
        "version": VERSION,
        "teacher": name,
        "teacher_config_hash": config_hash,
        "tokenizer_hash": tokenizer_hash,
        "vocab_size": vocab,
        "top_k": int(top_k),
        "temperature": float(temperature),
        "corpus_key": str(getattr(packed, "key", "")),
        "names": list(packed.names),
        "seq_len": int(packed.seq_len),
    }
    if (root / "manifest.json").is_file():
        cache = TeacherCache(root)  # a finished cache is verified before it is reused
        if {k: cache.manifest.get(k) for k in plan} == plan:
            return cache
    hint = "Wait for that build to finish (or stop it), or pass another out."
    with folder_lock(root, fn, "out", hint=hint) if rank == 0 else contextlib.nullcontext():
        try:
            _build(teacher, packed, root, plan, batch_size, device, autocast, progress, signature)
        except OSError as exc:
            if is_disk_full(exc):  # plan.json, the manifest (a shard names its own folder)
                raise ValueError(disk_full_message(fn, "out", root, exc, then=_RESUMES)) from None
            raise
    try:
        return TeacherCache(root)
    except ValueError as exc:
        raise ValueError(
            f"{fn}: the cache just built in {str(root)!r} must pass its checks; got: {exc} (Values out of range "
            "in a fresh build come from the teacher: check its weights and autocast dtype.)"
        ) from None


def _build(
    teacher: Any, packed: Any, root: Path, plan: dict[str, Any], batch_size: int, device: Any,
    autocast: torch.dtype | None, progress: bool, signature: dict[str, Any] | None = None,
) -> None:  # fmt: skip
    """The shards this rank owns (skipping finished ones), then the manifest (rank 0)."""
    from tqdm.auto import tqdm

    from ddk.distributed import barrier, rank_world

    fn = "build_teacher_cache"
    rank, world = rank_world()
    top_k, vocab = int(plan["top_k"]), int(plan["vocab_size"])
    refuse_link(root / "shards", fn)  # a link there would send every shard outside out
    if rank == 0:
        for stale in (root / "shards").glob(".*.tmp-*"):  # left by a killed build (this build holds the lock)
            shutil.rmtree(stale, ignore_errors=True)
        old = root / "plan.json"
        if old.is_file():
            prev = read_json(old, fn="teacher_cache")
            diff = sorted(k for k in plan if prev.get(k) != plan[k])
            if diff:
                raise ValueError(
                    f"{fn}: out={str(root)!r} holds a cache of another plan (differs in {diff}); pass another "
                    "out or delete it."
                )
        else:
            atomic_write_text(old, json.dumps(plan, indent=2))
    barrier()
    dev = torch.device(device) if device is not None else next(teacher.parameters()).device
    jobs = [(split, i) for split in SPLITS for i in range(len(packed.names))]
    arrays = {"train": packed.train, "validation": packed.validation}
    total = sum(int(arrays[s][i].shape[0]) for s, i in jobs)
    bar = tqdm(total=total, desc="teacher cache", unit="seq", disable=not progress or rank != 0)
    for j, (split, i) in enumerate(jobs):
        arr = arrays[split][i]
        folder = root / "shards" / f"{split}-{i}"
        if j % world != rank or _shard_ok(folder, int(packed.seq_len), top_k, int(arr.shape[0])):
            bar.update(int(arr.shape[0]))
            continue
        _write_shard(folder, [arr], teacher, vocab, top_k, float(plan["temperature"]), batch_size, dev, autocast, bar)
    bar.close()
    barrier()
    if rank == 0:
        _write_manifest(root, plan, packed, jobs, signature)
    barrier()


def _write_manifest(
    root: Path, plan: dict[str, Any], packed: Any, jobs: list[tuple[str, int]], signature: dict[str, Any] | None
) -> None:
    """Per-domain token counts and teacher CE from the shards; the manifest, written last."""
    counts: dict[str, list[int]] = {s: [0] * len(packed.names) for s in SPLITS}
    ce: dict[str, list[float]] = {s: [0.0] * len(packed.names) for s in SPLITS}
    shards = {}
    for split, i in jobs:
        folder = root / "shards" / f"{split}-{i}"
        if not _shard_ok(folder, plan["seq_len"], plan["top_k"], int(getattr(packed, split)[i].shape[0])):
            raise RuntimeError(f"build_teacher_cache: shard {folder} is missing or damaged after the build.")
        label = np.load(folder / "label_logprob.npy", mmap_mode="r")[:, :-1]
        counts[split][i] = int(label.size)
        ce[split][i] = float(-np.asarray(label, dtype=np.float64).sum() / max(label.size, 1))
        shards[f"{split}-{i}"] = read_json(folder / "shard.json", fn="teacher_cache")
    manifest = {
        **plan,
        "tokens": counts,  # predicted positions per split and domain (L - 1 per sequence)
        "teacher_ce": ce,  # per split and domain, nats/token, T = 1
        "bytes_per_token": bytes_per_token(plan["top_k"]),
        "shards": shards,
    }
    if signature is not None:
        manifest["tokenizer"] = signature  # ddk.data.tokenizer_signature: what check(tokenizer=) compares
    atomic_write_text(root / "manifest.json", json.dumps(manifest, indent=1))


def bytes_per_token(k: int) -> int:
    """Bytes stored per position: input id, k ids, k fp16 log-probabilities, tail, label log-probability."""
    return 4 + 4 * k + 2 * k + 4 + 4


class TeacherCacheDataset(torch.utils.data.Dataset):
    """The cached training sequences of every domain, in domain order (global index = offset + row).

    Each item: ``{"input_ids": (L,) int64, "domain_id": int, "teacher_topk_ids": (L, k) int64,
    "teacher_topk_logprobs": (L, k) float32, "teacher_tail": (L,) float32}``.
    """

    def __init__(self, shards: Sequence[Mapping[str, Rows]]) -> None:
        self._shards = list(shards)
        self._sizes = [int(s["input_ids"].shape[0]) for s in self._shards]
        self._offsets = np.cumsum([0] + self._sizes)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"TeacherCacheDataset: index must be in [0, {len(self)}); got {index}.")
        d = int(np.searchsorted(self._offsets, index, side="right") - 1)
        r = index - int(self._offsets[d])
        s = self._shards[d]
        return {
            "input_ids": torch.from_numpy(np.array(s["input_ids"][r], dtype=np.int64)),
            "domain_id": d,
            "teacher_topk_ids": torch.from_numpy(np.array(s["topk_ids"][r], dtype=np.int64)),
            "teacher_topk_logprobs": torch.from_numpy(np.array(s["topk_logprobs"][r], dtype=np.float32)),
            "teacher_tail": torch.from_numpy(np.array(s["tail"][r], dtype=np.float32)),
        }


class TeacherCacheCollator:
    """Stacks ``TeacherCacheDataset`` items: ``input_ids``, ``labels`` (= input ids, unshifted),
    ``domain_ids (B,)`` and the teacher's ``teacher_topk_ids``, ``teacher_topk_logprobs``,
    ``teacher_tail`` (``(B, L, k)`` / ``(B, L)``), the batch ``ddk.causal_lm_kd_loss`` reads once
    ``domain_ids`` is popped into its ``domain_ids=`` keyword."""

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("TeacherCacheCollator: features must hold at least one item; got none.")
        ids = torch.stack([torch.as_tensor(f["input_ids"]) for f in features])
        batch = {
            "input_ids": ids,
            "labels": ids.clone(),
            "domain_ids": torch.tensor([int(f["domain_id"]) for f in features], dtype=torch.long),
        }
        for key in ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail"):
            if all(key in f for f in features):  # (validation items carry no teacher)
                batch[key] = torch.stack([f[key] for f in features])
        return batch


class TeacherCache:
    """A complete teacher cache (see the module docstring), its files mapped on demand
    (``ddk.data.mapped.MappedRows``: no file stays open per shard, so thousands of domains fit
    the descriptor limit).

    Args:
        path: the cache folder (with ``manifest.json``).
        verify: check every file's SHA-256 and values even if the cache's stamp vouches for them.

    Every open verifies: the first open after the cache changed (or with ``verify``) checks every
    file's SHA-256 against the manifest and the values (``ddk.data.verify.check_teacher_values``:
    ids in range, log-probabilities finite and <= 0, tail masses in [0, 1], the manifest's
    ``teacher_ce`` equal to the shards'), then stamps the cache (``verified.json``) so that later
    opens only compare each file's size, times and inode. A mismatch is a ``ValueError`` naming
    the file and how to rebuild it.

    Attributes:
        manifest: the manifest dict (teacher, hashes, vocab_size, top_k, temperature, tokens, teacher_ce).
        names: domain names, in order. ``sizes``: training sequences per domain.
        verified_now: whether this open hashed and checked the files (False: the stamp vouched).
    """

    def __init__(self, path: str | os.PathLike[str], *, verify: bool = False) -> None:
        fn = "TeacherCache"
        self.root = Path(path)
        try:
            raw = read_capped(self.root / "manifest.json", fn=fn)
            man = loads_json(raw, where=str(self.root / "manifest.json"), fn=fn)
        except FileNotFoundError:
            raise ValueError(
                f"{fn}: path must be a finished teacher cache (with manifest.json); got {str(self.root)!r}. "
                "Build one with `ddk teacher-cache` (a killed build resumes when run again)."
            ) from None
        except (OSError, ValueError) as exc:
            raise ValueError(f"{fn}: {self.root / 'manifest.json'} is unreadable ({exc}).") from None
        if not isinstance(man, dict) or man.get("format") != FORMAT or man.get("version") != VERSION:
            raise ValueError(f"{fn}: {self.root} must hold a {FORMAT} v{VERSION} manifest; got another file.")
        check_teacher_manifest(self.root, man, list(_FILES), SPLITS)
        self.manifest = man
        self.names: list[str] = list(man["names"])
        self.seq_len = int(man["seq_len"])
        self.key = f"teacher-cache:{json_fingerprint({k: man[k] for k in ('corpus_key', 'teacher_config_hash', 'top_k', 'temperature')})}"
        self._arrays: dict[str, list[dict[str, Rows]]] = {}
        for split in SPLITS:
            shards: list[dict[str, Rows]] = []
            for i in range(len(self.names)):
                folder = self.root / "shards" / f"{split}-{i}"
                entry = man["shards"][f"{split}-{i}"]
                arrays: dict[str, Rows] = {}
                for name, f in entry["files"].items():
                    p = folder / f"{name}.npy"
                    arrays[name] = open_npy(p)  # mapped on demand: no descriptor per file
                    if list(arrays[name].shape) != f["shape"] or arrays[name].dtype != np.dtype(_FILES[name][0]):
                        raise ValueError(
                            f"{fn}: {p} must hold a {_FILES[name][0]} array of shape {f['shape']} (its manifest's); "
                            f"got {arrays[name].dtype.str} {list(arrays[name].shape)}. {teacher_rebuild_hint(self.root, folder)}"
                        )
                shards.append(arrays)
            self._arrays[split] = shards

        def mismatch(path: Path, expected: str, got: str) -> str:
            return (
                f"{fn}: {path} must have the SHA-256 its manifest gives ({expected}); got {got}: it changed after "
                f"the build. {teacher_rebuild_hint(self.root, path.parent)}"
            )

        self.verified_now = verify_cache(
            self.root,
            raw,
            teacher_files(man),
            check_values=lambda: check_teacher_values(self.root, man, self._arrays),
            mismatch=mismatch,
            force=verify,
        )

    def arrays(self, split: str) -> list[dict[str, Rows]]:
        """Per domain, the arrays (``MappedRows``, read on demand) of ``split`` (``"train"`` or ``"validation"``):
        ``input_ids``, ``topk_ids``, ``topk_logprobs``, ``tail``, ``label_logprob``."""
        if split not in SPLITS:
            raise ValueError(f"TeacherCache.arrays: split must be one of {SPLITS}; got {split!r}.")
        return list(self._arrays[split])

    # --- the PackedDomains interface
    @property
    def sizes(self) -> list[int]:
        """Training sequences per domain."""
        return [int(s["input_ids"].shape[0]) for s in self._arrays["train"]]

    @property
    def train(self) -> list[Rows]:
        return [s["input_ids"] for s in self._arrays["train"]]

    @property
    def validation(self) -> list[Rows]:
        return [s["input_ids"] for s in self._arrays["validation"]]

    def train_dataset(self) -> TeacherCacheDataset:
        """The training sequences with their cached teacher (global index = domain offset + row)."""
        return TeacherCacheDataset(self._arrays["train"])

    def validation_batches(self, batch_size: int) -> dict[str, list[dict[str, torch.Tensor]]]:
        """``name -> [{"input_ids": (b, L) int64}, ...]``, the input of ``ddk.DiscrepancyEstimator``."""
        return {
            name: [
                {"input_ids": torch.from_numpy(np.asarray(arr[s : s + batch_size], dtype=np.int64))}
                for s in range(0, arr.shape[0], batch_size)
            ]
            for name, arr in zip(self.names, self.validation)
        }

    # --- the teacher
    @property
    def teacher_ce(self) -> torch.Tensor:
        """``(D,)`` float64 teacher CE per domain on the validation split (nats/token), exact."""
        return torch.tensor(self.manifest["teacher_ce"]["validation"], dtype=torch.float64)

    @property
    def top_k(self) -> int:
        return int(self.manifest["top_k"])

    @property
    def temperature(self) -> float:
        return float(self.manifest["temperature"])

    def disk_bytes(self) -> int:
        """Bytes of the shard files on disk."""
        return sum(f.stat().st_size for f in (self.root / "shards").rglob("*.npy"))

    def check(
        self,
        *,
        tokenizer: Any = None,
        tokenizer_hash: str | None = None,
        vocab_size: int | None = None,
        temperature: float | None = None,
        seq_len: int | None = None,
        fn: str = "TeacherCache.check",
    ) -> None:
        """Raise ``ValueError`` naming every given property of the run that the cache does not match.

        ``tokenizer`` (the run's) is checked by the one tokenizer rule (``ddk.data.check_tokenizers``)
        against the tokenizer signature the cache stores, naming what differs; a cache built without
        one falls back to comparing ``tokenizer_hash`` (by default that of ``tokenizer``)."""
        from ddk.data.tokenizer_check import check_tokenizers

        man = self.manifest
        stored = man.get("tokenizer")
        if tokenizer is not None and isinstance(stored, dict):
            try:
                check_tokenizers(tokenizer, stored, fn=fn, names=("cache", "run"))
            except ValueError as exc:
                raise ValueError(
                    f"{exc} (The teacher cache {str(self.root)!r}: rebuild it with `ddk teacher-cache` and the run's "
                    "tokenizer.)"
                ) from None
        elif tokenizer is not None and tokenizer_hash is None:
            from ddk.data.packing import tokenizer_hash as hash_of

            tokenizer_hash = hash_of(tokenizer)
        want = {
            "tokenizer_hash": tokenizer_hash if not isinstance(stored, dict) else None,
            "vocab_size": vocab_size,
            "temperature": temperature,
            "seq_len": seq_len,
        }
        bad = [
            f"{k}: the cache has {man[k]!r}, the run {v!r}" for k, v in want.items() if v is not None and man[k] != v
        ]
        if bad:
            flags = {"seq_len": "--seq-len", "temperature": "--temperature"}
            same = [f"{flags[k]} {man[k]}" for k, v in want.items() if k in flags and v is not None and man[k] != v]
            fix = (
                f"Pass {' and '.join(same)} (the cache's) to use it as built, or rebuild it with `ddk teacher-cache`"
                if same and len(same) == len(bad)
                else "Rebuild it with `ddk teacher-cache`"
            )
            raise ValueError(
                f"{fn}: the teacher cache {str(self.root)!r} must match the run; got " + "; ".join(bad) + ". "
                f"{fix} for this tokenizer, vocabulary, temperature and sequence length."
            )

    def __repr__(self) -> str:
        return (
            f"TeacherCache(teacher={self.manifest['teacher']!r}, k={self.top_k}, T={self.temperature}, "
            f"names={self.names}, train={self.sizes}, root={str(self.root)!r})"
        )
