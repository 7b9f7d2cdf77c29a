"""DDK inside ``transformers.Trainer``: ``DDKConfig``, ``DDKTrainer`` and its ``DDKCallback``.

One call distills a student from a teacher on a domain-labelled corpus::

    trainer = DDKTrainer(model=student, teacher=teacher, args=DDKConfig(..., seq_len=512, max_steps=N),
                         train_dataset=records, processing_class=tokenizer)
    trainer.train()

What the trainer builds from ``records`` (a ``datasets.Dataset`` with a domain column and a text
column, or a pre-tokenized ``input_ids`` column):

* ``ddk.data.pack_domains``: per-domain train/validation split (``val_samples`` per domain),
  fixed-length sequences packed *within* each domain. The domain of every sequence comes from the
  domain column (any hashable values, e.g. strings); domains are numbered in sorted name order.
* ``MixtureSampler`` over the packed domains (global batch = ``per_device_train_batch_size *
  world_size``, seed = ``data_seed`` or else ``seed``), driving the ``DataLoader`` as its
  ``batch_sampler`` in the main process (it already slices ranks, so accelerate does not shard the
  loader again).
* ``DiscrepancyEstimator`` on the per-domain validation split (or on ``eval_dataset``),
  the method's weight schedule (``ddk.schedule.make_scheduler``) and ``DDKController`` (interval K).

``compute_loss`` returns ``causal_lm_kd_loss`` (``CE + gamma * D(p_T, p_S)``, fused with the
``lm_head`` by default, so no ``(B * L, V)`` logits exist) with one domain id per sequence, divided
by the number of valid shifted target tokens of the *whole accumulated batch* over all ranks, so
gradient accumulation and data parallelism weight every token equally (see ``DDKTrainer``). Under
a data-parallel wrapper (``DistributedDataParallel``, accelerate's, DeepSpeed's) the fused loss
calls the wrapper's ``forward`` for the hidden states (no logits), so the wrapper synchronises
the gradients; a student sharded in place with FSDP2 needs ``loss="logits"``.

``DDKCallback`` starts the controller at ``on_train_begin`` (Eq. 1), calls
``controller.step_end(global_step, model)`` at ``on_step_end`` (Eq. 2 every ``interval`` steps)
and, inside each checkpoint's save (before ``save_total_limit`` rotates older checkpoints away,
so the newest checkpoint is always resumable), writes ``ddk_state.json`` (the controller's state
at the first global batch not yet consumed) and this process's random-number-generator states
(``ddk_rng_state[_<rank>].safetensors``) into the checkpoint folder. ``train(resume_from_checkpoint=
...)`` loads both back, so data, weights of the mixture and dropout masks continue exactly; the
Trainer's own data skipping is switched off (``ignore_data_skip``), since the sampler's state
already says where the data stream is.

Low-level form: ``DDKTrainer(model=..., args=..., train_dataset=<map dataset indexed by the
sampler's global index>, teacher=..., controller=<DDKController>)`` uses a controller built by
hand; item ``i`` belongs to ``controller.sampler.domain_of(i)`` (and an item's own ``domain_id``,
if it has one, must agree).

``transformers`` is imported only when this module is.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ddk._io import atomic_write_text, fsync_file
from ddk.controller import DDKController
from ddk.discrepancy.estimator import DiscrepancyEstimator
from ddk.distributed import is_fsdp
from ddk.losses.fused import causal_lm_kd_loss
from ddk.sampling.mixture import MixtureSampler
from ddk.schedule import ADAPTIVE_METHODS, METHODS, make_scheduler
from ddk.schedule.smoother import SMOOTHER_INITS
from ddk_kernels.types import DIVERGENCES

__all__ = [
    "DDK_LOG_NAME",
    "DDK_RNG_STATE_NAME",
    "DDK_STATE_NAME",
    "METHODS",
    "DDKCallback",
    "DDKConfig",
    "DDKTrainer",
    "load_rng_state",
    "save_rng_state",
]

logger = logging.getLogger(__name__)

DDK_STATE_NAME = "ddk_state.json"
DDK_RNG_STATE_NAME = "ddk_rng_state.safetensors"  # one process; rank r of several: ddk_rng_state_<r>.safetensors
DDK_LOG_NAME = "ddk_log.jsonl"
LOSSES: tuple[str, ...] = ("fused", "logits")
_INDEX_KEY = "ddk_index"
# Wrappers whose forward sets up gradient synchronisation or parameter gathering.
_BATCH_KEYS = ("input_ids", "attention_mask", "labels")
_CACHED_KEYS = ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail")  # a teacher cache's batch


# ---------------------------------------------------------------------------- configuration
def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class DDKConfig(TrainingArguments):
    """``TrainingArguments`` plus the options of DDK (paper defaults), for ``DDKTrainer``.

    Every ``TrainingArguments`` field keeps its meaning; ``max_steps`` must be set (the mixture
    sampler's stream is infinite). The fields below are validated in ``__post_init__`` and parse
    from the command line with ``HfArgumentParser`` like the others.

    Examples:
        >>> cfg = DDKConfig(output_dir="out", max_steps=10, seq_len=128, method="ddk", report_to="none")
        >>> cfg.gamma, cfg.interval, cfg.divergence
        (0.2, 1000, 'forward_kl')
    """

    gamma: float = field(
        default=0.2, metadata={"help": "Weight of the divergence term: loss = CE + gamma * D (paper: 0.2)."}
    )
    temperature: float = field(
        default=1.0, metadata={"help": "Temperature T of the divergence; CE stays at T = 1 (paper: 1.0)."}
    )
    divergence: str = field(
        default="forward_kl",
        metadata={
            "help": "forward_kl = KL(p_T || p_S) (the paper's), reverse_kl = KL(p_S || p_T), or jsd (JSD(beta)).",
            "choices": list(DIVERGENCES),
        },
    )
    beta: float = field(
        default=0.5, metadata={"help": "beta of JSD(beta) in [0, 1] (0 = forward KL, 1 = reverse KL); jsd only."}
    )
    alpha: float = field(
        default=0.5,
        metadata={"help": "Smoothing weight of Eq. 2 in (0, 1]; (1 - alpha) / N is every domain's floor (paper: 0.5)."},
    )
    interval: int = field(
        default=1000, metadata={"help": "K: optimizer steps between domain-weight updates (paper: 1000)."}
    )
    val_samples: int = field(
        default=500, metadata={"help": "Held-out validation sequences per domain for the discrepancy (paper: 500)."}
    )
    domain_column: str = field(
        default="domain",
        metadata={
            "help": "Column of train_dataset holding each record's domain (strings or other values, named by str())."
        },
    )
    text_column: str = field(
        default="text",
        metadata={
            "help": "Column of train_dataset holding the text (a pre-tokenized input_ids column is used instead when "
            "present)."
        },
    )
    seq_len: int | None = field(
        default=None,
        metadata={
            "help": "Tokens per packed training sequence (required: text and input_ids rows are both packed, an EOS "
            "after each document)."
        },
    )
    method: str = field(
        default="ddk",
        metadata={
            "help": "kd: uniform domain mixture; ddk: Eq. 1 + smoothed Eq. 2 updates; ddk-no-smoothing: softmax of the "
            "ratios at every update; ddk-online: ddk estimated from the training batches; kd-doremi: KD with "
            "DoReMi's exponentiated-gradient reweighting; cpt: continued pretraining (CE only, no teacher, uniform "
            "mixture).",
            "choices": list(METHODS),
        },
    )
    ddk_init: str = field(
        default="discrepancy",
        metadata={
            "help": "First interval's weights: discrepancy (Eq. 1, r_0 = softmax(ppl_S / ppl_T)) or uniform.",
            "choices": list(SMOOTHER_INITS),
        },
    )
    doremi_step_size: float = field(
        default=1.0, metadata={"help": "kd-doremi: step size eta of the exponentiated-gradient update (DoReMi: 1.0)."}
    )
    doremi_smoothing: float = field(
        default=1e-3, metadata={"help": "kd-doremi: weight c in [0, 1] of the uniform mixture mixed in (DoReMi: 1e-3)."}
    )
    loss: str = field(
        default="fused",
        metadata={
            "help": "fused: loss fused with the lm_head, never forming the (tokens, vocab) logits; logits: from the "
            "models' full logits (needed under DDP/FSDP/DeepSpeed wrappers).",
            "choices": list(LOSSES),
        },
    )
    kd_backend: str = field(
        default="auto",
        metadata={
            "help": "Loss backend (auto, chunked, cpp, triton, reference); auto picks the fastest available (`ddk backends` lists them)."
        },
    )
    pack_cache_dir: str | None = field(
        default=None, metadata={"help": "Folder caching the packed token sequences (keyed by content); None: no cache."}
    )

    def __post_init__(self) -> None:
        fn = "DDKConfig"
        if not (_is_number(self.gamma) and self.gamma >= 0):
            raise ValueError(f"{fn}: gamma must be a finite number >= 0 (paper: 0.2); got {self.gamma!r}.")
        if not (_is_number(self.temperature) and self.temperature > 0):
            raise ValueError(f"{fn}: temperature must be a finite number > 0 (paper: 1.0); got {self.temperature!r}.")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"{fn}: divergence must be one of {DIVERGENCES}; got {self.divergence!r}.")
        if not (_is_number(self.beta) and 0.0 <= self.beta <= 1.0):
            raise ValueError(f"{fn}: beta must be a number in [0, 1]; got {self.beta!r}.")
        if not (_is_number(self.alpha) and 0.0 < self.alpha <= 1.0):
            raise ValueError(f"{fn}: alpha must be a number in (0, 1] (paper: 0.5); got {self.alpha!r}.")
        if not (_is_int(self.interval) and self.interval >= 1):
            raise ValueError(
                f"{fn}: interval must be an int >= 1 (optimizer steps between updates; paper: 1000); got {self.interval!r}."
            )
        if not (_is_int(self.val_samples) and self.val_samples >= 1):
            raise ValueError(
                f"{fn}: val_samples must be an int >= 1 (validation sequences per domain; paper: 500); "
                f"got {self.val_samples!r}."
            )
        for name in ("domain_column", "text_column"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{fn}: {name} must be a non-empty column name; got {value!r}.")
        if self.seq_len is not None and not (_is_int(self.seq_len) and self.seq_len >= 2):
            raise ValueError(f"{fn}: seq_len must be None or an int >= 2 (tokens per sequence); got {self.seq_len!r}.")
        if self.method not in METHODS:
            raise ValueError(f"{fn}: method must be one of {METHODS}; got {self.method!r}.")
        if not (_is_number(self.doremi_step_size) and self.doremi_step_size > 0):
            raise ValueError(
                f"{fn}: doremi_step_size must be a number > 0 (DoReMi: 1.0); got {self.doremi_step_size!r}."
            )
        if not (_is_number(self.doremi_smoothing) and 0.0 <= self.doremi_smoothing <= 1.0):
            raise ValueError(
                f"{fn}: doremi_smoothing must be a number in [0, 1] (DoReMi: 1e-3); got {self.doremi_smoothing!r}."
            )
        if self.ddk_init not in SMOOTHER_INITS:
            raise ValueError(f"{fn}: ddk_init must be one of {SMOOTHER_INITS}; got {self.ddk_init!r}.")
        if self.loss not in LOSSES:
            raise ValueError(f"{fn}: loss must be one of {LOSSES}; got {self.loss!r}.")
        if not isinstance(self.kd_backend, str) or not self.kd_backend:
            raise ValueError(f"{fn}: kd_backend must be a backend name such as 'auto'; got {self.kd_backend!r}.")
        if self.pack_cache_dir is not None and not isinstance(self.pack_cache_dir, (str, os.PathLike)):
            raise ValueError(f"{fn}: pack_cache_dir must be None or a folder path; got {self.pack_cache_dir!r}.")
        super().__post_init__()


# ---------------------------------------------------------------------------- data
class _IndexedDataset(Dataset[dict[str, Any]]):
    """Adds the sampler's global index to each item (checked against the item's own domain)."""

    def __init__(self, base: Any) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.base[i]
        if not isinstance(item, Mapping):
            raise TypeError(
                f"DDKTrainer: train_dataset items must be dicts (e.g. {{'input_ids': ...}}); got {type(item).__name__}."
            )
        return {**item, _INDEX_KEY: int(i)}


class _DomainBatcher:
    """The ``collate_fn``: batches items and attaches ``domain_ids`` ``(B,)`` int64 and ``labels``.

    Training items carry the sampler's global index; their domain is the item's ``domain_id`` (the
    domain column, through ``pack_domains``), which must equal the domain of the index in the
    sampler's layout (``domain_bounds``), or, for items without one, that domain. Evaluation items
    (no index) keep their ``domain_id`` if every item has one. ``labels`` default to ``input_ids``
    with padding (``attention_mask == 0``) set to -100, unshifted.
    """

    def __init__(
        self, collate: Any, domain_bounds: Sequence[int], domain_names: Sequence[str], keeps_domain_id: bool
    ) -> None:
        self.collate = collate
        self.bounds = np.asarray(domain_bounds, dtype=np.int64)  # end (exclusive) of each domain's indices
        self.names = tuple(domain_names)
        self.keeps_domain_id = keeps_domain_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        index = [f.get(_INDEX_KEY) for f in features]
        own = [f.get("domain_id") for f in features]
        if all(i is not None for i in index):
            layout = np.searchsorted(self.bounds, np.asarray(index, dtype=np.int64), side="right")
            for i, d, s in zip(index, own, layout.tolist()):
                if d is not None and int(d) != s:
                    raise ValueError(
                        f"DDKTrainer: train_dataset item {i} must belong to domain {self.names[s]!r} (the sampler's "
                        f"domain of global index {i}: items ordered by domain, in the sampler's domain order); got "
                        f"domain_id {int(d)}."
                    )
            domains: list[int] | None = layout.tolist()
        elif all(d is not None for d in own):
            domains = [int(d) for d in own if d is not None]
        else:
            domains = None
        per_item: list[int | None] = [None] * len(features) if domains is None else list(domains)
        items = []
        for f, d in zip(features, per_item):
            item = {k: v for k, v in f.items() if k not in (_INDEX_KEY, "domain_id")}
            if self.keeps_domain_id:
                item["domain_id"] = d if d is not None else 0
            items.append(item)
        batch = dict(self.collate(items))
        batch.pop("domain_id", None)
        if domains is not None:
            batch["domain_ids"] = torch.tensor(domains, dtype=torch.long)
        else:
            batch.pop("domain_ids", None)
        if batch.get("labels") is None:
            ids = batch["input_ids"]
            mask = batch.get("attention_mask")
            batch["labels"] = ids.clone() if mask is None else ids.masked_fill(mask == 0, -100)
        if all(i is not None for i in index):
            batch[_INDEX_KEY] = torch.tensor(index, dtype=torch.long)
        return batch


class _ValidationDataset(Dataset[dict[str, Any]]):
    """One domain's validation sequences as items ``{"input_ids": (L,), "domain_id": d}`` (for ``evaluate``)."""

    def __init__(self, batches: Sequence[Mapping[str, torch.Tensor]], domain_id: int) -> None:
        self.rows = [r for b in batches for r in b["input_ids"]]
        self.domain_id = domain_id

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.rows[i], "domain_id": self.domain_id}


