"""The run folder of the engine's loop: what a run writes, its digest, its lock, and what is read back.

``config.json`` holds the run's config; ``student/ddk_run.json`` the digest of the config that
trained the student and the identity of its teacher (``teacher_identity``), so ``evaluate``
refuses a student or a teacher that is not the run's.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from ddk._io import LOCK_NAME, atomic_write_text, folder_lock, json_fingerprint, read_json, refuse_link
from ddk.distributed import rank_world
from ddk.engine import checkpoint as ckpt
from ddk.engine.config import RunConfig, config_from_dict

__all__ = [
    "RESUME_IGNORED",
    "RUN_FILES",
    "RUN_INFO",
    "RUN_KEYS",
    "atomic_json",
    "check_no_links",
    "check_student_of",
    "config_digest",
    "log",
    "move_aside",
    "read_run_config",
    "result_options",
    "run_folder_lock",
]

RUN_KEYS = frozenset(f for f in RunConfig.__dataclass_fields__)

# options that may change between a checkpoint and its resume
RESUME_IGNORED = (
    "resume",
    "progress",
    "threads",
    "num_proc",  # the packed result is the same for every number of tokenizing processes
    "out",
    "log_every",
    "checkpoint_every",
    "data_dir",
    "on_nonfinite",
    "keep_checkpoints",
    "dist_backend",
    "debug_checks",
    "device",
    "report_to",
    "fsdp",  # DDP, FSDP2 and one process follow one trajectory; a checkpoint resumes under any of them
    "teacher_offload",  # where the teacher's shards wait between forwards: the same gathered weights, the same result
)


# artefacts of a run, moved aside (never deleted) when the folder starts over
RUN_FILES = (
    "config.json",
    "metrics.jsonl",
    "controller.jsonl",
    "summary.json",
    "eval.json",
    "weights.png",
    "gaps.png",
    "loss.png",
    "student",
    "tensorboard",  # report_to: the event files, and W&B's files with its run id
    "wandb",
)
RUN_INFO = "ddk_run.json"  # in student/: the digest of the config that trained it


def result_options(d: dict[str, Any]) -> dict[str, Any]:
    """The ``RunConfig`` options of ``d`` that determine a run's result (``RESUME_IGNORED`` left out;
    options a client adds on top, such as the demo's, do not count): what resume and the digest compare."""
    return {k: v for k, v in d.items() if k not in RESUME_IGNORED and k in RUN_KEYS}


def config_digest(cfg: RunConfig | dict[str, Any]) -> str:
    """Digest of ``result_options`` of a config."""
    return json_fingerprint(result_options(cfg.run_dict() if isinstance(cfg, RunConfig) else cfg))


def log(msg: str) -> None:
    """A status line to stderr from rank 0 only, printed above any progress bar (``tqdm.write``):
    never silenced by ``progress=False``."""
    if rank_world()[0] == 0:
        from tqdm.auto import tqdm

        tqdm.write(msg, file=sys.stderr)
        sys.stderr.flush()


def atomic_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2))


def run_folder_lock(cfg: RunConfig) -> Any:
    """The run folder's lock on rank 0 (``ddk._io.folder_lock``; also checks it can be written); nothing elsewhere."""
    if rank_world()[0] != 0:
        return contextlib.nullcontext()
    return folder_lock(
        cfg.run_dir, "distill", "out", hint="Wait for that run to finish (or stop it), or pass another --out."
    )


def check_no_links(out: Path) -> None:
    """No file ddk writes in the run folder (``RUN_FILES``, ``.lock``, the checkpoints and the
    temporary names of ``student/``) is a symbolic link, which a write or a resume could follow out
    of ``--out``: the error names it, before anything is written."""
    for name in (*RUN_FILES, LOCK_NAME):
        refuse_link(out / name, "distill")
    for pattern in (".student.*", "checkpoint-*", ".checkpoint-*"):  # temporaries of save_student, checkpoints
        for p in out.glob(pattern):
            refuse_link(p, "distill")


def move_aside(out: Path) -> Path | None:
    """Move the previous run's files (``RUN_FILES``, checkpoints) into ``out/replaced-<time>/``; never delete them."""
    old = [out / n for n in RUN_FILES if (out / n).exists()]
    old += [p for _, p in ckpt.checkpoints(out)] + ckpt.legacy_checkpoints(out)
    if not old:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = out / f"replaced-{stamp}"
    n = 1
    while dest.exists():
        n += 1
        dest = out / f"replaced-{stamp}-{n}"
    dest.mkdir()
    for p in old:
        os.replace(p, dest / p.name)
    log(f"distill: starting over in {out}; the previous run's files were moved to {dest}")
    return dest


def read_run_config(run: Path, fn: str = "evaluate") -> RunConfig:
    """The ``config.json`` of a run folder, validated like user input (types, ranges, known options)."""
    path = run / "config.json"
    try:
        saved = read_json(path, fn=fn)  # size and nesting capped
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"{fn}: {path} must be the JSON config written by ddk distill; got an unreadable file "
            f"({type(exc).__name__}: {exc})."
        ) from None
    if not isinstance(saved, dict):
        raise ValueError(f"{fn}: {path} must hold a mapping of config options; got {type(saved).__name__}.")
    try:
        return config_from_dict(RunConfig, saved, ignore_unknown=True)
    except ValueError as exc:
        raise ValueError(f"{fn}: {path} must be a valid config written by ddk distill; got: {exc}") from None


def check_student_of(run: Path, cfg: RunConfig, fn: str = "evaluate") -> dict[str, Any]:
    """``run/student`` was trained with ``run/config.json`` (its ``ddk_run.json`` holds the same digest); return that ``ddk_run.json``."""
    want = config_digest(cfg)
    try:
        info = read_json(run / "student" / RUN_INFO, fn=fn)
        got = info.get("config_digest")
    except (OSError, ValueError, AttributeError):
        info, got = {}, None
    if got != want:
        raise ValueError(
            f"{fn}: the student/ of {str(run)!r} must be the one trained with its config.json (config "
            f"digest {want}); got {'a student of config digest ' + repr(got) if got else 'a student without a readable ' + RUN_INFO}. "
            "It is left from another run: rerun `ddk distill` with this folder's config."
        )
    return dict(info)
