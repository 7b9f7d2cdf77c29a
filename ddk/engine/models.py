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

from ddk._io import FILE_MODE, fresh_dir, fsync_dir, fsync_file, refuse_link, warn_user
from ddk.data.tokenizer_check import output_rows
from ddk.distributed import rank_world
from ddk.engine.config import RunConfig

__all__ = [
    "autocast_dtype",
    "check_positions",
    "check_vocabularies",
    "install_student",
    "load_models",
    "load_pretrained",
    "load_teacher",
    "load_tokenizer",
    "output_rows",
    "parameter_count",
    "position_limit",
    "save_student",
    "teacher_identity",
    "teacher_place",
    "teacher_tokenizer_of",
    "warn_larger_student",
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


def check_vocabularies(
    teacher: Any, student: Any, tokenizer: Any, fn: str = "distill", *, teacher_tokenizer: Any = None
) -> None:
    """The one tokenizer rule (``ddk.data.check_tokenizers``) for a pair of loaded models.

    ``teacher_tokenizer`` is the teacher's own tokenizer, default the one saved beside the teacher
    (``teacher_tokenizer_of``); when the teacher ships none, its output rows past the student's are
    taken as padding, with a warning that the tokenizers went unchecked. ``tokenizer`` may be None
    (no check); ``teacher`` None checks the student alone.
    """
    from ddk.data.tokenizer_check import check_tokenizers

    if tokenizer is None:
        return
    if teacher is not None and teacher_tokenizer is None:
        teacher_tokenizer = teacher_tokenizer_of(teacher, fn)
    check_tokenizers(tokenizer, teacher_tokenizer, student=student, teacher=teacher, fn=fn)
    if teacher is not None and teacher_tokenizer is None and output_rows(teacher) > output_rows(student):
        warn_user(
            f"{fn}: the teacher's {output_rows(teacher)} output rows exceed the student's {output_rows(student)}; "
            "they are taken as padding rows (sliced off), but the teacher has no tokenizer saved beside it, so "
            "the rule that both tokenize identically went unchecked. Save the teacher's tokenizer in its folder "
            "(or pass teacher_tokenizer=)."
        )


def teacher_tokenizer_of(teacher: Any, fn: str = "distill") -> Any:
    """The tokenizer saved in the teacher's ``save_pretrained`` folder (``name_or_path``) or hub
    repository, or None when there is none."""
    name = str(getattr(teacher, "name_or_path", "") or "")
    path = Path(os.path.expanduser(name)) if name else None
    if path is not None and any((path / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json")):
        return load_pretrained("tokenizer", str(path), fn=fn, flag="the teacher's tokenizer")
    if path is None or path.exists() or _hub_offline() or not _HUB_ID.fullmatch(name):
        return None
    try:  # a hub teacher: its repository's tokenizer (cached by huggingface_hub like the weights)
        return load_pretrained("tokenizer", name, fn=fn, flag="the teacher's tokenizer")
    except ValueError:
        return None


def position_limit(model: Any) -> int | None:
    """The longest sequence ``model`` embeds positions for (``max_position_embeddings``, GPT-2's
    ``n_positions``), or None when its config names none."""
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_positions(seq_len: int, teacher: Any, student: Any, *, fn: str = "distill", flag: str = "--seq-len") -> None:
    """Raise unless ``seq_len`` is within both models' position limits (``position_limit``); the
    error names both limits and ``flag``. Either model may be None."""
    models = [(r, m, position_limit(m)) for r, m in (("student", student), ("teacher", teacher)) if m is not None]
    over = [lim for _, _, lim in models if lim is not None and seq_len > lim]
    if over:
        limits = ", ".join(
            f"the {r} {getattr(m, 'name_or_path', '') or type(m).__name__!r} "
            f"{lim if lim is not None else 'no limit in its config'}"
            for r, m, lim in models
        )
        raise ValueError(
            f"{fn}: {flag} must be at most the models' position limits (max_position_embeddings, n_positions); "
            f"got {seq_len}, with {limits}. Pass {flag} {min(over)} or less."
        )


def parameter_count(model: Any) -> int:
    """Parameters of ``model`` (shared tensors once)."""
    seen = {id(p): p.numel() for p in model.parameters()}
    return int(sum(seen.values()))


def warn_larger_student(teacher: Any, student: Any, fn: str = "distill") -> None:
    """A warning (not an error) when the student has more parameters than the teacher."""
    if teacher is None or student is None:
        return
    ns, nt = parameter_count(student), parameter_count(teacher)
    if ns > nt:
        warn_user(
            f"{fn}: the student has more parameters ({ns:,}) than the teacher ({nt:,}); distillation usually "
            "goes from a larger teacher to a smaller student. Check that --teacher and --student are not swapped."
        )


def load_models(cfg: RunConfig, device: torch.device) -> tuple[Any, Any, Any]:
    """``(teacher or None, student, tokenizer)``: loaded, checked and on ``device``.

    The student keeps float32 master weights (bf16 runs use autocast); the teacher is loaded in
    bf16 when the run computes in bf16, in eval mode with no gradients (``load_teacher``), and left in
    host memory with ``teacher_offload="cpu"`` (FSDP2 then copies one block at a time to ``device``
    while it shards it, ``ddk.engine.parallel.shard_teacher``). Without
    ``cfg.teacher`` (allowed for ``cpt`` only) the teacher is None; ``cpt`` with a teacher uses it
    only to measure the gap. ``--seq-len`` above either model's position limit is an error; a
    student larger than the teacher, a warning.
    """
    tok_flag = "--tokenizer" if cfg.tokenizer else "--student"  # the tokenizer comes from the student's folder
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.student, flag=tok_flag)
    student = load_pretrained("student", cfg.student, flag="--student", dtype=torch.float32).to(device)
    place = teacher_place(cfg, device)
    teacher = load_teacher(cfg, device, tokenizer, student, place=place) if cfg.teacher else None
    warn_larger_student(teacher, student)
    check_positions(cfg.sequence_length, teacher, student)  # before any data is packed
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


def teacher_place(cfg: RunConfig, device: torch.device) -> torch.device:
    """Where the engine puts the teacher before ``parallelize``: the CPU with ``teacher_offload="cpu"``
    (FSDP2 keeps its shards there; the whole teacher never sits on the GPU), else ``device``."""
    return torch.device("cpu") if cfg.teacher_offload == "cpu" else device


def load_teacher(
    cfg: RunConfig,
    device: torch.device,
    tokenizer: Any,
    student: Any,
    *,
    fn: str = "distill",
    flag: str = "--teacher",
    place: torch.device | None = None,
) -> Any:
    """``cfg.teacher`` on ``place`` (default ``device``), frozen, in eval mode and in the compute
    dtype of a run on ``device``, checked against the student and ``tokenizer`` by the one tokenizer
    rule (``check_vocabularies``; the tokenizer saved in the teacher's folder, if any, must tokenize
    as ``tokenizer`` does)."""
    t_dtype = autocast_dtype(cfg, device) or torch.float32
    where = device if place is None else place
    teacher = load_pretrained("teacher", cfg.teacher, fn=fn, flag=flag, dtype=t_dtype).to(where).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    t_path = Path(os.path.expanduser(cfg.teacher))
    has_tok = any((t_path / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json"))
    t_tok = load_pretrained("tokenizer", str(t_path), fn=fn, flag=flag) if has_tok else None
    check_vocabularies(teacher, student, tokenizer, fn=fn, teacher_tokenizer=t_tok)
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
    tmp = fresh_dir(out / f".student.tmp-{os.getpid()}", "save_student")  # a link there is an error, never followed
    student.save_pretrained(str(tmp), state_dict=state)
    tokenizer.save_pretrained(str(tmp))
    if run_info is not None:
        (tmp / "ddk_run.json").write_text(json.dumps(run_info, indent=2), encoding="utf-8")
    return install_student(tmp, out)


def install_student(tmp: Path, out: Path) -> Path:
    """Make the complete folder ``tmp`` ``out/student``: every file ``fsync``-ed, then renamed into
    place (the old folder renamed away first), so ``from_pretrained(out/"student")`` loads a
    complete folder or none; return ``out/student``."""
    final = out / "student"
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