# ---------------------------------------------------------------------------- random states
def _rng_file(folder: str | os.PathLike[str], process_index: int, world_size: int) -> Path:
    name = (
        DDK_RNG_STATE_NAME
        if world_size <= 1
        else DDK_RNG_STATE_NAME.replace(".safetensors", f"_{process_index}.safetensors")
    )
    return Path(folder) / name


def save_rng_state(path: str | os.PathLike[str]) -> Path:
    """Write the python, numpy, torch CPU and CUDA generator states to ``path`` (safetensors).

    Tensors only (uint8 torch states, int64 Mersenne-twister keys); the scalars ride in the
    safetensors metadata as JSON. Nothing is pickled. Written through a temporary file, ``fsync``-ed.
    """
    from safetensors.torch import save_file

    py_version, py_key, py_gauss = random.getstate()
    np_name, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {
        "python.key": torch.tensor(py_key, dtype=torch.int64),
        "numpy.key": torch.from_numpy(np.asarray(np_key, dtype=np.int64)),
        "torch.cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch.cuda.{i}"] = s
    meta = {
        "ddk": json.dumps(
            {"python": [py_version, py_gauss], "numpy": [np_name, int(np_pos), int(np_has_gauss), float(np_gauss)]}
        )
    }
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    fsync_file(tmp)
    os.replace(tmp, p)
    return p


