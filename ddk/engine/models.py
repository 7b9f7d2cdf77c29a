"""The user's models for ``ddk distill``: teacher, student and tokenizer from ``save_pretrained``
folders (or hub names, passed through to ``from_pretrained``), their vocabulary check, and the
distilled student saved with its tokenizer."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ddk._io import FILE_MODE, fresh_dir, fsync_dir, fsync_file, refuse_link
from ddk.distributed import rank_world
from ddk.engine.config import RunConfig

__all__ = [
    "autocast_dtype",
    "check_vocabularies",
    "load_models",
    "load_pretrained",
    "load_teacher",
    "load_tokenizer",
    "output_rows",
    "save_student",
    "teacher_identity",
]


def autocast_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype | None:
    """``torch.bfloat16`` when the run computes in bf16 (``dtype=bf16``, or ``auto`` on CUDA), else None (fp32)."""
    if cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def load_pretrained(kind: str, name: str, fn: str = "distill", flag: str | None = None, **kwargs: Any) -> Any:
    """``Auto*.from_pretrained(name)`` of a ``save_pretrained`` folder or a hub id ``org/name``.

    A name that is neither an existing folder nor shaped like a hub id (or any non-folder when
    ``HF_HUB_OFFLINE=1``) is an error before any network call, naming ``flag`` (what the user
    typed, e.g. ``--teacher``; default ``kind``); a folder that fails to load (a torn safetensors
    file, a garbage config) is an error naming it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    flag = flag or kind
    path = Path(os.path.expanduser(name))
    if not path.exists() and (_hub_offline() or not _HUB_ID.fullmatch(name)):
        why = "and HF_HUB_OFFLINE is set, so only local folders load" if _hub_offline() else "nor a hub id 'org/name'"
        raise ValueError(
            f"{fn}: {flag} must be a folder written by save_pretrained or a hub id 'org/name'; got {name!r}, "
            f"which is no folder (looked in {Path.cwd()}), {why}. Check the path."
        )
    loader = AutoTokenizer if kind == "tokenizer" else AutoModelForCausalLM
    try:
        return loader.from_pretrained(str(path) if path.exists() else name, **kwargs)
    except Exception as exc:  # OSError, ValueError, SafetensorError, JSONDecodeError, ...: name the folder
        raise ValueError(
            f"{fn}: {flag} must be a transformers {'tokenizer' if kind == 'tokenizer' else 'causal LM'} "
            f"folder or hub id; loading {name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc


def output_rows(model: Any) -> int:
    """Rows of the model's output embedding (its logits' width)."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor):
        return int(weight.shape[0])
    return int(model.config.vocab_size)


def check_vocabularies(teacher: Any, student: Any, tokenizer: Any, fn: str = "distill") -> None:
    """Raise unless teacher and student share ``tokenizer``'s vocabulary (the teacher may have padding rows).

    The student's output embedding must have at least ``len(tokenizer)`` rows and the teacher's
    (if any) at least the student's (rows past the student's, e.g. Qwen's padding to 152064, are
    sliced off). ``tokenizer`` may be None (no tokenizer check).
    """
    vs = output_rows(student)
    s_name = getattr(student, "name_or_path", "") or "the student"
    if tokenizer is not None and hasattr(tokenizer, "__len__") and vs < len(tokenizer):
        raise ValueError(
            f"{fn}: the student's vocabulary must cover the tokenizer's {len(tokenizer)} tokens; got an lm_head of "
            f"{vs} rows in {s_name}. Pass the tokenizer the student was trained with (--tokenizer, processing_class)."
        )
    if teacher is None:
        return
    vt = output_rows(teacher)
    t_name = getattr(teacher, "name_or_path", "") or "the teacher"
    if vt < vs:
        raise ValueError(
            f"{fn}: the teacher's vocabulary must cover the student's (a teacher wider by padding rows "
            f"is sliced); got teacher {t_name} with {vt} rows and student {s_name} with {vs}. Teacher "
            "and student must share a tokenizer."
        )


def _tokenizers_agree(a: Any, b: Any) -> bool:
    return a.get_vocab() == b.get_vocab()


def load_models(cfg: RunConfig, device: torch.device) -> tuple[Any, Any, Any]:
    """``(teacher or None, student, tokenizer)``: loaded, checked and on ``device``.

    The student keeps float32 master weights (bf16 runs use autocast); the teacher is loaded in
    bf16 when the run computes in bf16, in eval mode with no gradients (``load_teacher``). Without
    ``cfg.teacher`` (allowed for ``cpt`` only) the teacher is None; ``cpt`` with a teacher uses it
    only to measure the gap.
    """
    tok_flag = "--tokenizer" if cfg.tokenizer else "--student"  # the tokenizer comes from the student's folder
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.student, flag=tok_flag)
    student = load_pretrained("student", cfg.student, flag="--student", dtype=torch.float32).to(device)
    teacher = load_teacher(cfg, device, tokenizer, student) if cfg.teacher else None
    if cfg.gradient_checkpointing:
        enable = getattr(student, "activation_checkpointing_enable", None) or student.gradient_checkpointing_enable
        enable()
    if hasattr(student.config, "use_cache"):
        student.config.use_cache = False
    return teacher, student, tokenizer


def load_tokenizer(name: str, *, fn: str = "distill", flag: str = "--tokenizer") -> Any:
    """The tokenizer of ``name`` (a folder or hub id); it must have an EOS token."""
    tokenizer = load_pretrained("tokenizer", name, fn=fn, flag=flag)
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"{fn}: the tokenizer must have an EOS token (it separates documents in packed "
            f"sequences); got none in {name!r}. Set tokenizer.eos_token and save it."
        )
    return tokenizer


def load_teacher(
    cfg: RunConfig, device: torch.device, tokenizer: Any, student: Any, *, fn: str = "distill", flag: str = "--teacher"
) -> Any:
    """``cfg.teacher`` on ``device``, frozen, in eval mode and in the run's compute dtype, checked
    against the student's vocabulary and ``tokenizer`` (a teacher folder that holds a tokenizer
    must hold the same vocabulary)."""
    t_dtype = autocast_dtype(cfg, device) or torch.float32
    teacher = load_pretrained("teacher", cfg.teacher, fn=fn, flag=flag, dtype=t_dtype).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    check_vocabularies(teacher, student, tokenizer, fn=fn)
    t_path = Path(os.path.expanduser(cfg.teacher))
    if (t_path / "tokenizer_config.json").is_file():
        t_tok = load_pretrained("tokenizer", str(t_path), fn=fn, flag=flag)
        if not _tokenizers_agree(t_tok, tokenizer):
            raise ValueError(
                f"{fn}: teacher and student must share a tokenizer; got different vocabularies in "
                f"{cfg.teacher!r} ({len(t_tok)} tokens) and {cfg.tokenizer or cfg.student!r} "
                f"({len(tokenizer)} tokens)."
            )
    return teacher


def save_student(
    state: dict[str, torch.Tensor] | None,
    student: Any,
    tokenizer: Any,
    out: Path,
    run_info: dict[str, Any] | None = None,
) -> Path | None:
    """``out/student`` with ``save_pretrained`` (weights and config) plus the tokenizer, by rank 0.

    ``state`` is the full student state (gathered under FSDP2); ``run_info`` (the config digest
    of the run) goes to ``student/ddk_run.json``. Written into a hidden temporary folder, every
    file ``fsync``-ed, then renamed into place (the old folder renamed away first), so
    ``from_pretrained(out/"student")`` loads a complete folder or none.
    """
    if rank_world()[0] != 0 or state is None:
        return None
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(
            f"save_student: the student's weights must be finite to replace {out / 'student'}; got NaN/inf in "
            f"{bad[:5]}{' ...' if len(bad) > 5 else ''}. The previous student/ is kept; resume from an earlier "
            "checkpoint (delete the newer ones) or rerun with --on-nonfinite skip."
        )
    final = out / "student"
    tmp = fresh_dir(out / f".student.tmp-{os.getpid()}", "save_student")  # a link there is an error, never followed
    student.save_pretrained(str(tmp), state_dict=state)
    tokenizer.save_pretrained(str(tmp))
    if run_info is not None:
        (tmp / "ddk_run.json").write_text(json.dumps(run_info, indent=2), encoding="utf-8")
    for f in tmp.rglob("*"):
        if f.is_file():
            os.chmod(f, FILE_MODE)  # safetensors writes 0600: readable by a teammate or a server (umask)
            fsync_file(f)
    fsync_dir(tmp)
    old = refuse_link(out / f".student.old-{os.getpid()}", "save_student")
    if refuse_link(final, "save_student").exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(out)
    shutil.rmtree(old, ignore_errors=True)
    return final


def teacher_identity(teacher: Any, data: Any = None) -> dict[str, Any] | None:
    """What identifies the run's teacher, for ``evaluate`` to check: a teacher model's name and a
    checksum of its parameters (bit-exact; one pass over them), or a teacher cache's key and its
    manifest's per-domain teacher CE; None without a teacher."""
    from ddk.distributed import tensor_checksum

    if teacher is not None:
        return {
            "kind": "model",
            "name": str(getattr(teacher, "name_or_path", "") or ""),
            "checksum": tensor_checksum(p for p in teacher.state_dict().values()),
        }
    key = getattr(data, "key", None)
    if isinstance(key, str) and key.startswith("teacher-cache:"):
        return {"kind": "cache", "key": key, "teacher_ce": [float(x) for x in data.teacher_ce.tolist()]}
    return None
