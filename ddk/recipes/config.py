"""Configuration of the real-data recipes: one flat frozen dataclass, YAML files, CLI flags.

Precedence: dataclass defaults < YAML file(s) (``--config``, later files win) < command-line
flags. Every field is a flag (``--teacher-hidden 256``); an unknown YAML key is an error that
lists the valid ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddk._io import json_fingerprint
from ddk.distributed import DIST_BACKENDS
from ddk.reliability import NONFINITE_POLICIES
from ddk.schedule import METHODS
from ddk.schedule.smoother import SMOOTHER_INITS

DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
DTYPES: tuple[str, ...] = ("auto", "bf16", "fp32")
LOSSES: tuple[str, ...] = ("fused", "logits")

STUDENT_STARTS: tuple[str, ...] = ("random", "uniform", "skewed")
ALL_DOMAINS: tuple[str, ...] = ("dialogue", "docs", "encyclopedia", "german", "go", "math", "novels", "python")
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True)
class RecipeConfig:
    """Every option of ``ddk teacher`` / ``ddk distill`` / ``ddk evaluate`` / ``ddk demo-real``.

    Defaults fit a 2-core CPU machine. Token budget of a distillation run:
    ``steps * batch_size * seq_len`` tokens (or ``tokens``), identical for every method.

    ``ddk distill --teacher T --student S --data FILE...`` distills the user's saved models on the
    user's corpus; without ``--teacher`` it runs on the bundled demo (corpus built from Debian and
    PyPI packages, a tokenizer trained on it, a pretrained teacher and a fresh student, all cached
    under ``data_dir``) through the same path.
    """

    # --- your models and data (empty: the bundled demo)
    teacher: str = ""  # teacher folder (save_pretrained) or hub name
    teacher_cache: str = ""  # a `ddk teacher-cache` folder: distill from it, no teacher model (and no --data)
    top_k: int = 32  # `ddk teacher-cache`: teacher ids (and log-probabilities) stored per position
    student: str = ""  # student folder or hub name (its starting weights)
    tokenizer: str = ""  # tokenizer folder; "" = the student's folder
    data: tuple[str, ...] = ()  # training records: JSONL/JSON/Parquet/CSV files or save_to_disk folders
    validation_data: tuple[str, ...] = ()  # separate validation records ("" = a per-domain split of data)
    text_field: str = "text"
    domain_field: str = "domain"
    val_samples: int = 500  # validation sequences per domain (paper: 500); capped, with a warning, for small domains
    skip_bad_records: bool = False  # drop records without the domain or text field (counted, warned) instead of failing
    # --- the bundled demo corpus
    data_dir: str = "~/.cache/ddk"  # corpus, tokenizer, token ids, teachers, package cache (debs/)
    domains: tuple[str, ...] = ALL_DOMAINS  # built-in domains to collect
    user_folders: dict[str, str] = field(default_factory=dict)  # extra domains NAME -> folder of files
    user_jsonl: tuple[str, ...] = ()  # extra JSONL files with a "domain" field
    max_chars: int = 600_000  # per-domain size cap (train + validation)
    validation_fraction: float = 0.05
    offline: bool = False  # never fetch packages; use the cache only
    skip_bad_lines: bool = False  # skip (and count) corrupted corpus JSONL lines instead of failing on them
    vocab_size: int = 4096
    seq_len: int = 128  # tokens per packed sequence (within one domain; EOS between documents)
    eval_batch_size: int = 32
    # --- teacher (Llama-style, initialised locally, trained once and cached by config hash)
    teacher_hidden: int = 256
    teacher_layers: int = 4
    teacher_heads: int = 4
    teacher_intermediate: int = 688
    teacher_steps: int = 600
    teacher_lr: float = 1e-3
    teacher_batch_size: int = 16
    teacher_seed: int = 0  # the teacher is shared by every method and student seed
    # --- student
    student_hidden: int = 64
    student_layers: int = 2
    student_heads: int = 2
    student_intermediate: int = 172
    student_seed: int = 0  # the demo student's initialisation (shared by every method and seed)
    student_start: str = "uniform"  # demo student: "random" weights, or CE-pretrained on a "uniform"/"skewed" mixture
    student_pretrain_steps: int = 300  # CE pretraining steps of the demo student (cached)
    scarce_domains: tuple[str, ...] = ("german", "go", "math")  # "skewed" start: domains the student rarely saw
    scarce_share: float = 0.1  # "skewed" start: a scarce domain's weight relative to the others'
    # --- distillation
    method: str = "ddk"
    steps: int = 400
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    gamma: float = 0.2
    temperature: float = 1.0
    alpha: float = 0.5
    ddk_init: str = (
        "discrepancy"  # first interval's weights: Eq. 1 r_0 ("discrepancy") or "uniform" (paper's pseudo-code)
    )
    interval: int = 50  # K, optimizer steps between DDK updates (and validation evaluations)
    doremi_step_size: float = 1.0  # kd-doremi: eta of the exponentiated-gradient step (DoReMi: 1.0)
    doremi_smoothing: float = 1e-3  # kd-doremi: c, the uniform mixture mixed in (DoReMi: 1e-3)
    backend: str = "auto"  # KD loss backend
    loss: str = "fused"  # "fused": lm_head + KD without (tokens, V) logits; "logits": both models' full logits
    dtype: str = "auto"  # "bf16" (autocast, fp32 master weights; the CUDA default) or "fp32" (the CPU default)
    grad_accum: int = 1  # micro-batches per optimizer step (batch_size is split; exact global-token normaliser)
    gradient_checkpointing: bool = False  # recompute the student's activations in backward
    tokens: int = 0  # token budget; > 0 sets steps = ceil(tokens / (batch_size * seq_len))
    on_nonfinite: str = "raise"  # NaN/inf loss or gradient: "raise" (name step + domains) or "skip" the batch (counted)
    seed: int = 0
    # --- run
    out: str = ""  # run folder; "" = runs/real/<method>-s<seed>
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2  # keep the last k checkpoint-<step>/ folders of the run folder
    resume: bool = True
    threads: int = 0  # torch threads; 0 = leave torch's default
    progress: bool = True
    # --- many processes (torchrun --nproc_per_node=R: batch_size is the global batch, split over ranks)
    dist_backend: str = (
        "auto"  # process-group backend under torchrun: "auto" (nccl with CUDA, else gloo), "gloo", "nccl"
    )
    fsdp: bool = False  # shard the student with FSDP2 (fully_shard) instead of DDP; needs torchrun
    debug_checks: bool = False  # at each DDK interval, check every rank holds the same weights (also: DDK_DEBUG=1)
    device: str = "auto"  # one process: "auto" (cuda:0 when CUDA is available, else cpu), "cpu" or "cuda"

    # ------------------------------------------------------------------ derived
    @property
    def process_group_backend(self) -> str:
        """``dist_backend``, with ``auto`` following ``device``: gloo for ``cpu``, nccl for ``cuda``."""
        if self.dist_backend != "auto" or self.device == "auto":
            return self.dist_backend
        return "gloo" if self.device == "cpu" else "nccl"

    @property
    def data_path(self) -> Path:
        return Path(os.path.expanduser(self.data_dir))

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the run: ``steps``, or the ``tokens`` budget over ``batch_size * seq_len``."""
        if self.tokens > 0:
            return -(-self.tokens // (self.batch_size * self.seq_len))
        return self.steps

    @property
    def uses_demo(self) -> bool:
        """True when no student/data are given: the bundled demo supplies teacher, student and data."""
        return not self.student

    @property
    def run_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs/real") / f"{self.method}-s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}  # as JSON reads it back

    def hash_of(self, keys: typing.Iterable[str], extra: Any = None) -> str:
        """Short hash of the named fields (plus ``extra``): keys caches of derived artefacts."""
        d = self.to_dict()
        payload = {k: d[k] for k in keys}
        payload["extra"] = extra
        return json_fingerprint(payload)


