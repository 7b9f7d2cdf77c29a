"""The options of a distillation, defined once.

* ``DistillOptions``: what a distillation *is* (method, loss, divergence, DDK's alpha and K, the
  validation split, packing). ``DDKConfig`` (``transformers.TrainingArguments`` + these) and
  ``RunConfig`` are both built from it, so a field cannot exist in one and not the other, and
  ``DistillOptions.check_options`` is the one validator of these fields.
* ``RunConfig``: ``DistillOptions`` plus what the engine's own loop needs (``ddk distill``): the
  models and data, optimiser and schedule, the run folder, processes. The CLI's ``RecipeConfig``
  adds the bundled demo's options to it.

Flag to argument (``ddk distill`` -> ``DDKConfig``): every ``DistillOptions`` field has the same
name in both; ``--batch-size`` is the global batch (``per_device_train_batch_size * world_size``);
``--lr`` -> ``learning_rate``; ``--steps`` -> ``max_steps``; ``--warmup-steps`` ->
``warmup_steps``; ``--weight-decay`` -> ``weight_decay``; ``--grad-clip`` -> ``max_grad_norm``;
``--grad-accum`` -> ``gradient_accumulation_steps``; ``--eval-batch-size`` ->
``per_device_eval_batch_size``. The CLI's optimiser is AdamW with betas (0.9, 0.95), no decay on
norms and biases, and warm-up + cosine to ``lr * min_lr_ratio`` (``ddk.engine.make_optimizer``:
pass it to ``DDKTrainer(optimizers=...)`` for the same trajectory).
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ddk._io import json_fingerprint
from ddk.distributed import DIST_BACKENDS
from ddk.engine.methods import METHODS, method_spec
from ddk.engine.tracking import REPORT_TO
from ddk.reliability import NONFINITE_POLICIES
from ddk.schedule.smoother import SMOOTHER_INITS, SMOOTHER_SIGNALS
from ddk_kernels.types import DIVERGENCES

__all__ = [
    "DEVICES",
    "DTYPES",
    "LOSSES",
    "TEACHER_OFFLOADS",
    "DistillOptions",
    "RunConfig",
    "check_cache_backend",
    "coerce_field",
    "config_from_dict",
    "data_source",
]

DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
TEACHER_OFFLOADS: tuple[str, ...] = ("none", "cpu")
DTYPES: tuple[str, ...] = ("auto", "bf16", "fp32")
LOSSES: tuple[str, ...] = ("fused", "logits")


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class DistillOptions:
    """The options of a distillation shared by every client (paper defaults).

    Examples:
        >>> DistillOptions(method="kd").check_options().gamma
        0.2
    """

    method: str = field(
        default="ddk",
        metadata={
            "help": "cpt (CE only, no teacher), kd (uniform mixture), ddk (Eq. 1 + smoothed Eq. 2), ddk-no-smoothing "
            "(softmax of the ratios at each update), ddk-online (discrepancy from the training batches), kd-doremi "
            "(KD with DoReMi's reweighting)",
            "choices": list(METHODS),
        },
    )
    gamma: float = field(default=0.2, metadata={"help": "weight of the divergence: loss = CE + gamma * D (paper: 0.2)"})
    temperature: float = field(default=1.0, metadata={"help": "T of the divergence; the CE uses T = 1 (paper: 1.0)"})
    divergence: str = field(
        default="forward_kl",
        metadata={
            "help": "forward_kl = KL(p_T || p_S) (the paper's), reverse_kl = KL(p_S || p_T), or jsd (JSD(beta))",
            "choices": list(DIVERGENCES),
        },
    )
    beta: float = field(default=0.5, metadata={"help": "beta of JSD(beta) in [0, 1] (0: forward KL, 1: reverse KL)"})
    alpha: float = field(
        default=0.5,
        metadata={"help": "Eq. 2: weights = alpha * psi / sum(psi) + (1 - alpha) / N, alpha in (0, 1] (paper: 0.5)"},
    )
    interval: int = field(
        default=1000, metadata={"help": "K: optimizer steps between domain-weight updates (paper: 1000)"}
    )
    ddk_init: str = field(
        default="discrepancy",
        metadata={
            "help": "first interval's weights: discrepancy (Eq. 1, r_0 = softmax(ppl_S / ppl_T)), uniform, or "
            "floored (Eq. 1 with Eq. 2's floor: alpha * softmax + (1 - alpha) / N)",
            "choices": list(SMOOTHER_INITS),
        },
    )
    ddk_signal: str = field(
        default="ratio",
        metadata={
            "help": "what Eq. 1 and Eq. 2 exponentiate: ratio (ppl_S / ppl_T, the paper's), log_ratio (the gap in "
            "nats), or gain (the gap scaled by how fast each domain closed it per sample in the last interval)",
            "choices": list(SMOOTHER_SIGNALS),
        },
    )
    ddk_temperature: float = field(
        default=1.0, metadata={"help": "Eq. 1/2: softmax temperature dividing the signal, > 0 (paper: 1)"}
    )
    doremi_step_size: float = field(
        default=1.0, metadata={"help": "kd-doremi: step size eta of the exponentiated-gradient update (DoReMi: 1.0)"}
    )
    doremi_smoothing: float = field(
        default=1e-3, metadata={"help": "kd-doremi: weight c in [0, 1] of the uniform mixture mixed in (DoReMi: 1e-3)"}
    )
    loss: str = field(
        default="fused",
        metadata={
            "help": "fused: the lm_head fused with the loss, no (tokens, vocab) logits; logits: both models' full "
            "logits (any model, e.g. ones whose logits are scaled), for training and validation alike; both compute "
            "soft-capped logits (Gemma2) and lm_head biases (Phi)",
            "choices": list(LOSSES),
        },
    )
    backend: str = field(
        default="auto",
        metadata={"help": "loss backend: auto, chunked, cpp, triton or reference (`ddk backends` lists them)"},
    )
    val_samples: int = field(
        default=500,
        metadata={"help": "held-out validation sequences per domain (paper: 500); small domains are capped, warned"},
    )
    seq_len: int | None = field(
        default=None, metadata={"help": "tokens per packed sequence (documents of one domain joined with EOS)"}
    )
    text_field: str = field(default="text", metadata={"help": "the records' text field (column)"})
    domain_field: str = field(default="domain", metadata={"help": "the records' domain field (column)"})

    def check_options(self, fn: str | None = None) -> DistillOptions:
        """Raise ``ValueError`` naming the first bad option (``fn``: the class name by default); return self."""
        fn = fn or type(self).__name__
        if self.method not in METHODS:
            raise ValueError(f"{fn}: method must be one of {METHODS}; got {self.method!r}.")
        if not (_number(self.gamma) and self.gamma >= 0):
            raise ValueError(f"{fn}: gamma must be a finite number >= 0 (paper: 0.2); got {self.gamma!r}.")
        if not (_number(self.temperature) and self.temperature > 0):
            raise ValueError(f"{fn}: temperature must be a finite number > 0 (paper: 1.0); got {self.temperature!r}.")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"{fn}: divergence must be one of {DIVERGENCES}; got {self.divergence!r}.")
        if not (_number(self.beta) and 0.0 <= self.beta <= 1.0):
            raise ValueError(f"{fn}: beta must be a number in [0, 1]; got {self.beta!r}.")
        if not (_number(self.alpha) and 0.0 < self.alpha <= 1.0):
            raise ValueError(f"{fn}: alpha must be a number in (0, 1] (paper: 0.5); got {self.alpha!r}.")
        if not (_int(self.interval) and self.interval >= 1):
            raise ValueError(
                f"{fn}: interval must be an int >= 1 (optimizer steps between updates; paper: 1000); "
                f"got {self.interval!r}."
            )
        if self.ddk_init not in SMOOTHER_INITS:
            raise ValueError(f"{fn}: ddk_init must be one of {SMOOTHER_INITS}; got {self.ddk_init!r}.")
        if self.ddk_signal not in SMOOTHER_SIGNALS:
            raise ValueError(f"{fn}: ddk_signal must be one of {SMOOTHER_SIGNALS}; got {self.ddk_signal!r}.")
        if not (_number(self.ddk_temperature) and self.ddk_temperature > 0):
            raise ValueError(
                f"{fn}: ddk_temperature must be a finite number > 0 (paper: 1); got {self.ddk_temperature!r}."
            )
        if not (_number(self.doremi_step_size) and self.doremi_step_size > 0):
            raise ValueError(
                f"{fn}: doremi_step_size must be a number > 0 (DoReMi: 1.0); got {self.doremi_step_size!r}."
            )
        if not (_number(self.doremi_smoothing) and 0.0 <= self.doremi_smoothing <= 1.0):
            raise ValueError(
                f"{fn}: doremi_smoothing must be a number in [0, 1] (DoReMi: 1e-3); got {self.doremi_smoothing!r}."
            )
        if self.loss not in LOSSES:
            raise ValueError(f"{fn}: loss must be one of {LOSSES}; got {self.loss!r}.")
        if not isinstance(self.backend, str) or not self.backend:
            raise ValueError(f"{fn}: backend must be a backend name such as 'auto'; got {self.backend!r}.")
        from ddk_kernels.dispatch import BACKENDS, TABLE

        if self.backend != "auto" and self.backend not in BACKENDS:
            raise ValueError(f"{fn}: backend must be 'auto' or one of {BACKENDS}; got {self.backend!r}.")
        fused = tuple(TABLE["fused_linear_kd"])
        if self.loss == "fused" and self.backend not in ("auto", *fused):
            raise ValueError(
                f"{fn}: backend must be 'auto' or one of {fused} with loss='fused'; got {self.backend!r}, a backend "
                "of the loss on logits: add --loss logits (loss='logits') to use it."
            )
        if not (_int(self.val_samples) and self.val_samples >= 1):
            raise ValueError(
                f"{fn}: val_samples must be an int >= 1 (validation sequences per domain; paper: 500); "
                f"got {self.val_samples!r}."
            )
        if self.seq_len is not None and not (_int(self.seq_len) and self.seq_len >= 2):
            raise ValueError(f"{fn}: seq_len must be an int >= 2 (tokens per sequence); got {self.seq_len!r}.")
        for name in ("domain_field", "text_field"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{fn}: {name} must be a non-empty field (column) name; got {value!r}.")
        return self

    def distill_options(self) -> DistillOptions:
        """The ``DistillOptions`` part of this config (of a ``DDKConfig`` or a ``RunConfig`` alike)."""
        return DistillOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(DistillOptions)})


def _help_of(name: str) -> Any:
    """The metadata (help, choices) of a ``DistillOptions`` field, for a subclass that changes its default."""
    return DistillOptions.__dataclass_fields__[name].metadata


@dataclass
class RunConfig(DistillOptions):
    """``DistillOptions`` plus what the engine's loop (``ddk distill``) needs.

    Token budget of a run: ``steps * batch_size * seq_len`` tokens (or ``tokens``), identical for
    every method.
    """

    # --- models and data
    teacher: str = ""  # teacher folder (save_pretrained) or hub name
    teacher_cache: str = ""  # a `ddk teacher-cache` folder: distill from it, no teacher model (and no --data)
    top_k: int = 32  # `ddk teacher-cache`: teacher ids (and log-probabilities) stored per position
    student: str = ""  # student folder or hub name (its starting weights)
    tokenizer: str = ""  # tokenizer folder; "" = the student's folder
    data: tuple[str, ...] = ()  # training records: JSONL/JSON/Parquet/CSV files, save_to_disk folders, NAME=FILE
    validation_data: tuple[str, ...] = ()  # separate validation records ("" = a per-domain split of data)
    test_data: tuple[str, ...] = ()  # held-out test records: gaps reported at the end, never read by the mixture
    skip_bad_records: bool = False  # drop records without the domain or text field (counted, warned) instead of failing
    max_record_mb: float = 32.0  # a larger record (JSONL/CSV line, row) is a bad record: bounds reading's memory
    data_dir: str = "~/.cache/ddk"  # caches: packed token sequences (and the demo's corpus, models)
    seq_len: int | None = field(default=128, metadata=_help_of("seq_len"))  # defaults for a 2-core CPU
    interval: int = field(default=50, metadata=_help_of("interval"))
    eval_batch_size: int = 32
    # --- optimisation
    steps: int = 400
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    dtype: str = "auto"  # "bf16" (autocast, fp32 master weights; the CUDA default) or "fp32" (the CPU default)
    grad_accum: int = 1  # micro-batches per optimizer step (batch_size is split; exact global-token normaliser)
    gradient_checkpointing: bool = False  # recompute the student's activations in backward
    tokens: int = 0  # token budget; > 0 sets steps = ceil(tokens / (batch_size * seq_len))
    on_nonfinite: str = "raise"  # NaN/inf loss or gradient: "raise" (name step + domains) or "skip" the batch
    seed: int = 0
    # --- run folder
    out: str = ""  # run folder; "" = runs/real/<method>-s<seed>
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2  # keep the last k checkpoint-<step>/ folders of the run folder
    resume: bool = True
    threads: int = 0  # torch threads; 0 = leave torch's default
    num_proc: int = 0  # processes tokenizing the records when they are packed; 0 = the CPU count
    progress: bool = True
    report_to: str = field(
        default="none",
        metadata={
            "help": "where the run's scalars go besides metrics.jsonl: tensorboard (event files in <out>/tensorboard/), "
            "wandb (Weights & Biases; pip install wandb) or none. Per domain at each DDK interval: weight, student "
            "and teacher CE, gap, ratio; each logging step: loss, CE, KD, lr, tokens per domain, tokens/s",
            "choices": list(REPORT_TO),
        },
    )
    # --- many processes (torchrun --nproc_per_node=R: batch_size is the global batch, split over ranks)
    dist_backend: str = "auto"  # "auto" (nccl with CUDA, else gloo), "gloo", "nccl"
    fsdp: bool = False  # shard the student with FSDP2 (fully_shard) instead of DDP; needs torchrun
    # "cpu": the teacher's FSDP2 shards live in host memory, copied to the device block by block (needs fsdp)
    teacher_offload: Literal["none", "cpu"] = "none"
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
    def max_record_bytes(self) -> int:
        """``max_record_mb`` in bytes (MiB), the ``max_record_bytes`` of ``ddk.data.load_records``."""
        return max(1, int(self.max_record_mb * (1 << 20)))

    @property
    def sequence_length(self) -> int:
        """``seq_len`` (validated: an int >= 2)."""
        assert self.seq_len is not None  # validate() refuses None for a run
        return self.seq_len

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the run: ``steps``, or the ``tokens`` budget over ``batch_size * seq_len``."""
        if self.tokens > 0:
            return -(-self.tokens // (self.batch_size * self.sequence_length))
        return self.steps

    @property
    def uses_demo(self) -> bool:
        """True when no student is given: the bundled demo supplies teacher, student and data."""
        return not self.student

    @property
    def run_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs/real") / f"{self.method}-s{self.seed}"

    @property
    def spec(self) -> Any:
        """The method's ``MethodSpec``."""
        return method_spec(self.method)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}  # as JSON reads it back

    def run_dict(self) -> dict[str, Any]:
        """``to_dict()`` restricted to ``RunConfig``'s fields (what determines a distillation run)."""
        d = self.to_dict()
        return {f.name: d[f.name] for f in dataclasses.fields(RunConfig)}

    def hash_of(self, keys: typing.Iterable[str], extra: Any = None) -> str:
        """Short hash of the named fields (plus ``extra``): keys caches of derived artefacts."""
        d = self.to_dict()
        payload = {k: d[k] for k in keys}
        payload["extra"] = extra
        return json_fingerprint(payload)

    def validate(self, fn: str | None = None) -> RunConfig:
        """Check every value and the combinations of models and data; return self."""
        fn = fn or type(self).__name__
        self.check_options(fn)
        if self.seq_len is None:
            raise ValueError(f"{fn}: seq_len must be an int >= 2 (tokens per sequence); got None.")
        positive = ("top_k", "grad_accum", "eval_batch_size", "steps", "batch_size", "log_every", "checkpoint_every")
        for k in (*positive, "keep_checkpoints"):
            if getattr(self, k) < 1:
                raise ValueError(f"{fn}: {k} must be >= 1; got {getattr(self, k)!r}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"{fn}: dtype must be one of {DTYPES}; got {self.dtype!r}.")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"{fn}: batch_size must be a multiple of grad_accum={self.grad_accum} (the global batch is "
                f"split into micro-batches); got {self.batch_size}."
            )
        self._check_inputs(fn)
        self._check_sources(fn)
        if self.teacher_cache:
            check_cache_backend(self.backend, fn)
        if self.test_data and not self.teacher:
            raise ValueError(
                f"{fn}: test_data needs a teacher model (--teacher): the test gaps compare the student with the "
                f"teacher on records no cache holds; got teacher_cache={self.teacher_cache!r}."
            )
        self._absolute_paths()
        self._check_out(fn)
        for k in ("warmup_steps", "seed", "threads", "tokens", "num_proc"):
            if getattr(self, k) < 0:
                raise ValueError(f"{fn}: {k} must be >= 0; got {getattr(self, k)!r}.")
        if self.device not in DEVICES:
            raise ValueError(f"{fn}: device must be one of {DEVICES}; got {self.device!r}.")
        if self.dist_backend not in DIST_BACKENDS:
            raise ValueError(f"{fn}: dist_backend must be one of {DIST_BACKENDS}; got {self.dist_backend!r}.")
        if (self.device, self.dist_backend) in (("cpu", "nccl"), ("cuda", "gloo")):
            raise ValueError(
                f"{fn}: dist_backend must match device (gloo runs on the CPU, nccl on CUDA); got device "
                f"{self.device!r} with dist_backend {self.dist_backend!r}."
            )
        self._check_teacher_offload(fn)
        if self.report_to not in REPORT_TO:  # its package is checked when a run starts (ddk.engine.tracking)
            raise ValueError(f"{fn}: report_to must be one of {REPORT_TO}; got {self.report_to!r}.")
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"{fn}: on_nonfinite must be one of {NONFINITE_POLICIES}; got {self.on_nonfinite!r}.")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"{fn}: min_lr_ratio must be in [0, 1]; got {self.min_lr_ratio!r}.")
        if not self.lr > 0:
            raise ValueError(f"{fn}: lr must be > 0; got {self.lr!r}.")
        for k in ("weight_decay", "grad_clip"):
            if getattr(self, k) < 0:
                raise ValueError(f"{fn}: {k} must be >= 0; got {getattr(self, k)!r}.")
        if not (_number(self.max_record_mb) and 0 < self.max_record_mb <= 1 << 20):
            raise ValueError(
                f"{fn}: max_record_mb must be a number in (0, 1048576] (MiB per record); got {self.max_record_mb!r}."
            )
        return self

    def _check_teacher_offload(self, fn: str) -> None:
        """``teacher_offload="cpu"`` offloads the shards of a teacher model that FSDP2 shards: it needs
        ``fsdp`` and a teacher model (not a teacher cache)."""
        if self.teacher_offload not in TEACHER_OFFLOADS:
            raise ValueError(f"{fn}: teacher_offload must be one of {TEACHER_OFFLOADS}; got {self.teacher_offload!r}.")
        if self.teacher_offload == "none":
            return
        if self.teacher_cache:
            raise ValueError(
                f"{fn}: teacher_offload must be 'none' with teacher_cache (the cache replaces the teacher: no "
                f"teacher model is loaded, so none is offloaded); got teacher_offload={self.teacher_offload!r} with "
                f"teacher_cache={self.teacher_cache!r}. Drop --teacher-offload, or distill from --teacher and --data."
            )
        if self.student and not self.teacher:
            raise ValueError(
                f"{fn}: teacher_offload {self.teacher_offload!r} must have a teacher model to offload (--teacher); "
                f"got none (method {self.method!r} without a teacher). Drop --teacher-offload."
            )
        if not self.fsdp:
            raise ValueError(
                f"{fn}: teacher_offload {self.teacher_offload!r} must run with fsdp (FSDP2 keeps the teacher's shards "
                "in host memory and copies each block to the device for its forward); got fsdp=False. Launch with "
                "`torchrun --nproc_per_node=R -m ddk.recipes.cli distill --fsdp --teacher-offload cpu ...` "
                "(--nproc_per_node=1 on one GPU), or drop --teacher-offload."
            )

    def _absolute_paths(self) -> None:
        """Local paths made absolute (hub ids left as typed), so ``config.json`` and ``ddk evaluate``
        mean the same files from any working directory."""

        def local(p: str) -> str:
            q = Path(os.path.expanduser(p))
            return str(q.resolve()) if p and q.exists() else p

        def local_source(entry: str) -> str:
            src = data_source(entry)
            return f"{src[0]}={local(src[1])}" if isinstance(src, tuple) else local(entry)

        for k in ("teacher", "student", "tokenizer", "teacher_cache"):
            setattr(self, k, local(getattr(self, k)))
        self.data = tuple(local_source(p) for p in self.data)
        self.validation_data = tuple(local_source(p) for p in self.validation_data)
        self.test_data = tuple(local_source(p) for p in self.test_data)
        self.data_dir = str(Path(os.path.expanduser(self.data_dir)).absolute())
        if self.out:
            self.out = str(Path(os.path.expanduser(self.out)).absolute())

    def _check_out(self, fn: str) -> None:
        """``out`` is neither one of the inputs nor inside or around one (a fresh start moves the
        run's files aside: in a model folder that would move its ``config.json``)."""
        if not self.out:
            return
        out = Path(self.out).resolve()
        named = {k: getattr(self, k) for k in ("teacher", "student", "tokenizer", "teacher_cache")}
        for key in ("data", "test_data"):
            for i, entry in enumerate(getattr(self, key)):
                src = data_source(entry)
                named[f"{key}[{i}]"] = src[1] if isinstance(src, tuple) else entry
        for key, value in named.items():
            p = Path(os.path.expanduser(value)).resolve() if value else None
            if p is not None and p.exists() and (p == out or out in p.parents or p in out.parents):
                raise ValueError(
                    f"{fn}: out must be a folder apart from the inputs; got out={self.out!r}, which is, holds or is "
                    f"inside {key}={value!r}. Pass another --out (e.g. a new folder beside it)."
                )
        caches = Path(os.path.expanduser(self.data_dir)).resolve()
        if out == caches or caches / "packed" in (out, *out.parents):
            raise ValueError(
                f"{fn}: out must be a folder apart from the caches; got out={self.out!r}, which is data_dir "
                f"{str(caches)!r} or inside its packed/ caches. Pass another --out (e.g. runs/<name>)."
            )

    def _check_inputs(self, fn: str) -> None:
        """Which of teacher, teacher_cache, student and data go together."""
        if self.teacher_cache:
            if self.teacher or self.data or not self.student:
                raise ValueError(
                    f"{fn}: teacher_cache needs student and replaces teacher and data (the cache holds the "
                    f"sequences and the teacher's top-k); got teacher={self.teacher!r}, student={self.student!r}, "
                    f"data={list(self.data)}."
                )
        elif (
            (self.student and not self.data)
            or (self.data and not (self.student or self.teacher))
            or (self.teacher and not self.data)
        ):  # teacher + data alone: `ddk teacher-cache`
            raise ValueError(
                f"{fn}: teacher, student and data must be given together (or none of them, for the "
                f"bundled demo); got teacher={self.teacher!r}, student={self.student!r}, data={list(self.data)}."
            )
        if self.student and not (self.teacher or self.teacher_cache) and self.spec.teacher:
            raise ValueError(
                f"{fn}: teacher must be given for method {self.method!r} (only cpt trains without one); "
                f"got none. Pass --teacher PATH (or --teacher-cache DIR)."
            )

    def _check_sources(self, fn: str) -> None:
        """``NAME=FILE`` entries of the record options name a domain and a file; with a teacher cache
        (which holds the sequences, the validation sets and the teacher's CE) no record option is set."""
        for key in ("data", "validation_data", "test_data"):
            for entry in getattr(self, key):
                src = data_source(entry)
                if isinstance(src, tuple) and not (src[0] and src[1]):
                    raise ValueError(
                        f"{fn}: {key} entries of the form NAME=FILE must name a domain and a file; got {entry!r}."
                    )
        if not self.teacher_cache:
            return
        defaults = RunConfig()
        unused = [
            k
            for k in ("validation_data", "text_field", "domain_field", "skip_bad_records", "max_record_mb")
            if getattr(self, k) != getattr(defaults, k)
        ]
        if unused:
            flags = ", ".join("--" + k.replace("_", "-") for k in unused)
            raise ValueError(
                f"{fn}: {unused[0]} must be left out with teacher_cache (the cache holds the sequences and the "
                f"validation sets it was built from; no record is read); got {unused[0]}="
                f"{_shown(getattr(self, unused[0]))}. Drop {flags}, or pass them to `ddk teacher-cache`."
            )


