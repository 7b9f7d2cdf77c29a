"""Configuration of the recipes: the engine's ``RunConfig`` plus the demo's options, YAML files, CLI flags.

Precedence: dataclass defaults < YAML file(s) (``--config``, later files win) < command-line
flags. Every field is a flag of the commands that use it (``ddk.recipes.options``: ``ddk distill
--help`` shows your models' options, ``ddk demo-real --help`` the demo's); an unknown YAML key is
an error that lists the valid ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddk.engine.config import DEVICES, DTYPES, RunConfig, coerce_field
from ddk.reliability import NONFINITE_POLICIES

STUDENT_STARTS: tuple[str, ...] = ("random", "uniform", "skewed")
ALL_DOMAINS: tuple[str, ...] = ("dialogue", "docs", "encyclopedia", "german", "go", "math", "novels", "python")
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class RecipeConfig(RunConfig):
    """Every option of ``ddk teacher`` / ``ddk distill`` / ``ddk evaluate`` / ``ddk demo-real``:
    the engine's ``RunConfig`` plus the bundled demo's corpus and models.

    Defaults fit a 2-core CPU machine. ``ddk distill --teacher T --student S --data FILE...``
    distills the user's saved models on the user's corpus; without them it runs on the bundled
    demo (corpus built from Debian and PyPI packages, a tokenizer trained on it, a pretrained
    teacher and a CE-pretrained student, all cached under ``data_dir``) through the same engine.
    """

    # --- the bundled demo corpus
    domains: tuple[str, ...] = ALL_DOMAINS  # built-in domains to collect
    user_folders: dict[str, str] = field(default_factory=dict)  # extra domains NAME -> folder of files
    user_jsonl: tuple[str, ...] = ()  # extra JSONL files with a "domain" field
    max_chars: int = 600_000  # per-domain size cap (train + validation)
    validation_fraction: float = 0.05
    test_fraction: float = 0.0  # demo: share held out as a test split no method reads (0: none)
    offline: bool = False  # never fetch packages; use the cache only
    skip_bad_lines: bool = False  # skip (and count) corrupted corpus JSONL lines instead of failing on them
    vocab_size: int = 4096
    # --- demo teacher (Llama-style, initialised locally, trained once and cached by config hash)
    teacher_hidden: int = 256
    teacher_layers: int = 4
    teacher_heads: int = 4
    teacher_intermediate: int = 688
    teacher_steps: int = 600
    teacher_lr: float = 1e-3
    teacher_batch_size: int = 16
    teacher_seed: int = 0  # the teacher is shared by every method and student seed
    # --- demo student
    student_hidden: int = 64
    student_layers: int = 2
    student_heads: int = 2
    student_intermediate: int = 172
    student_seed: int = 0  # the demo student's initialisation (shared by every method and seed)
    student_start: str = "uniform"  # demo student: "random" weights, or CE-pretrained on a "uniform"/"skewed" mixture
    student_pretrain_steps: int = 300  # CE pretraining steps of the demo student (cached)
    scarce_domains: tuple[str, ...] = ("german", "go", "math")  # "skewed" start: domains the student rarely saw
    scarce_share: float = 0.1  # "skewed" start: a scarce domain's weight relative to the others'

    def validate(self, fn: str | None = None) -> RecipeConfig:
        """``RunConfig.validate`` plus the demo's options; return self."""
        fn = fn or "RecipeConfig"
        super().validate(fn)
        positive = (
            "vocab_size",
            "teacher_hidden",
            "teacher_layers",
            "teacher_heads",
            "teacher_intermediate",
            "teacher_batch_size",
            "student_hidden",
            "student_layers",
            "student_heads",
            "student_intermediate",
            "max_chars",
        )
        for k in positive:
            if getattr(self, k) < 1:
                raise ValueError(f"{fn}: {k} must be >= 1; got {getattr(self, k)!r}.")
        if self.student_start not in STUDENT_STARTS:
            raise ValueError(f"{fn}: student_start must be one of {STUDENT_STARTS}; got {self.student_start!r}.")
        for k in ("student_pretrain_steps", "teacher_steps", "teacher_seed"):
            if getattr(self, k) < 0:
                raise ValueError(f"{fn}: {k} must be >= 0; got {getattr(self, k)!r}.")
        if not 0.0 < self.scarce_share <= 1.0:
            raise ValueError(
                f"{fn}: scarce_share must be in (0, 1] (a scarce domain's weight relative to the others'); "
                f"got {self.scarce_share!r}."
            )
        for who in ("teacher", "student"):
            h, n = getattr(self, f"{who}_hidden"), getattr(self, f"{who}_heads")
            if h % n or (h // n) % 2:
                raise ValueError(
                    f"{fn}: {who}_hidden must be a multiple of 2*{who}_heads (even head size for RoPE); got {h} "
                    f"with {n} heads."
                )
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"{fn}: validation_fraction must be in (0, 1); got {self.validation_fraction!r}.")
        if not 0.0 <= self.test_fraction < 1.0 - self.validation_fraction:
            raise ValueError(
                f"{fn}: test_fraction must be in [0, 1 - validation_fraction); got {self.test_fraction!r}."
            )
        if not self.teacher_lr > 0:
            raise ValueError(f"{fn}: teacher_lr must be > 0; got {self.teacher_lr!r}.")
        return self