_FIELDS = {f.name: f for f in dataclasses.fields(RecipeConfig)}
_HINTS = typing.get_type_hints(RecipeConfig)


def _coerce(name: str, value: Any) -> Any:
    """Convert a YAML/JSON value to the field's type, or raise the house-format error."""
    fn = "RecipeConfig"
    hint = _HINTS[name]
    origin = typing.get_origin(hint)
    try:
        if hint is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if hint is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError
            return value
        if hint is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError
            return float(value)
        if hint is str:
            if not isinstance(value, str):
                raise TypeError
            return value
        if origin is tuple:
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise TypeError
            return tuple(value)
        if origin is dict:
            if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()
            ):
                raise TypeError
            return dict(value)
    except TypeError:
        raise ValueError(
            f"{fn}: {name} must be of type {getattr(hint, '__name__', str(hint))}; got {value!r}."
        ) from None
    return value


def validate(cfg: RecipeConfig) -> RecipeConfig:
    """Check value ranges; return ``cfg``."""
    fn = "RecipeConfig"
    if cfg.method not in METHODS:
        raise ValueError(f"{fn}: method must be one of {METHODS}; got {cfg.method!r}.")
    positive = (
        "vocab_size",
        "seq_len",
        "val_samples",
        "top_k",
        "grad_accum",
        "eval_batch_size",
        "teacher_hidden",
        "teacher_layers",
        "teacher_heads",
        "teacher_intermediate",
        "teacher_batch_size",
        "student_hidden",
        "student_layers",
        "student_heads",
        "student_intermediate",
        "steps",
        "batch_size",
        "interval",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "max_chars",
    )
    for k in positive:
        if getattr(cfg, k) < 1:
            raise ValueError(f"{fn}: {k} must be >= 1; got {getattr(cfg, k)!r}.")
    if cfg.student_start not in STUDENT_STARTS:
        raise ValueError(f"{fn}: student_start must be one of {STUDENT_STARTS}; got {cfg.student_start!r}.")
    if cfg.student_pretrain_steps < 0:
        raise ValueError(f"{fn}: student_pretrain_steps must be >= 0; got {cfg.student_pretrain_steps!r}.")
    if not 0.0 < cfg.scarce_share <= 1.0:
        raise ValueError(
            f"{fn}: scarce_share must be in (0, 1] (a scarce domain's weight relative to the others'); "
            f"got {cfg.scarce_share!r}."
        )
    if not cfg.doremi_step_size > 0 or not 0.0 <= cfg.doremi_smoothing <= 1.0:
        raise ValueError(
            f"{fn}: doremi_step_size must be > 0 and doremi_smoothing in [0, 1]; got "
            f"{cfg.doremi_step_size!r} and {cfg.doremi_smoothing!r}."
        )
    for who in ("teacher", "student"):
        h, n = getattr(cfg, f"{who}_hidden"), getattr(cfg, f"{who}_heads")
        if h % n or (h // n) % 2:
            raise ValueError(
                f"{fn}: {who}_hidden must be a multiple of 2*{who}_heads (even head size for RoPE); got {h} with {n} heads."
            )
    if cfg.loss not in LOSSES:
        raise ValueError(f"{fn}: loss must be one of {LOSSES}; got {cfg.loss!r}.")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"{fn}: dtype must be one of {DTYPES}; got {cfg.dtype!r}.")
    if cfg.batch_size % cfg.grad_accum:
        raise ValueError(
            f"{fn}: batch_size must be a multiple of grad_accum={cfg.grad_accum} (the global batch is "
            f"split into micro-batches); got {cfg.batch_size}."
        )
    if cfg.teacher_cache:
        if cfg.teacher or cfg.data or not cfg.student:
            raise ValueError(
                f"{fn}: teacher_cache needs student and replaces teacher and data (the cache holds the "
                f"sequences and the teacher's top-k); got teacher={cfg.teacher!r}, student={cfg.student!r}, "
                f"data={list(cfg.data)}."
            )
    elif (
        (cfg.student and not cfg.data)
        or (cfg.data and not (cfg.student or cfg.teacher))
        or (cfg.teacher and not cfg.data)
    ):  # teacher + data alone: `ddk teacher-cache`
        raise ValueError(
            f"{fn}: teacher, student and data must be given together (or none of them, for the "
            f"bundled demo); got teacher={cfg.teacher!r}, student={cfg.student!r}, data={list(cfg.data)}."
        )
    if cfg.student and not (cfg.teacher or cfg.teacher_cache) and cfg.method != "cpt":
        raise ValueError(
            f"{fn}: teacher must be given for method {cfg.method!r} (only cpt trains without one); "
            f"got none. Pass --teacher PATH."
        )
    for k in ("teacher_steps", "warmup_steps", "seed", "teacher_seed", "threads", "tokens"):
        if getattr(cfg, k) < 0:
            raise ValueError(f"{fn}: {k} must be >= 0; got {getattr(cfg, k)!r}.")
    if cfg.device not in DEVICES:
        raise ValueError(f"{fn}: device must be one of {DEVICES}; got {cfg.device!r}.")
    if cfg.dist_backend not in DIST_BACKENDS:
        raise ValueError(f"{fn}: dist_backend must be one of {DIST_BACKENDS}; got {cfg.dist_backend!r}.")
    if (cfg.device, cfg.dist_backend) in (("cpu", "nccl"), ("cuda", "gloo")):
        raise ValueError(
            f"{fn}: dist_backend must match device (gloo runs on the CPU, nccl on CUDA); got device "
            f"{cfg.device!r} with dist_backend {cfg.dist_backend!r}."
        )
    if cfg.on_nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"{fn}: on_nonfinite must be one of {NONFINITE_POLICIES}; got {cfg.on_nonfinite!r}.")
    if cfg.ddk_init not in SMOOTHER_INITS:
        raise ValueError(f"{fn}: ddk_init must be one of {SMOOTHER_INITS}; got {cfg.ddk_init!r}.")
    if not 0.0 < cfg.validation_fraction < 1.0:
        raise ValueError(f"{fn}: validation_fraction must be in (0, 1); got {cfg.validation_fraction!r}.")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ValueError(f"{fn}: min_lr_ratio must be in [0, 1]; got {cfg.min_lr_ratio!r}.")
    if not 0.0 < cfg.alpha <= 1.0:
        raise ValueError(f"{fn}: alpha must be in (0, 1]; got {cfg.alpha!r}.")
    for k in ("lr", "teacher_lr", "temperature"):
        if not getattr(cfg, k) > 0:
            raise ValueError(f"{fn}: {k} must be > 0; got {getattr(cfg, k)!r}.")
    for k in ("gamma", "weight_decay", "grad_clip"):
        if getattr(cfg, k) < 0:
            raise ValueError(f"{fn}: {k} must be >= 0; got {getattr(cfg, k)!r}.")
    return cfg


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML config (a mapping of field names); unknown keys are an error naming them."""
    import yaml

    p = Path(path)
    if not p.is_file() and (CONFIG_DIR / f"{path}.yaml").is_file():
        p = CONFIG_DIR / f"{path}.yaml"  # a preset name: "demo", "default", "tiny", "experiment"
    if not p.is_file():
        presets = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
        raise ValueError(f"load_config: config must be a YAML file or a preset {presets}; got {str(path)!r}.")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"load_config: {p} must hold a mapping of option names; got {type(data).__name__}.")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ValueError(
            f"load_config: keys of {p} must be config options; got unknown {unknown} (valid: {sorted(_FIELDS)})."
        )
    return {k: _coerce(k, v) for k, v in data.items()}


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
    values.update({k: _coerce(k, v) for k, v in overrides.items()})
    return validate(RecipeConfig(**values))


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
    "doremi_step_size": "kd-doremi: step size eta of the exponentiated-gradient update (DoReMi: 1.0)",
    "doremi_smoothing": "kd-doremi: weight c of the uniform mixture mixed into the weights (DoReMi: 1e-3)",
    "steps": "optimizer steps of the distillation (the token budget is steps * batch_size * seq_len)",
    "lr": "peak learning rate of AdamW",
    "warmup_steps": "linear warm-up steps before the cosine decay",
    "min_lr_ratio": "final learning rate as a fraction of lr",
    "weight_decay": "AdamW weight decay (not on norms and biases)",
    "grad_clip": "clip the gradient norm to this (0: no clipping)",
    "temperature": "T of the divergence (the CE uses T = 1)",
    "alpha": "DDK smoothing: weights = alpha * psi / sum(psi) + (1 - alpha) / N (Eq. 2)",
    "ddk_init": "first interval's weights: discrepancy (Eq. 1) or uniform",
    "backend": "KD loss backend: auto, chunked, cpp, triton or reference (ddk backends lists them)",
    "seed": "seed of the run: the sampler's data order",
    "log_every": "write a metrics.jsonl record every this many steps",
    "threads": "torch threads (0: torch's default)",
    "progress": "progress bars",
    "checkpoint_every": "write checkpoint-<step>/ (safetensors + JSON + SHA-256 manifest) every this many steps (and "
    "at the last step, and on SIGTERM/SIGINT)",
    "keep_checkpoints": "keep only the newest k checkpoint-<step>/ folders; --resume loads the newest valid one",
    "resume": "continue from the newest valid checkpoint of --out (--no-resume: start over; the old run's files are "
    "moved into --out/replaced-<time>/, never deleted)",
    "dist_backend": "process-group backend under torchrun: auto (nccl with CUDA, else gloo), gloo or nccl",
    "device": "where one process distills: auto (cuda:0 when CUDA is available, else cpu), cpu or cuda "
    "(under torchrun: NCCL ranks use cuda:<LOCAL_RANK>, gloo ranks the CPU; with --dist-backend auto, "
    "--device cpu picks gloo and --device cuda nccl)",
    "fsdp": "under torchrun, shard the student with FSDP2 (fully_shard per decoder layer + root) instead of DDP",
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
    "datasets.save_to_disk folders (a hub dataset name passes to datasets.load_dataset)",
    "validation_data": "separate validation records (default: a stable per-domain split of --data)",
    "text_field": "the records' text field",
    "domain_field": "the records' domain field",
    "val_samples": "validation sequences per domain for the discrepancy estimate (paper: 500); small domains "
    "are capped with a warning",
    "skip_bad_records": "drop records without the domain or text field (warned and counted) instead of failing",
    "seq_len": "tokens per packed training sequence (documents of one domain joined with EOS)",
    "loss": "fused: the lm_head fused with the loss, no (tokens, vocab) logits; logits: both models' full logits",
    "dtype": "bf16: autocast with float32 master weights (default on CUDA); fp32 (default on the CPU)",
    "grad_accum": "micro-batches per optimizer step; batch_size is split and normalised by the global token count",
    "gradient_checkpointing": "recompute the student's activations in the backward pass (less memory)",
    "tokens": "token budget of the run; > 0 overrides steps (steps = ceil(tokens / (batch_size * seq_len)))",
    "method": "cpt (no teacher), kd (uniform mixture), ddk, ddk-no-smoothing (weights = Eq. 1 at each update), "
    "ddk-online (discrepancy from training batches), kd-doremi (KD with DoReMi's domain reweighting)",
    "interval": "K: optimizer steps between DDK mixture updates (and validation evaluations)",
    "gamma": "weight of the divergence in CE + gamma * KL(p_T || p_S)",
    "out": "run folder (default: runs/real/<method>-s<seed>)",
    "skip_bad_lines": "skip corrupted lines of the corpus JSONL files (each reported with file and line, and counted) "
    "instead of failing",
}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one flag per config field (defaults suppressed: unset = not given)."""
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="YAML",
        help="YAML config file or preset name (repeatable; later files win; flags win over files)",
    )
    for name, f in _FIELDS.items():
        flag = "--" + name.replace("_", "-")
        hint = _HINTS[name]
        if f.default is not dataclasses.MISSING:
            default = f.default
        else:
            assert f.default_factory is not dataclasses.MISSING  # every RecipeConfig field has a default
            default = f.default_factory()
        help_ = f"{_HELP[name]} (default: {default!r})" if name in _HELP else f"(default: {default!r})"
        if hint is bool:
            parser.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_
            )
        elif typing.get_origin(hint) is tuple:
            parser.add_argument(flag, dest=name, nargs="+", default=argparse.SUPPRESS, help=help_)
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
        elif name == "method":
            parser.add_argument(flag, dest=name, choices=METHODS, default=argparse.SUPPRESS, help=help_)
        elif name == "student_start":
            parser.add_argument(flag, dest=name, choices=STUDENT_STARTS, default=argparse.SUPPRESS, help=help_)
        elif name == "device":
            parser.add_argument(flag, dest=name, choices=DEVICES, default=argparse.SUPPRESS, help=help_)
        elif name in ("loss", "dtype"):
            parser.add_argument(
                flag, dest=name, choices=LOSSES if name == "loss" else DTYPES, default=argparse.SUPPRESS, help=help_
            )
        elif name == "on_nonfinite":
            parser.add_argument(flag, dest=name, choices=NONFINITE_POLICIES, default=argparse.SUPPRESS, help=help_)
        else:
            parser.add_argument(flag, dest=name, type=hint, default=argparse.SUPPRESS, help=help_)


def config_from_args(args: argparse.Namespace, base: typing.Sequence[str] = ()) -> RecipeConfig:
    """``RecipeConfig`` from parsed flags: defaults < ``base`` presets < ``--config`` files < flags."""
    overrides = {k: v for k, v in vars(args).items() if k in _FIELDS}
    return make_config([*base, *args.config], **overrides)
