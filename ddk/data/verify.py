"""Verify-on-read of the on-disk caches (no public names): every file's SHA-256 and the values'
checks the first time a process opens a cache after it changed, and a stamp that lets later opens
skip them.

The stamp, ``verified.json`` next to the cache's manifest (written atomically), records the
manifest's SHA-256, the version of the checks (``CHECKS``) and, per file, its SHA-256 with its
size, modification time, change time and inode as they were when it was hashed and its values
checked. An open whose manifest has that digest and whose files all still have those stats trusts
the earlier check (a ``stat`` per file); any difference (a rebuilt, edited, truncated, touched or
copied file, an edited manifest, a ddk with more checks) runs the whole check again. A cache whose
folder cannot be written is checked on every open. The stamp guards against accidents (bit rot, a
stray edit, a half copy), not against someone who forges the stats of a file they changed.

Used by ``ddk.data.pack_cache`` (the packed token cache) and ``ddk.data.teacher_cache``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ddk._io import atomic_write_text, file_sha256, loads_json

__all__: list[str] = []

STAMP = "verified.json"
CHECKS = 1  # bump when the checks at open change: every older stamp is then checked again
_STAMP_FORMAT = "ddk.verified"
_MAX_STAMP_BYTES = 1 << 24  # a larger stamp is not one of ours: ignored (the cache is checked)


def _state(path: Path) -> list[int]:
    """What a change to ``path`` moves: ``[size, mtime_ns, ctime_ns, inode]``."""
    st = os.stat(path)
    return [int(st.st_size), int(st.st_mtime_ns), int(st.st_ctime_ns), int(st.st_ino)]


def _read_stamp(path: Path) -> dict[str, Any] | None:
    try:
        if path.stat().st_size > _MAX_STAMP_BYTES:
            return None
        stamp = loads_json(path.read_text(encoding="utf-8"), where=str(path))
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) and stamp.get("format") == _STAMP_FORMAT else None


def _stamp_holds(stamp: dict[str, Any] | None, root: Path, manifest_sha: str, files: Mapping[str, str]) -> bool:
    """Whether ``stamp`` vouches for ``files`` (relative path -> SHA-256) under this manifest."""
    if stamp is None or stamp.get("checks") != CHECKS or stamp.get("manifest_sha256") != manifest_sha:
        return False
    done = stamp.get("files")
    if not isinstance(done, dict) or set(done) != set(files):
        return False
    try:
        return all(
            isinstance(done[rel], dict)
            and done[rel].get("sha256") == sha
            and done[rel].get("state") == _state(root / rel)
            for rel, sha in files.items()
        )
    except OSError:
        return False


def verify_cache(
    root: Path,
    manifest: bytes,
    files: Mapping[str, str],
    *,
    check_values: Callable[[], None],
    mismatch: Callable[[Path, str, str], str],
    force: bool = False,
) -> bool:
    """Check the cache at ``root`` unless its stamp vouches for it; stamp it when checked.

    Args:
        root: the cache folder (the stamp is ``root / STAMP``).
        manifest: the bytes of the cache's manifest, as read (its digest keys the stamp).
        files: every data file of the cache, ``path relative to root -> SHA-256`` from the manifest.
        check_values: raises ``ValueError`` naming the first bad value (run after the hashes).
        mismatch: ``(path, expected, got) -> message`` of the ``ValueError`` for a wrong digest.
        force: check even when the stamp vouches for the files.

    Returns:
        True when the files were hashed and checked, False when the stamp was trusted.
    """
    manifest_sha = hashlib.sha256(manifest).hexdigest()
    stamp_path = root / STAMP
    if not force and _stamp_holds(_read_stamp(stamp_path), root, manifest_sha, files):
        return False
    before: dict[str, list[int]] = {}
    for rel, sha in files.items():
        path = root / rel
        before[rel] = _state(path)
        got = file_sha256(path)
        if got != sha:
            raise ValueError(mismatch(path, sha, got))
    check_values()
    try:
        if any(_state(root / rel) != state for rel, state in before.items()):
            return True  # changed while it was checked: no stamp (the next open checks again)
        stamp = {
            "format": _STAMP_FORMAT,
            "checks": CHECKS,
            "manifest_sha256": manifest_sha,
            "files": {rel: {"sha256": sha, "state": before[rel]} for rel, sha in files.items()},
        }
        atomic_write_text(stamp_path, json.dumps(stamp, indent=0) + "\n")
    except OSError:
        pass  # a read-only cache: checked on every open
    return True


def first_out_of_range(a: np.ndarray, vocab: int) -> tuple[tuple[int, ...], int] | None:
    """``(index, value)`` of the first id of the int32 array ``a`` outside ``[0, vocab)``, or None
    (one pass: negative ids are large as uint32)."""
    if a.size == 0 or int(a.view(np.uint32).max()) < vocab:
        return None
    bad = (a < 0) | (a >= vocab)
    at = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), a.shape))
    return at, int(a[at])


def first_outside(a: np.ndarray, low: float, high: float) -> tuple[tuple[int, ...], float] | None:
    """``(index, value)`` of the first value of the float array ``a`` that is not in ``[low, high]``
    (NaN and infinities are outside finite bounds), or None."""
    if a.size == 0:
        return None
    if a.dtype == np.float16:
        # float16 reductions are slow in numpy; for [-65504, 0] its bits (as int16) are -0.0
        # .. -65504 (-32768..-1025) or +0.0 (0); -inf, NaN and positives are elsewhere.
        if low == float(np.finfo(np.float16).min) and high == 0.0:
            bits = a.view(np.int16)
            if int(bits.max()) <= -1025:
                return None
            ok = (bits <= -1025) | (bits == 0)
            if ok.all():
                return None
            at = tuple(int(i) for i in np.unravel_index(int(np.argmin(ok)), a.shape))
            return at, float(a[at])
        a = a.astype(np.float32)
    lo, hi = a.min(), a.max()
    if lo >= low and hi <= high:  # False for NaN
        return None
    ok = (a >= low) & (a <= high)
    at = tuple(int(i) for i in np.unravel_index(int(np.argmin(ok)), a.shape))
    return at, float(a[at])


# ---------------------------------------------------------------------------- the values
_CHUNK_BYTES = 1 << 26  # rows per step of a values pass: bounds its temporaries
_TOKEN_CHUNK_BYTES = 1 << 23  # bytes read per step of the token ids' pass (one reduction each)
_F16_MIN = float(np.finfo(np.float16).min)
_F32_MIN = float(np.finfo(np.float32).min)


def _whole(a: Any) -> np.ndarray:
    """An array over all of ``a`` without copying it: a ``MappedRows``' fresh map, or ``a`` itself."""
    memmap = getattr(a, "memmap", None)
    return memmap() if callable(memmap) else np.asarray(a)


