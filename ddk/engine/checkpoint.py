"""Checkpoints and saved state of the engine (``ddk distill``'s run folders; ``DDKTrainer``'s RNG and controller state): tensors in safetensors, state in JSON, digests last.

A checkpoint is a folder ``checkpoint-<step>/``::

    tensors.safetensors   every tensor of the state (student, optimizer, RNG states), by name
    state.json            everything else (config, step, LR schedule, controller, RNG numbers);
                          a tensor appears as {"__ddk__": "tensor", "name": ...}
    manifest.json         format, step, and the size and SHA-256 of the two files; written last

Under torch.distributed (``ddk.engine.sharded``) the student's and the optimizer's tensors are
not in ``tensors.safetensors`` but in ``shards/``, one safetensors file per rank written by that
rank through torch.distributed.checkpoint; the manifest (version 2, ``"layout": "sharded"``) lists
every shard file with its size and SHA-256 too, and a ``shards/`` file it does not list is an error.

It is written into a hidden ``.checkpoint-<step>.tmp-<pid>`` folder (each file ``fsync``-ed, the
manifest last), renamed into place and the run folder ``fsync``-ed, so a checkpoint folder is
complete or absent. Loading checks the manifest and every digest before reading a byte of state,
and reads nothing by unpickling (``safetensors`` and ``json``): a crafted checkpoint cannot run
code, a flipped bit or a torn file is detected, and :func:`newest_valid_checkpoint` then falls
back to the previous valid checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddk._io import (
    FILE_MODE,
    JSONLimitError,
    atomic_write_text,
    file_sha256,
    fresh_dir,
    fsync_dir,
    fsync_file,
    loads_json,
    open_nofollow,
    read_json,
)

__all__ = [
    "CheckpointError",
    "checkpoints",
    "decode_state",
    "encode_state",
    "legacy_checkpoints",
    "load_checkpoint",
    "newest_valid_checkpoint",
    "prune_checkpoints",
    "remove_stale_temporaries",
    "controller_state",
    "is_sharded",
    "load_rng_file",
    "publish_checkpoint",
    "rng_state",
    "save_checkpoint",
    "save_rng_file",
    "set_rng_state",
    "truncate_jsonl",
    "write_checkpoint_files",
]

FORMAT = "ddk-distill-checkpoint"
VERSION = 1
SHARDED_VERSION = 2  # the student's and the optimizer's tensors in shards/, one file per rank
SHARDS = "shards"
#: the ``state.json`` key of a sharded checkpoint that names its sharded tensors (``ddk.engine.sharded``)
SHARDED = "sharded"
_SHARD_RE = re.compile(r"^shards/shard-\d{5}-model-\d{5}-of-\d{5}\.safetensors$")
MANIFEST = "manifest.json"
STATE = "state.json"
TENSORS = "tensors.safetensors"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
_LEGACY_RE = re.compile(r"^checkpoint-(\d+)\.pt$")
_MARK = "__ddk__"
#: the largest ``state.json`` read back (its controller state grows with domains x weight updates:
#: 2,000 domains updated 1,000 times take about 120 MB); a larger one is an error naming it
MAX_STATE_BYTES = 256 << 20
MAX_MANIFEST_BYTES = 1 << 20
STATE_MAX_DEPTH = 32  # a state nests about 10 deep (optimizer -> state -> parameter -> tensor)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, torn, corrupted or foreign); the message says why."""


# ---------------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    """The torch (CPU and CUDA), NumPy and Python RNG states, as tensors and plain values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], fn: str = "distill") -> None:
    """Inverse of :func:`rng_state`; a malformed state is a ``CheckpointError``."""
    try:
        torch.set_rng_state(state["torch"])
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        p = state["python"]
        random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise CheckpointError(
            f"{fn}: the checkpoint's rng state must be one written by rng_state(); got an "
            f"unusable one ({type(exc).__name__}: {exc})."
        ) from None