_FIELDS = {f.name: f for f in dataclasses.fields(RecipeConfig)}
_HINTS = typing.get_type_hints(RecipeConfig)


_YAML_MAX_BYTES = 1 << 20  # a config is a few hundred bytes; more is a mistake or an attack
_YAML_MAX_DEPTH = 16  # options are scalars and lists of them


def _check_yaml(p: Path, text: str) -> None:
    """Refuse what ``yaml.safe_load`` would turn into a huge object or message: aliases (an anchor
    "bomb" of a few hundred bytes expands to gigabytes when printed) and deep nesting. A pass over
    the parser's events, which grows no tree."""
    import yaml

    depth = 0
    for ev in yaml.parse(text, Loader=yaml.SafeLoader):
        line = ev.start_mark.line + 1 if ev.start_mark is not None else 0
        if isinstance(ev, yaml.AliasEvent):
            raise ValueError(
                f"load_config: {p} must not use YAML aliases (*{ev.anchor}, line {line}); write the values out."
            )
        if isinstance(ev, yaml.CollectionStartEvent):
            depth += 1
            if depth > _YAML_MAX_DEPTH:
                raise ValueError(
                    f"load_config: {p} must nest at most {_YAML_MAX_DEPTH} levels; got more at line {line}."
                )
        elif isinstance(ev, yaml.CollectionEndEvent):
            depth -= 1


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML config (a mapping of field names); unknown keys are an error naming them. A file
    over 1 MiB, an alias or nesting deeper than 16 levels is an error naming the file."""
    import yaml

    p = Path(path)
    if not p.is_file() and (CONFIG_DIR / f"{path}.yaml").is_file():
        p = CONFIG_DIR / f"{path}.yaml"  # a preset name: "demo", "default", "tiny", "experiment"
    if not p.is_file():
        presets = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
        raise ValueError(f"load_config: config must be a YAML file or a preset {presets}; got {str(path)!r}.")
    size = p.stat().st_size
    if size > _YAML_MAX_BYTES:
        raise ValueError(f"load_config: {p} must be at most {_YAML_MAX_BYTES} bytes (a config file); got {size}.")
    text = p.read_text()
    try:
        _check_yaml(p, text)
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"load_config: {p} must be valid YAML; got {str(e)[:500]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"load_config: {p} must hold a mapping of option names; got {type(data).__name__}.")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ValueError(
            f"load_config: keys of {p} must be config options; got unknown {unknown} (valid: {sorted(_FIELDS)})."
        )
    return {k: coerce_field(RecipeConfig, k, v) for k, v in data.items()}


def make_config(files: typing.Sequence[str | os.PathLike[str]] = (), **overrides: Any) -> RecipeConfig:
    """Defaults < YAML ``files`` < ``overrides`` (keyword names are field names)."""
    values: dict[str, Any] = {}
    for f in files:
        values.update(load_yaml(f))
    unknown = sorted(set(overrides) - set(_FIELDS))
    if unknown:
        raise ValueError(
            f"make_config: overrides must be config options; got unknown {unknown} (valid: {sorted(_FIELDS)})."
        )
    values.update({k: coerce_field(RecipeConfig, k, v) for k, v in overrides.items()})
    return RecipeConfig(**values).validate()


# ---------------------------------------------------------------------------- argparse
class _KeyValue(argparse.Action):
    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        cur = dict(getattr(namespace, self.dest, None) or {})
        for item in values:
            if "=" not in item:
                parser.error(f"{option_string} must be NAME=PATH; got {item!r}")
            k, v = item.split("=", 1)
            cur[k] = v
        setattr(namespace, self.dest, cur)


_HELP: dict[str, str] = {
    "data_dir": "cache folder: packed token sequences, and the demo's corpus, tokenizer, teacher and student",
    "domains": "demo: built-in domains of the bundled corpus to collect",
    "user_folders": "demo: extra domain from a folder of files",
    "user_jsonl": "demo: extra JSONL files with 'domain' and 'text' fields added to the bundled corpus",
    "max_chars": "demo: per-domain size cap of the bundled corpus in characters",
    "validation_fraction": "demo: share of each bundled domain held out for validation",
    "test_fraction": "demo: share of each bundled domain held out as a test split (reported at the end, "
    "never read by the mixture; 0: none)",
    "offline": "demo: never fetch packages; use the package cache only",
    "vocab_size": "demo: vocabulary of the tokenizer trained on the bundled corpus",
    "eval_batch_size": "sequences per batch of the validation passes",
    "teacher_hidden": "demo teacher: hidden size",
    "teacher_layers": "demo teacher: decoder layers",
    "teacher_heads": "demo teacher: attention heads",
    "teacher_intermediate": "demo teacher: MLP size",
    "teacher_steps": "demo teacher: pretraining steps (cached by config hash)",
    "teacher_lr": "demo teacher: peak learning rate",
    "teacher_batch_size": "demo teacher: sequences per pretraining step",
    "teacher_seed": "demo teacher: seed (shared by every method and student seed)",
    "student_hidden": "demo student: hidden size",
    "student_layers": "demo student: decoder layers",
    "student_heads": "demo student: attention heads",
    "student_intermediate": "demo student: MLP size",
    "student_seed": "demo student: seed of its initialisation and pretraining (shared by every method and seed)",
    "student_start": "demo student: random weights, or CE-pretrained on the uniform mixture or on a skewed one "
    "(--scarce-domains seen at --scarce-share the rate of the others)",
    "student_pretrain_steps": "demo student: CE pretraining steps before distillation (cached by config hash)",
    "scarce_domains": "demo student, skewed start: the domains it rarely saw in pretraining",
    "scarce_share": "demo student, skewed start: a scarce domain's sampling weight relative to the others'",
    "steps": "optimizer steps of the distillation (the token budget is steps * batch_size * seq_len)",
    "lr": "peak learning rate of AdamW",
    "warmup_steps": "linear warm-up steps before the cosine decay",
    "min_lr_ratio": "final learning rate as a fraction of lr",
    "weight_decay": "AdamW weight decay (not on norms and biases)",
    "grad_clip": "clip the gradient norm to this (0: no clipping)",
    "seed": "seed of the run: the sampler's data order",
    "log_every": "write a metrics.jsonl record every this many steps, and without a progress bar print a plain "
    "line (step, loss, CE, KD, tokens/s; at interval ends the gaps and weights)",
    "threads": "torch threads (0: torch's default)",
    "num_proc": "processes that tokenize the records when they are packed (0: the CPU count); the packed result is the "
    "same for any number. Under torchrun one rank packs (the others wait, then open its cache)",
    "progress": "progress bars when stderr is a terminal; elsewhere (a log file, a pipe) and with --no-progress, a "
    "plain line every --log-every steps. Status lines (start, resume, checkpoints, the end) print either way",
    "checkpoint_every": "write checkpoint-<step>/ (safetensors + JSON + SHA-256 manifest) every this many steps (and "
    "at the last step, and on SIGTERM/SIGINT)",
    "keep_checkpoints": "keep only the newest k checkpoint-<step>/ folders; --resume loads the newest valid one",
    "resume": "continue from the newest valid checkpoint of --out (--no-resume: start over; the old run's files are "
    "moved into --out/replaced-<time>/, never deleted)",
    "dist_backend": "process-group backend under torchrun: auto (nccl with CUDA, else gloo), gloo or nccl",
    "device": "where one process distills: auto (cuda:0 when CUDA is available, else cpu), cpu or cuda "
    "(under torchrun: NCCL ranks use cuda:<LOCAL_RANK>, gloo ranks the CPU; with --dist-backend auto, "
    "--device cpu picks gloo and --device cuda nccl)",
    "fsdp": "under torchrun, shard the student and the teacher with FSDP2 (fully_shard per decoder layer + root) "
    "instead of DDP",
    "teacher_offload": "cpu: keep the teacher's FSDP2 shards in host memory (pinned on CUDA), each block copied to "
    "the device for its forward; the GPU then holds only the gathered blocks and root group of the teacher, at the "
    "cost of a host-to-device copy per block and forward (needs --fsdp under torchrun; "
    "--nproc_per_node=1 on one GPU). The same results as none",
    "debug_checks": "at each DDK interval all-gather checksums of the domain weights and the student parameters "
    "and fail naming the ranks that differ (also on with the environment variable DDK_DEBUG=1)",
    "batch_size": "global batch (sequences per optimizer step over all ranks; a multiple of the number of ranks)",
    "on_nonfinite": "NaN/inf loss or gradient: raise (naming the step and domains) or skip the batch (counted in "
    "metrics.jsonl and summary.json)",
    "teacher": "the teacher: a folder written by save_pretrained (or a hub name); with --student and --data",
    "top_k": "ddk teacher-cache: the teacher's k most likely next tokens stored per position (with their "
    "log-probabilities and the tail mass outside them)",
    "teacher_cache": "distill from a `ddk teacher-cache` folder instead of --teacher and --data: the sequences, the "
    "teacher's top-k log-probabilities and its per-domain CE come from the cache (no teacher in memory)",
    "student": "the student to distill into: a save_pretrained folder (its starting weights) or a hub name",
    "tokenizer": "tokenizer folder (default: the student's folder); teacher and student must share it",
    "data": "training records with a domain and a text field: .jsonl/.json/.parquet/.csv files or "
    "datasets.save_to_disk folders (a hub dataset name passes to datasets.load_dataset); NAME=FILE: one domain's "
    "file, every record of FILE in domain NAME (no domain field needed); both forms mix",
    "validation_data": "separate validation records, FILE or NAME=FILE as --data (default: a stable per-domain split "
    "of --data)",
    "test_data": "held-out test records with the same domains, FILE or NAME=FILE as --data: the per-domain gaps on "
    "them are reported at the end (summary.json 'test'), and no method reads them",
    "skip_bad_records": "drop records without the domain or text field (warned and counted) instead of failing",
    "max_record_mb": "largest record read, in MiB (a JSONL or CSV line, a Parquet row's strings): a larger one is a "
    "bad record named by file and line (dropped with --skip-bad-records); it bounds the memory of reading the data",
    "dtype": "bf16 (autocast with float32 master weights) or fp32; auto (default): bf16 on CUDA, fp32 on the CPU",
    "grad_accum": "micro-batches per optimizer step; batch_size is split and normalised by the global token count",
    "gradient_checkpointing": "recompute the student's activations in the backward pass (less memory)",
    "tokens": "token budget of the run; > 0 overrides steps (steps = ceil(tokens / (batch_size * seq_len)))",
    "out": "run folder (default: runs/real/<method>-s<seed>)",
    "skip_bad_lines": "skip corrupted lines of the corpus JSONL files (each reported with file and line, and counted) "
    "instead of failing",
}


class _Elsewhere(argparse.Action):
    """The flag of an option another command takes: an error naming the commands it belongs to."""

    def __init__(self, option_strings: list[str], dest: str, *, command: str, **kw: Any) -> None:
        super().__init__(option_strings, dest, nargs="*", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        self.command = command

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        from ddk.recipes.options import misplaced_flag

        parser.error(misplaced_flag(self.dest, self.command))


def _add_flag(parser: Any, name: str, help_text: str | None) -> None:
    """The flag of field ``name`` on ``parser`` (a parser or an argument group), default suppressed."""
    f = _FIELDS[name]
    flag = "--" + name.replace("_", "-")
    hint = _HINTS[name]
    if f.default is not dataclasses.MISSING:
        default = f.default
    else:
        assert f.default_factory is not dataclasses.MISSING  # every RecipeConfig field has a default
        default = f.default_factory()
    text = help_text or _HELP.get(name) or f.metadata.get("help")
    # one default: none where the text states its own, or where it is empty (a path or list to give)
    shown = "" if (text and "(default" in text) or default in ("", (), None) else f"(default: {default!r})"
    help_ = " ".join(x for x in (text, shown) if x)
    if hint is bool:
        parser.add_argument(
            flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_
        )
    elif typing.get_origin(hint) is tuple:
        metavar = "FILE|NAME=FILE" if name in ("data", "validation_data", "test_data") else None
        parser.add_argument(  # repeatable: `--data a=a.jsonl --data b=b.jsonl` is `--data a=a.jsonl b=b.jsonl`
            flag, dest=name, nargs="+", action="extend", default=argparse.SUPPRESS, metavar=metavar, help=help_
        )
    elif typing.get_origin(hint) is dict:
        parser.add_argument(
            flag.rstrip("s"),
            dest=name,
            nargs="+",
            action=_KeyValue,
            default=argparse.SUPPRESS,
            metavar="NAME=DIR",
            help="extra domain from a folder of files (repeatable)",
        )
    elif typing.get_origin(hint) is typing.Literal:  # a closed set of strings (teacher_offload)
        parser.add_argument(flag, dest=name, choices=typing.get_args(hint), default=argparse.SUPPRESS, help=help_)
    elif "choices" in f.metadata:  # the shared DistillOptions (method, divergence, loss, ddk_init)
        parser.add_argument(flag, dest=name, choices=f.metadata["choices"], default=argparse.SUPPRESS, help=help_)
    elif name == "student_start":
        parser.add_argument(flag, dest=name, choices=STUDENT_STARTS, default=argparse.SUPPRESS, help=help_)
    elif name == "device":
        parser.add_argument(flag, dest=name, choices=DEVICES, default=argparse.SUPPRESS, help=help_)
    elif name == "dtype":
        parser.add_argument(flag, dest=name, choices=DTYPES, default=argparse.SUPPRESS, help=help_)
    elif name == "on_nonfinite":
        parser.add_argument(flag, dest=name, choices=NONFINITE_POLICIES, default=argparse.SUPPRESS, help=help_)
    else:
        kind = int if name == "seq_len" else hint  # the one optional field: an int on the command line
        parser.add_argument(flag, dest=name, type=kind, default=argparse.SUPPRESS, help=help_)


def add_config_arguments(parser: argparse.ArgumentParser, command: str | None = None) -> None:
    """Add ``--config`` and one flag per config field (defaults suppressed: unset = not given).

    With ``command`` (``"distill"``, ``"teacher-cache"``, ``"teacher"``, ``"demo-real"``) only the
    options that command uses, in the argument groups of ``ddk.recipes.options.COMMANDS``; the flag
    of any other option is an error naming the commands that take it. Without, every field (for
    scripts such as ``bench/e2e/run.py`` that build every kind of run).
    """
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="YAML",
        help="YAML config file or preset name (repeatable; later files win; flags win over files)",
    )
    if command is None:
        for name in _FIELDS:
            _add_flag(parser, name, None)
        return
    from ddk.recipes.options import COMMAND_HELP, COMMANDS, command_fields

    for title, names in COMMANDS[command]:
        group = parser.add_argument_group(title)
        for name in names:
            _add_flag(group, name, COMMAND_HELP.get((command, name)))
    taken = set(command_fields(command))
    for name in _FIELDS:
        if name not in taken:
            flag = "--" + name.replace("_", "-")
            flags = [flag.rstrip("s")] if typing.get_origin(_HINTS[name]) is dict else [flag]
            if _HINTS[name] is bool:
                flags.append("--no-" + flag[2:])
            parser.add_argument(*flags, dest=name, action=_Elsewhere, command=command)


def config_from_args(
    args: argparse.Namespace, base: typing.Sequence[str] = (), command: str | None = None
) -> RecipeConfig:
    """``RecipeConfig`` from parsed flags: defaults < ``base`` presets < ``--config`` files < flags.

    With ``command``, a config file's option of the other side (``ddk.recipes.options``) set to
    anything but its default is an error naming it, and so is a method option the command's
    methods have no use for.
    """
    overrides = {k: v for k, v in vars(args).items() if k in _FIELDS}
    if command is None:
        return make_config([*base, *args.config], **overrides)
    from ddk.recipes.options import check_file_values, check_method_options

    values: dict[str, Any] = {}
    for f in [*base, *args.config]:
        read = load_yaml(f)
        check_file_values(command, read, f"the config file {str(f)!r}")
        values.update(read)
    cfg = make_config(**{**values, **overrides})
    if command in ("distill", "demo-real"):
        from ddk.recipes.demo import DEMO_METHODS

        check_method_options(cfg, DEMO_METHODS if command == "demo-real" else (cfg.method,), command)
    return cfg
