"""Which options each ``ddk`` command takes, in the sections of its ``--help``, and the errors for the others.

Every ``RecipeConfig`` field belongs to one side or to both:

* your own models and data (``USER_ONLY``: ``--teacher``, ``--student``, ``--data``, ...), read by
  ``ddk distill`` and ``ddk teacher-cache``;
* the bundled demo (``DEMO_ONLY``: its corpus, tokenizer, teacher and student, ``--teacher-hidden``,
  ``--vocab-size``, ``--user-folder``, ``--student-start``, ...), read by ``ddk teacher`` and
  ``ddk demo-real``;
* both (the method, optimisation, processes, checkpoints, logging).

A command's flags are the options it uses (``COMMANDS``, section by section); any other option's
flag is an error naming the commands that take it (``misplaced_flag``). A config file
(``--config``) may be shared by the commands of one side, so it may hold options a command does
not use, but an option of the other side set to anything but its default is an error naming it
(``check_file_values``: a run's ``config.json`` writes every option out, at its default for the
side that did not run). A method option the chosen methods have no use for, set to anything but
its default (``--alpha`` with ``--method kd``), is an error too (``check_method_options``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ddk.engine.methods import method_spec
from ddk.recipes.config import RecipeConfig

__all__ = [
    "COMMANDS",
    "DEMO_ONLY",
    "SIDES",
    "USER_ONLY",
    "check_file_values",
    "check_method_options",
    "command_fields",
    "flag_of",
    "misplaced_flag",
]

Sections = tuple[tuple[str, tuple[str, ...]], ...]

_MODELS = ("teacher", "student", "tokenizer", "teacher_cache")
_DATA = (
    "data",
    "validation_data",
    "test_data",
    "text_field",
    "domain_field",
    "seq_len",
    "val_samples",
    "eval_batch_size",
    "skip_bad_records",
    "max_record_mb",
    "num_proc",
    "data_dir",
)
_METHOD = (
    "method",
    "gamma",
    "temperature",
    "divergence",
    "beta",
    "alpha",
    "interval",
    "ddk_init",
    "ddk_signal",
    "ddk_temperature",
    "doremi_step_size",
    "doremi_smoothing",
    "loss",
    "backend",
)
_OPTIMISATION = (
    "steps",
    "tokens",
    "batch_size",
    "grad_accum",
    "lr",
    "warmup_steps",
    "min_lr_ratio",
    "weight_decay",
    "grad_clip",
    "gradient_checkpointing",
    "on_nonfinite",
    "seed",
)
_PROCESSES = ("device", "dtype", "dist_backend", "fsdp", "teacher_offload", "debug_checks", "threads")
_CHECKPOINTS = ("out", "checkpoint_every", "keep_checkpoints", "resume")
_LOGGING = ("log_every", "progress", "report_to")
_DEMO_CORPUS = (
    "domains",
    "user_folders",
    "user_jsonl",
    "max_chars",
    "validation_fraction",
    "test_fraction",
    "offline",
    "skip_bad_lines",
    "vocab_size",
)
_DEMO_TEACHER = (
    "teacher_hidden",
    "teacher_layers",
    "teacher_heads",
    "teacher_intermediate",
    "teacher_steps",
    "teacher_lr",
    "teacher_batch_size",
    "teacher_seed",
)
_DEMO_STUDENT = (
    "student_hidden",
    "student_layers",
    "student_heads",
    "student_intermediate",
    "student_seed",
    "student_start",
    "student_pretrain_steps",
    "scarce_domains",
    "scarce_share",
)

USER_ONLY: frozenset[str] = frozenset(
    (*_MODELS, "top_k", "data", "validation_data", "test_data", "text_field", "domain_field")
)
DEMO_ONLY: frozenset[str] = frozenset((*_DEMO_CORPUS, *_DEMO_TEACHER, *_DEMO_STUDENT))

_DEMO_SECTIONS: Sections = (
    ("the demo's corpus and tokenizer", _DEMO_CORPUS),
    ("the demo's teacher (pretrained once, cached by config hash)", _DEMO_TEACHER),
    ("the demo's student (cached by config hash)", _DEMO_STUDENT),
)

#: each command's flags, section by section (the groups of its ``--help``)
COMMANDS: dict[str, Sections] = {
    "distill": (
        ("models", _MODELS),
        ("data", _DATA),
        ("method", _METHOD),
        ("optimisation", _OPTIMISATION),
        ("devices and processes", _PROCESSES),
        ("run folder and checkpoints", _CHECKPOINTS),
        ("logging", _LOGGING),
    ),
    "teacher-cache": (
        ("models", ("teacher", "tokenizer")),
        ("data", tuple(k for k in _DATA if k != "test_data")),
        ("the cache", ("out", "top_k", "temperature")),
        ("devices and processes", ("device", "dtype", "dist_backend", "threads")),
        ("logging", ("progress",)),
    ),
    "teacher": (
        *_DEMO_SECTIONS,
        ("data", ("seq_len", "val_samples", "eval_batch_size", "data_dir")),
        ("pretraining", ("weight_decay", "grad_clip", "warmup_steps", "min_lr_ratio", "checkpoint_every")),
        ("devices and processes", ("device", "dist_backend", "threads")),
        ("logging", ("progress",)),
    ),
    "demo-real": (
        *_DEMO_SECTIONS,
        ("data", tuple(k for k in _DATA if k not in USER_ONLY)),
        ("method (KD and DDK both run)", tuple(k for k in _METHOD if k != "method")),
        ("optimisation", _OPTIMISATION),
        ("devices and processes", _PROCESSES),
        ("run folders (<out>/kd, <out>/ddk) and checkpoints", _CHECKPOINTS),
        ("logging", _LOGGING),
    ),
}
#: the side of each command: it reads your models and data, or builds the demo's
SIDES: dict[str, str] = {"distill": "user", "teacher-cache": "user", "teacher": "demo", "demo-real": "demo"}

# help texts that differ by command (the rest: ddk.recipes.config._HELP and the fields' metadata)
COMMAND_HELP: dict[tuple[str, str], str] = {
    ("teacher-cache", "out"): "the cache folder to write (required; a second run resumes or reuses it)",
    ("teacher-cache", "temperature"): "T of the stored log-probabilities: distill from the cache with the same "
    "--temperature",
    ("teacher-cache", "eval_batch_size"): "sequences per forward pass of the teacher",
    ("demo-real", "out"): "folder of the comparison: one run folder per method, <out>/kd and <out>/ddk",
    ("teacher", "checkpoint_every"): "pretraining steps between the checkpoints of the demo teacher and student",
}


def command_fields(command: str) -> tuple[str, ...]:
    """Every option of ``command``, in the order of its sections."""
    return tuple(k for _, keys in COMMANDS[command] for k in keys)


def flag_of(name: str) -> str:
    """The flag of the field ``name`` (``user_folders`` has ``--user-folder NAME=DIR``, repeatable)."""
    flag = "--" + name.replace("_", "-")
    return flag.removesuffix("s") if name == "user_folders" else flag


def _owners(name: str) -> list[str]:
    return [c for c in COMMANDS if name in command_fields(c)]


_REASONS: dict[tuple[str, str], str] = {
    ("distill", "top_k"): "a teacher cache keeps the k it was built with",
    ("demo-real", "method"): "it distills the same student with kd and with ddk",
}


def _why(name: str, command: str) -> str:
    if (command, name) in _REASONS:
        return _REASONS[command, name]
    if name in DEMO_ONLY:
        return "it builds the bundled demo's corpus and models; " + (
            "`ddk distill` trains your --teacher and --student on your --data"
            if command == "distill"
            else f"`ddk {command}` reads your own models and data"
        )
    if name in USER_ONLY and SIDES[command] == "demo":
        return (
            f"`ddk {command}` builds the demo's teacher, student and corpus; distil your own with "
            "`ddk distill --teacher T --student S --data FILE`"
        )
    return f"`ddk {command}` has no use for it"


def _owned(name: str, command: str) -> str:
    owners = " and ".join(f"`ddk {c}`" for c in _owners(name)) or "no command"
    return f"an option of {owners}, not of `ddk {command}`: {_why(name, command)}"


def misplaced_flag(name: str, command: str) -> str:
    """The error for the flag of option ``name`` given to ``ddk command``, which does not take it."""
    return f"{flag_of(name)} is {_owned(name, command)}."


_DEFAULTS: dict[str, Any] = {
    f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    for f in dataclasses.fields(RecipeConfig)
}


def check_file_values(command: str, values: Mapping[str, Any], where: str) -> None:
    """Raise ``ValueError`` for an option of the other side than ``command``'s set in a config file
    (``values``: the file's options, read from ``where``) to anything but its default."""
    other = DEMO_ONLY if SIDES[command] == "user" else USER_ONLY
    for k, v in values.items():
        if k in other and v != _DEFAULTS[k]:
            raise ValueError(
                f"{command}: {k} in {where} must be left out (or at its default {_DEFAULTS[k]!r}); got {v!r}, "
                f"{_owned(k, command)}. Remove it from the file."
            )


def _ddk_family(spec: Any, cfg: Any) -> bool:
    return spec.smoother_mode in ("ddk", "no_smoothing")


# (options, who uses them, the fix, the condition on a method spec and the config): an option set
# for methods that all fail the condition is an error
_CHOOSE = "choose a method that uses it"
_METHOD_OPTIONS: tuple[tuple[tuple[str, ...], str, str, Callable[[Any, Any], bool]], ...] = (
    (
        ("gamma", "divergence"),
        "only the methods with a teacher (all but cpt) use it",
        _CHOOSE,
        lambda s, c: s.teacher,
    ),
    (
        ("temperature",),
        "only the methods with a teacher (all but cpt) use it, and the check of a teacher cache",
        _CHOOSE,
        lambda s, c: s.teacher or bool(c.teacher_cache),
    ),
    (
        ("beta",),
        "only the jsd divergence uses it",
        "pass --divergence jsd",
        lambda s, c: s.teacher and c.divergence == "jsd",
    ),
    (
        ("alpha", "ddk_init", "ddk_signal", "ddk_temperature"),
        "only the DDK methods (ddk, ddk-no-smoothing, ddk-online) use it",
        _CHOOSE,
        _ddk_family,
    ),
    (("doremi_step_size", "doremi_smoothing"), "only kd-doremi uses it", _CHOOSE, lambda s, c: s.smoother_mode is None),
)


def check_method_options(cfg: RecipeConfig, methods: Iterable[str], command: str) -> None:
    """Raise ``ValueError`` for a method option set to anything but its default when none of
    ``methods`` (the methods ``ddk command`` runs) uses it."""
    specs = [method_spec(m, command) for m in methods]
    running = ("methods " if len(specs) > 1 else "method ") + " and ".join(s.name for s in specs)
    for names, users, fix, uses in _METHOD_OPTIONS:
        if any(uses(s, cfg) for s in specs):
            continue
        for k in names:
            value = getattr(cfg, k)
            if value != _DEFAULTS[k]:
                raise ValueError(
                    f"{command}: {k} ({flag_of(k)}) must be left at its default {_DEFAULTS[k]!r} with {running}: "
                    f"{users}; got {value!r}. Drop it, or {fix}."
                )
