"""Run-folder checkpoints of ``ddk distill``: ``checkpoint-<step>.pt``, newest kept, RNG states.

A checkpoint holds only tensors, numbers, strings, lists and dicts (the NumPy RNG state is
stored as a tensor), so it is read with ``torch.load(..., weights_only=True)``: nothing in the
file is executed.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddk._io import atomic_write_text

__all__ = ["checkpoints", "latest_checkpoint", "load_checkpoint", "prune_checkpoints", "rng_state", "save_checkpoint",
           "set_rng_state", "truncate_jsonl"]

_CKPT_RE = re.compile(r"^checkpoint-(\d+)\.pt$")


def rng_state() -> dict[str, Any]:
    """The torch (CPU and CUDA), NumPy and Python RNG states, as tensors and plain values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the run folder's ``checkpoint-<step>.pt`` files, oldest first (``.tmp`` files excluded)."""
    found = []
    if out.is_dir():
        for p in out.iterdir():
            m = _CKPT_RE.match(p.name)
            if m is not None and p.is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out: Path) -> Path | None:
    """The newest ``checkpoint-<step>.pt`` of ``out``, or None."""
    found = checkpoints(out)
    return found[-1][1] if found else None


def prune_checkpoints(out: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest ``checkpoint-<step>.pt`` files."""
    for _, p in checkpoints(out)[:-keep]:
        p.unlink(missing_ok=True)


def save_checkpoint(out: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``out/checkpoint-<step>.pt`` through a ``.tmp`` file and ``os.replace``; keep the newest ``keep``."""
    path = out / f"checkpoint-{step}.pt"
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"step": step, **state}, tmp)
    os.replace(tmp, path)
    prune_checkpoints(out, keep)
    return path


def load_checkpoint(path: Path, fn: str = "distill") -> dict[str, Any]:
    """Read a checkpoint (``weights_only=True``); an unreadable file is a ``ValueError`` naming it."""
    try:
        ck = torch.load(path, weights_only=True, map_location="cpu")
        if not isinstance(ck, dict) or "config" not in ck or "step" not in ck:
            raise KeyError("config/step")
    except Exception as exc:  # noqa: BLE001 - truncated, corrupted or foreign file: say which
        raise ValueError(
            f"{fn}: the checkpoint {path} must be a complete checkpoint of this recipe to resume; "
            f"got an unreadable file ({type(exc).__name__}: {exc}). Nothing was overwritten: move it "
            "away, or pass --no-resume to start over."
        ) from exc
    return ck


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop the records of ``path`` (JSON lines with a ``step``) after ``max_step``."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= max_step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))