def _where(at: tuple[int, ...]) -> str:
    return "at index (" + ", ".join(str(i) for i in at) + ")"


def teacher_rebuild_hint(root: Path, folder: Path | None = None) -> str:
    """How to rebuild a teacher cache: its manifest (and the damaged shard) recomputed by the build."""
    what = f"{folder} and {root / 'manifest.json'}" if folder is not None else str(root / "manifest.json")
    return (
        f"To rebuild it, delete {what} and run `ddk teacher-cache` again with the same arguments "
        f"(--out {root}): it recomputes what is missing and keeps the other shards."
    )


def teacher_files(man: Mapping[str, Any]) -> dict[str, str]:
    """``shards/<split>-<i>/<name>.npy -> SHA-256`` of every data file of a teacher cache's manifest."""
    return {
        f"shards/{shard}/{name}.npy": str(f["sha256"])
        for shard, entry in man["shards"].items()
        for name, f in entry["files"].items()
    }


def check_teacher_values(root: Path, man: Mapping[str, Any], arrays: Mapping[str, Any]) -> None:
    """One pass over every shard of a teacher cache: ids in ``[0, vocab_size)``, log-probabilities
    finite and <= 0, tail masses in ``[0, 1]``, and the manifest's ``tokens`` and ``teacher_ce``
    equal to what the shards' ``label_logprob`` give (the build computes them from it).

    Args:
        root: the cache folder.
        man: its manifest.
        arrays: ``split -> [per domain {name: (n, L) or (n, L, k) array}]`` as opened.

    Raises:
        ValueError: the first bad value or count, naming its file and how to rebuild.
    """
    fn = "TeacherCache"
    vocab, k, L = int(man["vocab_size"]), int(man["top_k"]), int(man["seq_len"])
    temperature = float(man["temperature"])
    for split, shards in arrays.items():
        for i, shard in enumerate(shards):
            folder = root / "shards" / f"{split}-{i}"
            hint = teacher_rebuild_hint(root, folder)
            n = int(shard["input_ids"].shape[0])
            want = {"input_ids": (n, L), "topk_ids": (n, L, k), "topk_logprobs": (n, L, k), "tail": (n, L),
                    "label_logprob": (n, L)}  # fmt: skip
            for name, shape in want.items():
                if tuple(shard[name].shape) != shape:
                    raise ValueError(
                        f"{fn}: {folder / name}.npy must have shape {shape} (seq_len={L}, top_k={k} and the "
                        f"{n} sequences of its input_ids); got {tuple(shard[name].shape)}. {hint}"
                    )
            whole = {name: _whole(shard[name]) for name in want}
            rows = max(1, _CHUNK_BYTES // max(1, L * (6 * k + 12)))
            total, count = 0.0, 0
            for s in range(0, n, rows):
                part = {name: a[s : s + rows] for name, a in whole.items()}
                for name in ("input_ids", "topk_ids"):
                    bad_id = first_out_of_range(part[name], vocab)
                    if bad_id is not None:
                        at = (bad_id[0][0] + s, *bad_id[0][1:])
                        raise ValueError(
                            f"{fn}: {folder / name}.npy must hold token ids in [0, {vocab}) (the manifest's "
                            f"vocab_size); got {bad_id[1]} {_where(at)}. {hint}"
                        )
                checks = (
                    ("topk_logprobs", part["topk_logprobs"], _F16_MIN, 0.0, "log-probabilities <= 0 and finite"),
                    ("tail", part["tail"], 0.0, 1.0, "tail masses in [0, 1]"),
                    ("label_logprob", part["label_logprob"][:, :-1], _F32_MIN, 0.0,
                     "log-probabilities <= 0 and finite (NaN only in the last column)"),
                )  # fmt: skip
                for name, a, low, high, what in checks:
                    bad = first_outside(a, low, high)
                    if bad is not None:
                        at = (bad[0][0] + s, *bad[0][1:])
                        raise ValueError(
                            f"{fn}: {folder / name}.npy must hold {what}; got {bad[1]} {_where(at)}. {hint}"
                        )
                _check_distributions(folder, part, s, temperature, hint)
                label = part["label_logprob"][:, :-1]
                total += float(label.sum(dtype=np.float64))
                count += int(label.size)
            _check_teacher_ce(root, man, split, i, folder, total, count)


_MASS_TOL = 1e-2  # float16 log-probabilities: the top-k mass is exact to about 2e-3 (see _check_distributions)
_LABEL_TOL = 2e-2  # |float16 - float32| of a log-probability >= -65504 near the label's, with room


def _check_distributions(folder: Path, part: Mapping[str, Any], start: int, temperature: float, hint: str) -> None:
    """Each position holds a distribution: ``sum(exp(topk_logprobs)) + tail`` is 1 (within
    ``_MASS_TOL``: the float16 rounding of the log-probabilities moves the sum by at most about
    ``2^-11 * entropy``). At ``temperature == 1``, where ``label_logprob`` and the top-k are the
    same distribution, the label's log-probability equals its top-k entry when the label is among
    the top-k ids, and is at most ``log(tail)`` when it is not."""
    fn = "TeacherCache"
    lp = part["topk_logprobs"].astype(np.float32)
    mass = np.exp(lp).sum(axis=-1, dtype=np.float32) + part["tail"].astype(np.float32)
    off = np.abs(mass - 1.0) > _MASS_TOL
    if off.any():
        at = np.argwhere(off)[0]
        raise ValueError(
            f"{fn}: {folder}/topk_logprobs.npy and tail.npy must hold distributions (sum(exp(topk_logprobs)) + tail "
            f"= 1 at every position); got {float(mass[tuple(at)]):.6g} {_where((int(at[0]) + start, *at[1:]))}. {hint}"
        )
    if temperature != 1.0:
        return
    nxt = part["input_ids"][:, 1:, None]
    hit = part["topk_ids"][:, :-1, :] == nxt  # (n, L - 1, k): the label among the top k
    label = part["label_logprob"][:, :-1].astype(np.float32)
    in_topk = hit.any(axis=-1)
    listed = np.where(hit, lp[:, :-1, :], 0.0).sum(axis=-1)
    bad = in_topk & (label > listed + _LABEL_TOL + 1e-3 * np.abs(listed))
    with np.errstate(divide="ignore"):
        ceiling = np.log(part["tail"][:, :-1].astype(np.float32))
    bad |= ~in_topk & (label > ceiling + _LABEL_TOL)
    if bad.any():
        at = np.argwhere(bad)[0]
        raise ValueError(
            f"{fn}: {folder}/label_logprob.npy must agree with the top-k of the same position (T = 1: at most the "
            f"label's entry when it is among the top k, at most log(tail) when not); got {float(label[tuple(at)]):.6g} "
            f"{_where((int(at[0]) + start, *at[1:]))}. {hint}"
        )


def _check_teacher_ce(
    root: Path, man: Mapping[str, Any], split: str, i: int, folder: Path, total: float, count: int
) -> None:
    """The manifest's ``tokens`` and ``teacher_ce`` of one shard against its label log-probabilities."""
    fn = "TeacherCache"
    manifest = root / "manifest.json"
    hint = teacher_rebuild_hint(root)
    tokens = man["tokens"][split][i]
    if tokens != count:
        raise ValueError(
            f"{fn}: {manifest} tokens[{split!r}][{i}] must equal the positions of {folder} ({count}); got {tokens!r}. {hint}"
        )
    ce = -total / max(count, 1)
    got = man["teacher_ce"][split][i]
    if not isinstance(got, (int, float)) or isinstance(got, bool) or not abs(float(got) - ce) <= 1e-9 * abs(ce) + 1e-12:
        raise ValueError(
            f"{fn}: {manifest} teacher_ce[{split!r}][{i}] must equal the teacher's CE that {folder} gives "
            f"({ce!r} nats/token); got {got!r}. {hint}"
        )


def _row_chunks(a: Any, rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(first row, rows)`` of the 2-D array ``a``, ``rows`` at a time. A file-backed array is read
    chunk by chunk (no map: the pages of a pass over a large file would all count as the process's
    resident memory until the map went away); an array in memory is sliced."""
    n = int(a.shape[0])
    path = getattr(a, "path", None)
    if path is None:
        whole = _whole(a)
        for s in range(0, n, rows):
            yield s, whole[s : s + rows]
        return
    width, dtype = int(a.shape[1]), np.dtype(a.dtype)
    with open(path, "rb") as f:
        f.seek(int(getattr(a, "offset", 0)))
        for s in range(0, n, rows):
            count = min(rows, n - s) * width
            part = np.frombuffer(f.read(count * dtype.itemsize), dtype=dtype)
            if part.size != count:
                raise ValueError(f"pack_domains: cache file {path} must hold {n} x {width} values; got fewer.")
            yield s, part.reshape(-1, width)


def check_token_values(root: Path, arrays: Mapping[str, Any], vocab: int, eos_token_id: int) -> None:
    """Every token id of a packed cache (``side -> [per domain (n, L) int32]``) in ``[0, vocab)``.

    Raises:
        ValueError: the first id out of range, naming its file.
    """
    fn = "pack_domains"
    hint = f"The cache is damaged: delete {root} to rebuild it."
    if not 0 <= eos_token_id < vocab:
        raise ValueError(
            f"{fn}: cache folder {root} must have an eos_token_id in [0, {vocab}) (the tokenizer's vocabulary); "
            f"got {eos_token_id}. {hint}"
        )
    for side, per_domain in arrays.items():
        for a in per_domain:
            if int(np.prod(a.shape)) == 0:
                continue
            rows = max(1, _TOKEN_CHUNK_BYTES // (4 * int(a.shape[1])))
            for s, part in _row_chunks(a, rows):
                bad = first_out_of_range(part, vocab)
                if bad is not None:
                    path = getattr(a, "path", None) or getattr(a, "filename", None) or f"{side} array"
                    at = (bad[0][0] + s, *bad[0][1:])
                    raise ValueError(
                        f"{fn}: cache file {path} must hold token ids in [0, {vocab}) (the tokenizer's "
                        f"vocabulary); got {bad[1]} {_where(at)}. {hint}"
                    )


def check_teacher_manifest(root: Path, man: Mapping[str, Any], files: Sequence[str], splits: Sequence[str]) -> None:
    """The structure of a teacher cache's manifest (names, sizes, one entry per shard and file, the
    per-domain ``tokens`` and ``teacher_ce``), so that a damaged one is named, not a ``KeyError``.

    Raises:
        ValueError: naming the first missing or malformed entry and how to rebuild.
    """

    def count(key: str, low: int) -> int:
        v = man.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise bad(f"{key} an int >= {low}", v)
        return v

    def bad(what: str, got: Any) -> ValueError:
        return ValueError(
            f"TeacherCache: {root / 'manifest.json'} must hold {what}; got {got!r:.80}. {teacher_rebuild_hint(root)}"
        )

    names = man.get("names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise bad("names, a non-empty list of domain names", names)
    count("seq_len", 2)
    vocab = count("vocab_size", 1)
    if count("top_k", 1) > vocab:
        raise bad(f"top_k <= vocab_size={vocab}", man.get("top_k"))
    shards = man.get("shards")
    want = {f"{s}-{i}" for s in splits for i in range(len(names))}
    if not isinstance(shards, dict) or set(shards) != want:
        raise bad(
            f"shards, one entry per split and domain {sorted(want)}",
            sorted(shards) if isinstance(shards, dict) else shards,
        )
    for key, entry in shards.items():
        entries = entry.get("files") if isinstance(entry, dict) else None
        if not isinstance(entries, dict) or set(entries) != set(files):
            raise bad(f"shards[{key!r}]['files'] with the files {sorted(files)}", entries)
        for name, f in entries.items():
            ok = (
                isinstance(f, dict)
                and isinstance(f.get("shape"), list)
                and isinstance(f.get("sha256"), str)
                and len(f["sha256"]) == 64
            )
            if not ok:
                raise bad(f"shards[{key!r}]['files'][{name!r}], a shape and a SHA-256", f)
    for key in ("tokens", "teacher_ce"):
        per = man.get(key)
        if not isinstance(per, dict) or any(
            not isinstance(per.get(s), list) or len(per[s]) != len(names) for s in splits
        ):
            raise bad(f"{key}, per split {list(splits)} a list of one value per domain", per)