def load_rng_state(path: str | os.PathLike[str]) -> None:
    """Restore the generator states written by ``save_rng_state`` (CUDA ones when CUDA is present)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {})["ddk"])
        t = {k: f.get_tensor(k) for k in f.keys()}
    py_version, py_gauss = meta["python"]
    random.setstate((py_version, tuple(int(x) for x in t["python.key"].tolist()), py_gauss))
    np_name, np_pos, np_has_gauss, np_gauss = meta["numpy"]
    np.random.set_state((np_name, t["numpy.key"].numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(t["torch.cpu"])
    cuda = sorted((k for k in t if k.startswith("torch.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        for k in cuda[: torch.cuda.device_count()]:
            torch.cuda.set_rng_state(t[k], device=int(k.rsplit(".", 1)[1]))


# ---------------------------------------------------------------------------- callback
class DDKCallback(TrainerCallback):
    """Starts, steps and checkpoints a ``DDKController`` alongside a ``DDKTrainer``."""

    def __init__(self, trainer: DDKTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        tr = self.trainer
        if not tr.adaptive:
            return
        if not tr.controller.estimator.has_teacher_ce:
            assert tr.teacher is not None  # only method='cpt' has no teacher, and it is not adaptive
            tr.controller.estimator.compute_teacher(tr.teacher)
        if not tr.controller.started:
            tr.controller.start(tr.accelerator.unwrap_model(tr.model))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        tr = self.trainer
        if tr.adaptive:
            tr.controller.step_end(int(state.global_step), tr.accelerator.unwrap_model(tr.model))

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Normally written already inside the checkpoint's save, before transformers rotates old
        # checkpoints (``DDKTrainer._save_rng_state``); here only when that hook did not run
        # (``save_only_model``).
        tr = self.trainer
        folder = Path(tr._get_output_dir(None)) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not (folder / DDK_STATE_NAME).is_file():
            tr._save_ddk_state(folder)


# ---------------------------------------------------------------------------- trainer
def _vocab_rows(model: torch.nn.Module) -> int | None:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor):
        return int(weight.shape[0])
    v = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(v) if v is not None else None


class DDKTrainer(Trainer):
    """A ``transformers.Trainer`` that distills a student from a frozen teacher with DDK.

    One call (``controller=None``): give ``train_dataset`` as a ``datasets.Dataset`` (or a list of
    dicts) with ``args.domain_column`` and either ``args.text_column`` (tokenized with
    ``processing_class``, packed to ``args.seq_len`` tokens) or a pre-tokenized ``input_ids``
    column (each row a document, packed the same way by ``pack_domains``, an EOS after each; a
    text column kept beside it is the split key). The domain column may hold strings or any hashable values; domains are
    numbered in sorted name order. The trainer builds the packed domains, the ``MixtureSampler``,
    the ``DiscrepancyEstimator`` (per-domain validation split of ``args.val_samples`` sequences,
    or ``eval_dataset`` ``{domain: Dataset}`` of the same columns), the method's weight schedule and the
    ``DDKController``, and passes the per-domain validation sets to ``Trainer`` as its
    ``eval_dataset`` (``evaluate()`` reports ``eval_<domain>_loss``).

    Low-level form: pass ``controller`` (a ``DDKController`` whose sampler has
    ``global_batch_size == per_device_train_batch_size * world_size``) and a map-style
    ``train_dataset`` indexed by the sampler's global index (items: dicts with ``input_ids``
    ``(L,)``, optional ``attention_mask``, ``labels``, ``domain_id``); ``args`` may then be plain
    ``TrainingArguments`` (the ``DDKConfig`` defaults apply to the loss).

    The loss on a micro-batch ``input_ids`` ``(B, L)``: ``causal_lm_kd_loss`` of the student and
    the teacher (``args.loss="fused"``: fused with the ``lm_head``, no ``(B * L, V)`` tensor;
    ``"logits"``: from the full logits), labels shifted inside, one domain id per sequence.
    In training it is ``(sum CE + gamma * sum D) * R / N``, with ``N`` the valid shifted target
    tokens of the whole accumulated batch on all ``R`` ranks (the Trainer's
    ``num_items_in_batch``, counted here over all ranks) and ``R`` the number of processes, which
    DDP/FSDP/DeepSpeed average over: the gradient of an optimizer step is exactly that of one
    process on the whole global batch, whatever the per-micro-batch token counts. In evaluation
    it is the mean over the batch's valid tokens. ``method="cpt"`` needs no teacher (CE only).

    The teacher is moved to the trainer's device, put in eval mode, frozen and prepared through
    accelerate (``prepare_model(..., evaluation_mode=True)``); it is never differentiated.

    Args:
        model: the student (a transformers causal LM).
        args: ``DDKConfig`` (required in the one-call form).
        data_collator: optional; default ``ddk.data.DomainCollator`` (pads ragged items with the
            tokenizer's pad id and masks them). Its batches get ``domain_ids`` ``(B,)`` and default
            ``labels`` added (items reach a collator other than ``DomainCollator`` without
            ``domain_id``).
        train_dataset: see above.
        eval_dataset: one-call form: None (the per-domain split) or ``{domain: Dataset}``.
        processing_class: the tokenizer shared by student and teacher.
        teacher_cache: a ``ddk teacher-cache`` folder (or an opened ``ddk.data.TeacherCache``) instead
            of ``teacher`` and ``train_dataset``: its sequences, its top-k teacher (the sparse loss of
            ``ddk.fused_linear_sparse_kd_loss``) and its exact per-domain teacher CE; checked against
            ``processing_class``, ``args.temperature`` and ``args.seq_len``.
        teacher: the frozen teacher (same tokenizer; a larger padded vocabulary is sliced); None
            only with ``method="cpt"``.
        controller: low-level form only.
        **kwargs: further ``Trainer`` arguments (``callbacks``, ``optimizers``, ...).

    Raises:
        ValueError, TypeError: on a missing column, a vocabulary mismatch, a missing teacher, a
            bad batch size or configuration, before anything is trained.

    Examples:
        >>> # import datasets, transformers
        >>> # from ddk.integrations.transformers import DDKConfig, DDKTrainer
        >>> # tok = transformers.AutoTokenizer.from_pretrained("my-student")
        >>> # student = transformers.AutoModelForCausalLM.from_pretrained("my-student")
        >>> # teacher = transformers.AutoModelForCausalLM.from_pretrained("my-teacher")
        >>> # records = datasets.load_dataset("json", data_files="corpus.jsonl")["train"]  # text, domain
        >>> # args = DDKConfig(output_dir="run", max_steps=10_000, per_device_train_batch_size=8,
        >>> #                  learning_rate=1e-4, seq_len=1024, interval=1000, gamma=0.2,
        >>> #                  save_steps=1000, report_to="none")
        >>> # trainer = DDKTrainer(model=student, teacher=teacher, args=args,
        >>> #                      train_dataset=records, processing_class=tok)
        >>> # trainer.train()                          # after a crash: trainer.train(resume_from_checkpoint=True)
        >>> # trainer.save_model("run/final")
    """

    loss_is_scaled_for_ga = True  # compute_loss divides by the whole accumulated batch's token count

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        args: TrainingArguments | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        *,
        teacher: torch.nn.Module | None = None,
        controller: DDKController | None = None,
        teacher_cache: Any = None,
        **kwargs: Any,
    ) -> None:
        fn = "DDKTrainer"
        cache = self._open_cache(teacher_cache, teacher, train_dataset, controller, processing_class, args)
        if args is None:
            raise TypeError(f"{fn}: args must be a DDKConfig (output_dir, max_steps, seq_len, ...); got None.")
        if not isinstance(args, TrainingArguments):
            raise TypeError(f"{fn}: args must be a DDKConfig; got {type(args).__name__}.")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"{fn}: model must be the student, a torch.nn.Module; got {type(model).__name__}.")
        cfg = args if isinstance(args, DDKConfig) else None
        self.method = cfg.method if cfg is not None else "ddk"
        if teacher is None and cache is None and self.method != "cpt":
            raise ValueError(
                f"{fn}: teacher (or teacher_cache) must be given for method={self.method!r} (only method='cpt', "
                "continued pretraining, trains without one); got None."
            )
        if teacher is not None and self.method == "cpt":
            raise ValueError(
                f"{fn}: teacher must be None with method='cpt' (continued pretraining uses no teacher); got a teacher."
            )
        if teacher is not None and not isinstance(teacher, torch.nn.Module):
            raise TypeError(f"{fn}: teacher must be a torch.nn.Module; got {type(teacher).__name__}.")
        self._check_vocabularies(model, teacher, processing_class)
        self.adaptive = self.method in ADAPTIVE_METHODS
        defaults = DDKConfig.__dataclass_fields__

        def opt(name: str) -> Any:
            return getattr(cfg, name) if cfg is not None else defaults[name].default

        self.loss_mode: str = opt("loss")
        self._loss_options: dict[str, Any] = dict(
            gamma=0.0 if self.method == "cpt" else float(opt("gamma")),
            temperature=float(opt("temperature")),
            divergence=opt("divergence"),
            beta=float(opt("beta")),
            backend=opt("kd_backend"),
        )

        if controller is None:
            if cfg is None:
                raise TypeError(
                    f"{fn}: args must be a DDKConfig when no controller is given (it carries seq_len, method, ...); "
                    f"got {type(args).__name__}."
                )
            if args.max_steps is None or args.max_steps <= 0:
                raise ValueError(
                    f"{fn}: args.max_steps must be set > 0 (the domain-mixture stream is infinite); got {args.max_steps!r}."
                )
            if cache is not None:  # the sequences, the teacher's top-k and its CE come from the cache
                packed, train_ds = cache, cache.train_dataset()
                validation, names = cache.validation_batches(cfg.per_device_eval_batch_size), tuple(cache.names)
            else:
                packed, train_ds, validation, names = self._pack(cfg, train_dataset, eval_dataset, processing_class)
            controller = self._build_controller(cfg, packed, validation, names)
            if cache is not None:
                controller.estimator.teacher_ce = cache.teacher_ce
            eval_sets = {n: _ValidationDataset(validation[n], d) for d, n in enumerate(names)}
            self.packed = packed
        else:
            if not isinstance(controller, DDKController):
                raise TypeError(f"{fn}: controller must be a DDKController; got {type(controller).__name__}.")
            if controller.online != (self.method == "ddk-online") and cfg is not None and self.adaptive:
                raise ValueError(
                    f"{fn}: controller.online must match args.method={self.method!r}; got online={controller.online}."
                )
            sampler = controller.sampler
            per_rank = sampler.global_batch_size // sampler.world_size
            if per_rank != args.per_device_train_batch_size:
                raise ValueError(
                    f"{fn}: controller.sampler.global_batch_size / world_size must equal "
                    f"per_device_train_batch_size={args.per_device_train_batch_size}; got {per_rank}."
                )
            if train_dataset is not None and hasattr(train_dataset, "__len__"):
                total = sum(sampler.domain_sizes)
                if len(train_dataset) != total:
                    raise ValueError(
                        f"{fn}: train_dataset must hold sum(sampler.domain_sizes)={total} examples; "
                        f"got {len(train_dataset)}."
                    )
            train_ds, eval_sets = train_dataset, eval_dataset
            self.packed = None
        sampler = controller.sampler
        names = tuple(sampler.domain_names)
        bounds = np.cumsum(np.asarray(sampler.domain_sizes, dtype=np.int64)).tolist()
        from ddk.data.packing import DomainCollator
        from ddk.data.teacher_cache import TeacherCacheCollator

        if data_collator is None and cache is not None:
            data_collator = TeacherCacheCollator()
        if data_collator is None:
            data_collator = DomainCollator(pad_token_id=getattr(processing_class, "pad_token_id", None))
        batcher = _DomainBatcher(
            data_collator,
            bounds,
            names,
            keeps_domain_id=isinstance(data_collator, (DomainCollator, TeacherCacheCollator)),
        )

        super().__init__(
            model=model,
            args=args,
            data_collator=batcher,
            train_dataset=train_ds,
            eval_dataset=eval_sets,
            processing_class=processing_class,
            **kwargs,
        )
        self.controller = controller
        self.num_domains = len(names)
        self.teacher = self._prepare_teacher(teacher)
        self.args.ignore_data_skip = True  # the sampler state says where the stream is
        self.model_accepts_loss_kwargs = False  # the Trainer neither counts tokens nor rescales: we do
        self._pending_rng: Path | None = None
        self.add_callback(DDKCallback(self))

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _check_vocabularies(student: torch.nn.Module, teacher: torch.nn.Module | None, tokenizer: Any) -> None:
        fn = "DDKTrainer"
        vs = _vocab_rows(student)
        vt = _vocab_rows(teacher) if teacher is not None else None
        if vs is not None and vt is not None and vt < vs:
            raise ValueError(
                f"{fn}: teacher must have at least the student's vocabulary of V={vs} rows (the same tokenizer; a "
                f"larger padded teacher vocabulary is sliced); got {vt}."
            )
        if tokenizer is not None and hasattr(tokenizer, "__len__"):
            n = len(tokenizer)
            for who, v in (("student", vs), ("teacher", vt)):
                if v is not None and n > v:
                    raise ValueError(
                        f"{fn}: processing_class must be the tokenizer of the student and the teacher (at most the "
                        f"{who}'s {v} vocabulary rows); got a tokenizer of {n} tokens."
                    )

    @staticmethod
    def _open_cache(
        teacher_cache: Any, teacher: Any, train_dataset: Any, controller: Any, tokenizer: Any, args: Any
    ) -> Any:
        """The ``TeacherCache`` of ``teacher_cache`` (a folder or an opened cache), checked, or None."""
        if teacher_cache is None:
            return None
        from ddk.data.packing import tokenizer_hash
        from ddk.data.teacher_cache import TeacherCache

        fn = "DDKTrainer"
        if teacher is not None or train_dataset is not None or controller is not None:
            raise ValueError(
                f"{fn}: teacher_cache replaces teacher, train_dataset and controller (the cache holds the "
                "sequences, the teacher's top-k and its per-domain CE); got one of them as well."
            )
        cache = teacher_cache if isinstance(teacher_cache, TeacherCache) else TeacherCache(teacher_cache)
        seq_len = getattr(args, "seq_len", None)
        cache.check(
            tokenizer_hash=tokenizer_hash(tokenizer) if tokenizer is not None else None,
            vocab_size=len(tokenizer) if tokenizer is not None else None,
            temperature=float(getattr(args, "temperature", cache.temperature)),
            seq_len=int(seq_len) if seq_len is not None else None,
            fn=fn,
        )
        return cache

    def _pack(
        self, cfg: DDKConfig, train_dataset: Any, eval_dataset: Any, tokenizer: Any
    ) -> tuple[Any, Any, dict[str, list[dict[str, torch.Tensor]]], tuple[str, ...]]:
        from ddk.data.packing import pack_domains

        fn = "DDKTrainer"
        if train_dataset is None:
            raise ValueError(
                f"{fn}: train_dataset must be a datasets.Dataset with a {cfg.domain_column!r} column; got None."
            )
        records = self._records(fn, "train_dataset", train_dataset, cfg, tokenizer)
        seq_len = cfg.seq_len
        assert seq_len is not None  # _records raised for a None seq_len
        validation = None
        if eval_dataset is not None:
            if not isinstance(eval_dataset, Mapping) or not eval_dataset:
                raise TypeError(
                    f"{fn}: eval_dataset must be None or a dict {{domain: Dataset}}; got {type(eval_dataset).__name__}."
                )
            import datasets

            parts = [
                self._records(fn, f"eval_dataset[{name!r}]", ds, cfg, tokenizer, domain=str(name))
                for name, ds in eval_dataset.items()
            ]
            validation = datasets.concatenate_datasets(parts)
        with cfg.main_process_first(desc="DDK packing"):
            packed = pack_domains(
                records,
                tokenizer,
                seq_len=int(seq_len),
                val_samples=cfg.val_samples,
                validation=validation,
                seed=cfg.seed,
                cache_dir=cfg.pack_cache_dir,
                progress=not cfg.disable_tqdm,
            )
        names = tuple(packed.names)
        val = packed.validation_batches(cfg.per_device_eval_batch_size)
        return packed, packed.train_dataset(), val, names

    @staticmethod
    def _records(fn: str, name: str, data: Any, cfg: DDKConfig, tokenizer: Any, domain: str | None = None) -> Any:
        """``data`` checked and reduced to the columns ``pack_domains`` reads: ``domain`` (str) and
        ``text`` or ``input_ids``. ``domain``: the domain of every record (an ``eval_dataset`` entry)."""
        import datasets

        if isinstance(data, (list, tuple)) and all(isinstance(r, Mapping) for r in data):
            data = datasets.Dataset.from_list([dict(r) for r in data])
        if not isinstance(data, datasets.Dataset):
            raise TypeError(
                f"{fn}: {name} must be a datasets.Dataset (or a list of dicts) with a {cfg.domain_column!r} column; "
                f"got {type(data).__name__}."
            )
        cols = list(data.column_names)
        if domain is None and cfg.domain_column not in cols:
            raise ValueError(
                f"{fn}: {name} must have the domain column {cfg.domain_column!r} (DDKConfig.domain_column); "
                f"got columns {cols}."
            )
        tokens = "input_ids" if "input_ids" in cols else cfg.text_column
        if tokens not in cols:
            raise ValueError(
                f"{fn}: {name} must have the text column {cfg.text_column!r} (DDKConfig.text_column) or a "
                f"pre-tokenized 'input_ids' column; got columns {cols}."
            )
        if tokenizer is None:
            raise ValueError(
                f"{fn}: processing_class must be the tokenizer of the student and the teacher (packing appends its "
                "EOS token after every document); got None."
            )
        if cfg.seq_len is None:
            raise ValueError(
                f"{fn}: args.seq_len must be set (tokens per packed sequence, e.g. 1024; text and input_ids rows are "
                "both packed); got None."
            )
        keep = [tokens] + ([cfg.text_column] if tokens == "input_ids" and cfg.text_column in cols else [])
        data = data.select_columns(keep + ([cfg.domain_column] if domain is None else []))
        if cfg.text_column in data.column_names and cfg.text_column != "text":
            data = data.rename_column(cfg.text_column, "text")  # with input_ids: the split key only
        if domain is not None:
            return data.add_column("domain", [domain] * len(data))
        if cfg.domain_column != "domain":
            data = data.rename_column(cfg.domain_column, "domain")
        feature = data.features["domain"]
        if isinstance(feature, datasets.ClassLabel):
            data = data.cast_column("domain", datasets.Value("string"))  # the label names
        elif getattr(feature, "dtype", None) != "string":
            data = data.map(
                lambda b: {"domain": [str(x) for x in b["domain"]]},
                batched=True,
                features=datasets.Features({**data.features, "domain": datasets.Value("string")}),
            )
        return data

    @staticmethod
    def _build_controller(
        cfg: DDKConfig, packed: Any, validation: Mapping[str, Any], names: Sequence[str]
    ) -> DDKController:
        world, rank = max(int(cfg.world_size), 1), int(cfg.process_index)
        seed = cfg.data_seed if cfg.data_seed is not None else cfg.seed
        sampler = MixtureSampler(
            list(packed.sizes),
            cfg.per_device_train_batch_size * world,
            seed=int(seed),
            rank=rank,
            world_size=world,
            domain_names=list(names),
        )
        estimator = DiscrepancyEstimator({n: validation[n] for n in names}, progress=not cfg.disable_tqdm)
        smoother = make_scheduler(
            cfg.method,
            len(names),
            alpha=float(cfg.alpha),
            init=cfg.ddk_init,
            step_size=float(cfg.doremi_step_size),
            smoothing=float(cfg.doremi_smoothing),
        )
        log_path = Path(cfg.output_dir) / DDK_LOG_NAME if cfg.output_dir is not None else None
        return DDKController(
            estimator,
            smoother,
            sampler,
            interval=int(cfg.interval),
            log_path=log_path,
            online=cfg.method == "ddk-online",
        )

    def _prepare_teacher(self, teacher: torch.nn.Module | None) -> torch.nn.Module | None:
        if teacher is None:
            return None
        teacher.requires_grad_(False)
        teacher.eval()
        if getattr(teacher, "hf_device_map", None) is None:  # a teacher spread over devices stays where it is
            teacher = teacher.to(self.args.device)
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

    # ------------------------------------------------------------------ data
    def get_train_dataloader(self) -> DataLoader:
        """A ``DataLoader`` whose ``batch_sampler`` is the controller's ``MixtureSampler``."""
        if self.train_dataset is None:
            raise ValueError("DDKTrainer.get_train_dataloader: train_dataset must be given; got None.")
        return DataLoader(
            _IndexedDataset(self.train_dataset),
            batch_sampler=self.controller.sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list[Any], Any]:
        """The next ``num_batches`` micro-batches and their valid shifted target tokens on all ranks.

        Restores the random-number-generator states saved with the checkpoint first (once, after
        resuming), at the point where the uninterrupted run was when it saved them.
        """
        if self._pending_rng is not None:
            load_rng_state(self._pending_rng)
            self._pending_rng = None
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        if not batches:
            return batches, None
        count = torch.stack([(b["labels"][:, 1:] != -100).sum() for b in batches]).sum().to(device)
        if self.accelerator.num_processes > 1:
            count = self.accelerator.gather(count.reshape(1)).sum()
        return batches, count

    # ------------------------------------------------------------------ loss
    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """``causal_lm_kd_loss`` of the student (and the teacher) on one micro-batch.

        ``inputs``: ``input_ids`` ``(B, L)``, optional ``attention_mask`` ``(B, L)``, ``labels``
        ``(B, L)`` unshifted (-100 ignored), ``domain_ids`` ``(B,)`` int64. In training with
        ``num_items_in_batch`` (``N``, valid target tokens of the accumulated batch on all ``R``
        ranks) the loss is the micro-batch's sum divided by ``N / R``; otherwise the mean over
        the micro-batch's valid tokens (divided by the accumulation steps in training). Runs
        under the accelerator's autocast (mixed precision), which the student's own
        ``forward`` would have applied.
        """
        batch = {k: inputs[k] for k in _BATCH_KEYS + _CACHED_KEYS if inputs.get(k) is not None}
        domain_ids = inputs.get("domain_ids")
        training = model.training
        normalizer = None
        if training and num_items_in_batch is not None:
            n = torch.as_tensor(num_items_in_batch, device=batch["input_ids"].device).to(torch.float64).reshape(())
            normalizer = n.clamp(min=1.0) / self.accelerator.num_processes
        opts: dict[str, Any] = dict(self._loss_options, normalizer=normalizer, loss=self.loss_mode)
        if domain_ids is not None:
            opts.update(domain_ids=domain_ids, num_domains=self.num_domains)
        with self.accelerator.autocast():
            out = causal_lm_kd_loss(self._loss_student(model), self.teacher, batch, **opts)
        loss = out.loss
        if training and num_items_in_batch is None:
            loss = loss / max(int(getattr(self, "current_gradient_accumulation_steps", 1) or 1), 1)
        if training and self.controller.online and domain_ids is not None:
            self.controller.observe(out)
        if return_outputs:
            return loss, {"loss": loss, "ce_sum": out.ce_sum, "kd_sum": out.kd_sum, "num_tokens": out.num_tokens}
        return loss

    def _loss_student(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module ``causal_lm_kd_loss`` gets: the (possibly wrapped) student. Under a
        data-parallel wrapper the fused loss calls the wrapper's ``forward`` (hidden states only,
        no logits), so the wrapper synchronises the gradients. A student sharded in place with
        FSDP2 is refused with ``loss="fused"``: its ``lm_head`` weight is read outside the forward."""
        if self.loss_mode == "fused" and self.accelerator.unwrap_model(model) is model and is_fsdp(model):
            raise ValueError(
                "DDKTrainer.compute_loss: args.loss must be 'logits' when the student is sharded with FSDP "
                "(loss='fused' reads the lm_head weight outside the forward); got loss='fused'."
            )
        return model

    # ------------------------------------------------------------------ resume
    def _save_rng_state(self, output_dir: str) -> None:
        """transformers' RNG files, then the DDK state: inside the checkpoint's save, so it is on
        disk before ``save_total_limit`` rotates the older checkpoints away (a crash between the
        rotation and ``on_save`` would otherwise leave no resumable checkpoint)."""
        super()._save_rng_state(output_dir)
        self._save_ddk_state(Path(output_dir))

    def _save_ddk_state(self, folder: Path) -> None:
        """``ddk_rng_state*.safetensors`` (every process) and ``ddk_state.json`` (process 0) into ``folder``."""
        args = self.args
        save_rng_state(_rng_file(folder, args.process_index, args.world_size))
        if self.is_world_process_zero() and folder.is_dir():
            consumed = int(self.state.global_step) * int(args.gradient_accumulation_steps)
            atomic_write_text(folder / DDK_STATE_NAME, json.dumps(self.controller.state_dict(at_batch=consumed)))

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; when resuming, first restores the DDK state saved with the checkpoint.

        ``resume_from_checkpoint=True`` takes the last checkpoint of ``args.output_dir``. The
        controller (sampler position, weights, estimator) comes from ``ddk_state.json``; the
        generator states from ``ddk_rng_state*.safetensors`` are applied just before the first
        batch is drawn, so dropout continues as if the run had never stopped.
        """
        fn = "DDKTrainer.train"
        path: str | None = None
        if resume_from_checkpoint is True:
            path = get_last_checkpoint(self.args.output_dir)
            if path is None:
                raise ValueError(
                    f"{fn}: resume_from_checkpoint=True needs a checkpoint in {self.args.output_dir}; got none."
                )
        elif isinstance(resume_from_checkpoint, (str, os.PathLike)):
            path = str(resume_from_checkpoint)
        if path is not None:
            state_file = Path(path) / DDK_STATE_NAME
            if not state_file.is_file():
                raise ValueError(
                    f"{fn}: the checkpoint must hold {DDK_STATE_NAME} (saved by DDKTrainer); got none in {path}."
                )
            self.controller.load_state_dict(json.loads(state_file.read_text(encoding="utf-8")))
            rng = _rng_file(path, self.args.process_index, self.args.world_size)
            if rng.is_file():
                self._pending_rng = rng
            else:
                logger.warning(
                    "DDKTrainer.train: no %s in %s (saved with another number of processes?); dropout "
                    "will not continue bit-identically.",
                    rng.name,
                    path,
                )
            resume_from_checkpoint = path
        return super().train(resume_from_checkpoint, *args, **kwargs)