def _shown(value: Any) -> str:
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


def data_source(entry: str) -> str | tuple[str, str]:
    """A ``data``, ``validation_data`` or ``test_data`` entry as ``ddk.data.load_records`` takes it:
    ``"NAME=FILE"`` is ``(NAME, FILE)``, every record of FILE in domain NAME (whatever its domain
    field); a path is itself, and so is an existing path holding ``=`` or an entry whose part
    before the first ``=`` holds a path separator (``data/lang=en/part.parquet``).

    Examples:
        >>> data_source("code=data/code.jsonl"), data_source("data/all.jsonl")
        (('code', 'data/code.jsonl'), 'data/all.jsonl')
    """
    if "=" in entry and not Path(os.path.expanduser(entry)).exists():
        name, path = entry.split("=", 1)
        if "/" not in name and "\\" not in name:
            return name, path
    return entry


def check_cache_backend(backend: str, fn: str) -> None:
    """A run from a teacher cache uses the sparse losses: ``backend`` must be one of theirs."""
    from ddk_kernels.dispatch import TABLE

    sparse = tuple(TABLE["sparse_kd"])
    if backend not in ("auto", *sparse):
        raise ValueError(
            f"{fn}: backend must be 'auto' or one of {sparse} with a teacher cache (the sparse losses); got {backend!r}."
        )


def coerce_field(cls: type, name: str, value: Any) -> Any:
    """``value`` (from YAML or JSON) converted to the type of field ``name`` of dataclass ``cls``,
    or a ``ValueError`` in the house format."""
    fn = cls.__name__
    hint = typing.get_type_hints(cls)[name]
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    if origin is typing.Literal:  # a closed set of strings (teacher_offload)
        if value not in args:
            raise ValueError(f"{fn}: {name} must be one of {args}; got {value!r}.")
        return value
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


def config_from_dict(cls: type, values: dict[str, Any], *, ignore_unknown: bool = False) -> Any:
    """A validated ``cls`` (``RunConfig`` or a subclass) from a mapping of field values.

    Unknown keys are an error naming them, or dropped with ``ignore_unknown`` (a run folder's
    ``config.json`` written by a client that adds its own options)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown and not ignore_unknown:
        raise ValueError(f"{cls.__name__}: options must be known; got unknown {unknown} (valid: {sorted(names)}).")
    cfg = cls(**{k: coerce_field(cls, k, v) for k, v in values.items() if k in names})
    return cfg.validate()