def save_rng_file(path: str | os.PathLike[str]) -> Path:
    """Write :func:`rng_state` to ``path`` (safetensors; the plain values as JSON metadata), through
    a temporary file, ``fsync``-ed. The same state format as a checkpoint's ``rng`` entry."""
    from safetensors.torch import save_file

    tree, tensors = encode_state(rng_state())
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"ddk": json.dumps(tree)})
    os.chmod(tmp, FILE_MODE)
    fsync_file(tmp)
    os.replace(tmp, p)
    return p


def load_rng_file(path: str | os.PathLike[str], fn: str = "load_rng_file") -> None:
    """Restore the generator states written by :func:`save_rng_file`; a bad file is a ``CheckpointError``."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            tree = loads_json((f.metadata() or {})["ddk"], max_depth=STATE_MAX_DEPTH, where=f"{path} metadata", fn=fn)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        state = decode_state(tree, tensors)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(
            f"{fn}: {path} must be a random-number-generator state written by save_rng_file; got an unreadable "
            f"file ({type(exc).__name__}: {exc})."
        ) from None
    set_rng_state(state, fn)


def controller_state(controller: Any, device: torch.device, at_batch: int | None = None) -> dict[str, Any]:
    """``controller.state_dict(at_batch)`` with the online estimator's per-domain sums summed over
    every rank (a collective under torch.distributed: every rank calls it), so a resumed
    ``ddk-online`` run continues its interval with every rank's batches."""
    from ddk.distributed import all_reduce_sum_, collective_device, rank_world

    state = controller.state_dict() if at_batch is None else controller.state_dict(at_batch=at_batch)
    if rank_world()[1] > 1 and controller.online:
        acc = state["estimator"]["online"] or [[0.0] * 4 for _ in controller.sampler.domain_names]
        acc = all_reduce_sum_(torch.tensor(acc, dtype=torch.float64, device=collective_device(device)))
        state["estimator"]["online"] = acc.cpu().tolist()
    return state


