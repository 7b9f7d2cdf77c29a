"""One evaluation of a distilled student: per-domain validation CE of the student and its teacher.

The teacher's CE comes from its one source (``Components.ensure_teacher_ce``): the teacher model,
the teacher cache's manifest, or, for a run without either (``cpt``), the student's own CE (gap 0).
``evaluate_run`` checks both models against the run folder: the student carries the digest of the
run's config, and the teacher must be the one the run distilled from (``teacher_identity``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ddk.engine.components import Components
from ddk.engine.progress import show_bars
from ddk.engine.runfolder import atomic_json, check_student_of, read_run_config

__all__ = ["discrepancy_report", "evaluate_run", "validation_identity"]


def discrepancy_report(parts: Components, student: nn.Module, teacher: nn.Module | None) -> dict[str, Any]:
    """Per-domain validation CE of ``student`` and the teacher on ``parts``' validation sets:
    ``domains``, ``student_ce``, ``teacher_ce``, ``gap``, ``ratio`` (lists), ``mean_gap``,
    ``worst_gap``, ``mean_ratio``."""
    parts.ensure_teacher_ce(teacher, student)
    disc = parts.estimator.estimate(student)
    return {
        "domains": list(parts.names),
        "student_ce": disc.student_ce.tolist(),
        "teacher_ce": disc.teacher_ce.tolist(),
        "gap": disc.gap.tolist(),
        "ratio": disc.ratio.tolist(),
        "mean_gap": float(disc.gap.mean()),
        "worst_gap": float(disc.gap.max()),
        "mean_ratio": float(disc.ratio.mean()),
    }


def validation_identity(data: Any) -> dict[str, Any]:
    """What identifies the validation sets a run's CE is measured on, for ``ddk compare`` to check:
    a 64-bit checksum of the domain names and of every validation token id (as int64, so a packed
    corpus and a teacher cache of the same sequences agree; one pass over them), and the
    sequences per domain. Two runs share it only if they measured on the same token sequences.

    Args:
        data: ``PackedDomains`` or ``TeacherCache`` (its ``names`` and per-domain ``validation``
            arrays ``(m_i, L)``).
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps(list(data.names)).encode())
    rows = []
    for arr in data.validation:
        n, width = (int(x) for x in arr.shape)
        rows.append(n)
        h.update(f"({n},{width});".encode())
        for s in range(0, n, 4096):  # bounded memory for large validation sets
            h.update(np.ascontiguousarray(arr[s : s + 4096], dtype="<i8").tobytes())
    return {"checksum": h.hexdigest(), "sequences": rows}


def _check_teacher_of(run: Path, info: dict[str, Any], current: dict[str, Any] | None, fn: str) -> None:
    """The run's teacher (``ddk_run.json``'s ``teacher_identity``) is the one evaluated now."""
    want = info.get("teacher_identity")
    if want is None or current is None:
        return  # no teacher in the run (cpt), or a run folder written before identities were recorded
    same = want.get("kind") == current.get("kind") and (
        want.get("checksum") == current.get("checksum")
        if current.get("kind") == "model"
        else want.get("key") == current.get("key")
    )
    if not same:
        raise ValueError(
            f"{fn}: the teacher must be the one {str(run)!r} distilled from ({want.get('name') or want.get('key')}, "
            f"identity {want.get('checksum', want.get('key'))}); got {current.get('name') or current.get('key')} "
            f"with identity {current.get('checksum', current.get('key'))}: its weights changed since the run. "
            "Evaluate with the run's teacher, or rerun `ddk distill`."
        )


def _summary_teacher_ce(run: Path, fn: str) -> list[float]:
    """The reference CE a run without a teacher logged (``summary.json``'s ``teacher_ce``)."""
    from ddk._io import read_json

    try:
        ce = read_json(run / "summary.json", fn=fn)["teacher_ce"]
        return [float(x) for x in ce]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{fn}: a run without a teacher must hold summary.json with its reference CE (teacher_ce); got "
            f"{type(exc).__name__}: {exc}. Pass the run a teacher (--teacher) to measure gaps against it."
        ) from None


def evaluate_run(run_dir: str | os.PathLike[str], *, fn: str = "evaluate") -> dict[str, Any]:
    """Per-domain validation CE of a finished run's student and of its teacher; writes ``eval.json``.

    The run's ``config.json`` is validated like user input; the student must carry the digest of
    that config and the teacher (model or cache) must be the run's. Returns the report with
    ``method`` and ``seed``.
    """
    from ddk.engine.components import build_components, load_run_data
    from ddk.engine.models import autocast_dtype, load_pretrained, load_teacher, load_tokenizer, teacher_identity
    from ddk.engine.parallel import device_for

    run = Path(run_dir)
    if not (run / "student" / "config.json").is_file() or not (run / "config.json").is_file():
        raise ValueError(
            f"{fn}: run_dir must be a finished distill run (with config.json and student/); got {str(run)!r}."
        )
    cfg = read_run_config(run, fn)
    info = check_student_of(run, cfg, fn)
    device = device_for(cfg)
    tokenizer = load_tokenizer(str(run / "student"), fn=fn, flag="the run's student/")  # saved with the student
    student = load_pretrained("student", str(run / "student"), fn=fn, flag="the run's student/", dtype=torch.float32)
    student = student.to(device).eval()
    teacher = load_teacher(cfg, device, tokenizer, student, fn=fn, flag="the run's teacher") if cfg.teacher else None
    data = load_run_data(cfg, tokenizer, fn)
    identity = teacher_identity(teacher, data)
    _check_teacher_of(run, info, identity, fn)
    parts = build_components(
        cfg,
        data,
        global_batch_size=cfg.batch_size,
        seed=cfg.seed,
        eval_batch_size=cfg.eval_batch_size,
        device=device,
        autocast=autocast_dtype(cfg, device),
        progress=show_bars(cfg.progress),
    )
    if teacher is None and getattr(data, "teacher_ce", None) is None:
        # no teacher (cpt): the reference the run logged, its student's CE at the start
        parts.estimator.teacher_ce = _summary_teacher_ce(run, fn)
    res = {"method": cfg.method, "seed": cfg.seed, **discrepancy_report(parts, student, teacher)}
    res["teacher_identity"] = identity
    res["validation_identity"] = validation_identity(data)
    atomic_json(run / "eval.json", res)
    return res