# ---------------------------------------------------------------------------- JSON + tensors
def encode_state(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(JSON-able tree, tensors by name)`` of a state made of dicts, lists, tuples, numbers,
    strings, None and tensors. Tensors sharing memory (tied weights) are stored once.

    Raises:
        TypeError: an object of another type (its path is named).
    """
    tensors: dict[str, torch.Tensor] = {}
    views: dict[tuple[Any, ...], str] = {}
    storages: set[int] = set()

    def tensor(t: torch.Tensor) -> dict[str, Any]:
        t = t.detach().cpu()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in views:
            return {_MARK: "tensor", "name": views[key]}
        name = f"t{len(tensors)}"
        ptr = t.untyped_storage().data_ptr()
        if not t.numel() or ptr in storages or not t.is_contiguous():
            t = t.contiguous().clone()  # an empty tensor, another view of a stored one, or strided
        else:
            storages.add(ptr)
            views[key] = name
        tensors[name] = t
        return {_MARK: "tensor", "name": name}

    def enc(x: Any, where: str) -> Any:
        if isinstance(x, torch.Tensor):
            return tensor(x)
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, (np.integer, np.floating, np.bool_)):
            return x.item()
        if isinstance(x, tuple):
            return {_MARK: "tuple", "items": [enc(v, f"{where}[{i}]") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{where}[{i}]") for i, v in enumerate(x)]
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x) and _MARK not in x:
                return {k: enc(v, f"{where}.{k}") for k, v in x.items()}
            return {_MARK: "dict", "items": [[enc(k, f"{where} key"), enc(v, f"{where}[{k!r}]")] for k, v in x.items()]}
        raise TypeError(
            f"encode_state: state must hold only dicts, lists, numbers, strings and tensors; got "
            f"{type(x).__name__} at {where}."
        )

    return enc(obj, "state"), tensors


def decode_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode_state`; an unknown marker or tensor name is a ``CheckpointError``."""

    def dec(x: Any) -> Any:
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            return x
        kind = x.get(_MARK)
        if kind is None:
            return {k: dec(v) for k, v in x.items()}
        if kind == "tensor" and x.get("name") in tensors:
            return tensors[x["name"]]
        if kind == "tuple" and isinstance(x.get("items"), list):
            return tuple(dec(v) for v in x["items"])
        if (
            kind == "dict"
            and isinstance(x.get("items"), list)
            and all(isinstance(kv, list) and len(kv) == 2 for kv in x["items"])
        ):
            return {dec(k): dec(v) for k, v in x["items"]}
        raise CheckpointError(
            f"decode_state: {STATE} must reference only stored tensors and known markers; got {str(x)[:120]}."
        )

    return dec(tree)


# ---------------------------------------------------------------------------- folders
def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of the run folder's ``checkpoint-<step>/`` folders, oldest first."""
    found = []
    if out.is_dir():
        for p in out.iterdir():
            m = _CKPT_RE.match(p.name)
            if m is not None and p.is_dir():
                found.append((int(m.group(1)), p))
    return sorted(found)


def legacy_checkpoints(out: Path) -> list[Path]:
    """``checkpoint-<step>.pt`` files of an older ddk (pickle-based; never loaded)."""
    return sorted(p for p in out.iterdir() if _LEGACY_RE.match(p.name)) if out.is_dir() else []


def _remove_tree(path: Path) -> None:
    """Rename ``path`` to a hidden name first, so a half-deleted folder never looks like a checkpoint."""
    if not path.exists():
        return
    trash = path.with_name(f".{path.name}.removing-{os.getpid()}")
    shutil.rmtree(trash, ignore_errors=True)
    _rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _rename(src: Path, dst: Path) -> None:
    os.replace(src, dst)


def remove_stale_temporaries(out: Path) -> None:
    """Delete the hidden folders a killed writer left (``.checkpoint-*``, ``.student.*``); call with
    the run folder's lock held (then no other writer can be using them)."""
    if out.is_dir():
        for p in out.iterdir():
            if p.name.startswith((".checkpoint-", ".student.")) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def prune_checkpoints(out: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest ``checkpoint-<step>/`` folders."""
    for _, p in checkpoints(out)[:-keep]:
        _remove_tree(p)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": FORMAT})
    os.chmod(path, FILE_MODE)  # safetensors writes 0600; a run folder is readable by the team (umask)
    fsync_file(path)


def _write_durable(path: Path, text: str) -> None:
    with open_nofollow(path, "w", fn="save_checkpoint") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(out: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``out/checkpoint-<step>/`` (tensors, state, manifest last; atomic); keep the newest ``keep``."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = fresh_dir(out / f".checkpoint-{step}.tmp-{os.getpid()}", "save_checkpoint")  # a link there is an error
    write_checkpoint_files(tmp, step, state)
    return publish_checkpoint(tmp, out, step, keep)


def write_checkpoint_files(
    tmp: Path, step: int, state: dict[str, Any], shards: dict[str, dict[str, Any]] | None = None
) -> None:
    """``tensors.safetensors``, ``state.json`` and, last, ``manifest.json`` of ``state`` into the
    temporary folder ``tmp``, each ``fsync``-ed. ``shards``: the ``{"shards/<file>": {"bytes", "sha256"}}``
    of the shard files already in ``tmp/shards/`` (a sharded checkpoint, manifest version 2)."""
    tree, tensors = encode_state({"step": step, **state})
    _save_tensors(tmp / TENSORS, tensors)
    _write_durable(tmp / STATE, json.dumps(tree))
    files = {
        name: {"bytes": (tmp / name).stat().st_size, "sha256": file_sha256(tmp / name)} for name in (TENSORS, STATE)
    }
    manifest: dict[str, Any] = {"format": FORMAT, "version": VERSION, "step": step, "files": files}
    if shards is not None:
        manifest.update(version=SHARDED_VERSION, layout="sharded", files={**files, **dict(sorted(shards.items()))})
    _write_durable(tmp / MANIFEST, json.dumps(manifest, indent=2))
    fsync_dir(tmp)


def publish_checkpoint(tmp: Path, out: Path, step: int, keep: int) -> Path:
    """Rename the complete folder ``tmp`` to ``out/checkpoint-<step>`` (replacing one of that step),
    ``fsync`` the run folder, keep the newest ``keep`` checkpoints; return the checkpoint folder."""
    final = out / f"checkpoint-{step}"
    if final.exists():  # a step redone after a resume from an older checkpoint
        _remove_tree(final)
    _rename(tmp, final)
    fsync_dir(out)
    prune_checkpoints(out, keep)
    return final


def _verified(path: Path, fn: str) -> dict[str, Any]:
    """Check the manifest, then every listed file's size and SHA-256; return the manifest; raise ``CheckpointError``."""

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{fn}: the checkpoint {path} must be complete and intact; got {why}.")

    m = _CKPT_RE.match(path.name)
    if not path.is_dir() or m is None:
        raise bad("no checkpoint-<step> folder")
    try:
        man = read_json(path / MANIFEST, max_bytes=MAX_MANIFEST_BYTES, max_depth=8, fn=fn)
    except FileNotFoundError:
        raise bad(f"no {MANIFEST} (the write did not finish)") from None
    except (OSError, ValueError) as exc:
        raise bad(f"an unreadable {MANIFEST} ({type(exc).__name__}: {exc})") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT or man.get("version") not in (VERSION, SHARDED_VERSION):
        raise bad(f"a {MANIFEST} of another format (expected format {FORMAT!r} version {VERSION} or {SHARDED_VERSION})")
    if man.get("step") != int(m.group(1)):
        raise bad(f"a {MANIFEST} of step {man.get('step')!r} in the folder of step {m.group(1)}")
    files = man.get("files")
    if man["version"] == SHARDED_VERSION:
        files = _check_shard_listing(path, files, bad)
    elif not isinstance(files, dict) or set(files) != {TENSORS, STATE}:
        raise bad(
            f"a {MANIFEST} that lists {sorted(files) if isinstance(files, dict) else files!r} instead of "
            f"{[STATE, TENSORS]}"
        )
    for name, entry in sorted(files.items()):
        f = path / name
        if f.is_symlink() or not f.is_file():
            raise bad(f"no {name}" + (" (a symbolic link)" if f.is_symlink() else ""))
        size = f.stat().st_size
        if not isinstance(entry, dict) or size != entry.get("bytes"):
            raise bad(
                f"{name} of {size} bytes where the manifest says {entry.get('bytes') if isinstance(entry, dict) else entry!r}"
            )
        digest = file_sha256(f)
        if digest != entry.get("sha256"):
            raise bad(f"{name} with SHA-256 {digest} where the manifest says {entry.get('sha256')}")
    return man


def _check_shard_listing(path: Path, files: Any, bad: Any) -> dict[str, Any]:
    """A version-2 manifest lists ``tensors.safetensors``, ``state.json`` and one or more
    ``shards/shard-*.safetensors``, and ``shards/`` holds exactly the listed files (a reader of
    torch.distributed.checkpoint opens every safetensors file there, so an unlisted one would be
    read unverified)."""
    names = sorted(files) if isinstance(files, dict) else []
    shards = [n for n in names if n not in (TENSORS, STATE)]
    if not isinstance(files, dict) or not {TENSORS, STATE} <= set(files) or not shards:
        raise bad(
            f"a sharded {MANIFEST} that lists {names or files!r} instead of {[STATE, TENSORS]} and the shard files"
        )
    odd = [n for n in shards if not _SHARD_RE.match(n)]
    if odd:
        raise bad(
            f"a {MANIFEST} that lists {odd[:3]}, which are no shard files (shards/shard-NNNNN-model-NNNNN-of-NNNNN.safetensors)"
        )
    folder = path / SHARDS
    if folder.is_symlink() or not folder.is_dir():
        raise bad(f"no {SHARDS}/ folder" + (" (a symbolic link)" if folder.is_symlink() else ""))
    extra = sorted(f"{SHARDS}/{p.name}" for p in folder.iterdir() if f"{SHARDS}/{p.name}" not in files)
    if extra:
        raise bad(f"{extra[0]}, which its {MANIFEST} does not list")
    return files


def is_sharded(ck: dict[str, Any]) -> bool:
    """True for the state of a sharded checkpoint as ``load_checkpoint`` returns it (its tensors still in ``shards/``)."""
    return isinstance(ck.get(SHARDED), dict)


def load_checkpoint(path: Path, fn: str = "distill") -> dict[str, Any]:
    """Verify (manifest, sizes, SHA-256) and read a checkpoint folder; nothing is unpickled.

    Raises:
        CheckpointError: the folder is incomplete, corrupted or not a checkpoint of this recipe
            (the message names it and says why).
    """
    sharded = _verified(path, fn)["version"] == SHARDED_VERSION
    from safetensors.torch import load_file

    try:
        tree = read_json(path / STATE, max_bytes=MAX_STATE_BYTES, max_depth=STATE_MAX_DEPTH, fn=fn)
        tensors = load_file(str(path / TENSORS), device="cpu")
    except JSONLimitError as exc:  # names the file and the cap
        raise CheckpointError(str(exc)) from None
    except Exception as exc:
        raise CheckpointError(
            f"{fn}: the checkpoint {path} must hold a readable {TENSORS} and {STATE}; got {type(exc).__name__}: {exc}."
        ) from None
    ck = decode_state(tree, tensors)
    if not isinstance(ck, dict) or not isinstance(ck.get("config"), dict) or "step" not in ck:
        raise CheckpointError(
            f"{fn}: the checkpoint {path} must hold the step and config of this recipe; got "
            f"keys {sorted(ck) if isinstance(ck, dict) else type(ck).__name__}."
        )
    if is_sharded(ck) != sharded:
        raise CheckpointError(
            f"{fn}: the checkpoint {path} must hold the state its {MANIFEST} announces; got "
            f"{'no' if sharded else 'a'} '{SHARDED}' entry in {STATE} of a "
            f"{'sharded' if sharded else 'one-file'} checkpoint."
        )
    folder_step = int(path.name.split("-")[1])
    if ck["step"] != folder_step:
        raise CheckpointError(
            f"{fn}: the checkpoint {path} must hold the step of its folder name, {folder_step}; got step "
            f"{ck['step']!r} in {STATE} (not a checkpoint ddk wrote: remove it to resume from an earlier one)."
        )
    return ck


def newest_valid_checkpoint(out: Path, fn: str = "distill") -> tuple[Path | None, list[str]]:
    """``(newest verified checkpoint folder or None, why each newer one was passed over)``.

    Only the manifest and digests are checked here (cheap); :func:`load_checkpoint` reads it.
    """
    passed: list[str] = []
    for _, path in reversed(checkpoints(out)):
        try:
            _verified(path, fn)
            return path, passed
        except CheckpointError as exc:
            passed.append(str(exc))
    return None, passed


# ---------------------------------------------------------------------------- JSONL logs
def truncate_jsonl(path: Path, max_step: int, fn: str = "distill") -> None:
    """Keep the records of ``path`` (JSON lines with a ``step``) up to ``max_step``.

    A torn last line (a write cut by a crash or a full disk) is dropped with a warning; an
    unreadable line before it is an error naming the file and the line.
    """
    if not path.is_file():
        return
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    keep: list[str] = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = loads_json(line, max_depth=STATE_MAX_DEPTH, where=f"line {i} of {path}", fn=fn)
            if not isinstance(rec, dict):
                raise ValueError(f"a JSON {type(rec).__name__}, not a record")
        except (UnicodeDecodeError, ValueError) as exc:
            if i == len(lines):
                print(f"warning: {fn}: dropped the torn last line {i} of {path} ({exc})", file=sys.stderr, flush=True)
                break
            raise ValueError(
                f"{fn}: every line of {path} must be a JSON record to resume; got line {i}: {exc}. "
                "Delete that line (the run resumes from its checkpoint), or pass --no-resume."
            ) from None
        step = rec.get("step", 0)
        if not isinstance(step, (int, float)) or step <= max_step:
            keep.append(line.decode("utf-8"))
    atomic_write_text(path, "".join(line + "\n" for line in keep))
