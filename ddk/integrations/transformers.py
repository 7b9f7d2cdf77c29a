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
  the method's weight schedule (``ddk.engine.make_scheduler``) and ``DDKController`` (interval K).

``compute_loss`` returns ``causal_lm_kd_loss`` (``CE + gamma * D(p_T, p_S)``, fused with the
``lm_head`` by default, so no ``(B * L, V)`` logits exist) with one domain id per sequence, divided
by the number of valid shifted target tokens of the *whole accumulated batch* over all ranks, so
gradient accumulation and data parallelism weight every token equally (see ``DDKTrainer``). Under
a data-parallel wrapper (``DistributedDataParallel``, accelerate's, DeepSpeed's) the fused loss
calls the wrapper's ``forward`` for the hidden states (no logits), so the wrapper synchronises
the gradients. A student sharded in place by accelerate's FSDP2 (``fsdp_version: 2``) is called
the same way: FSDP2 gathers its output layer in that forward and the loss reads it there. The
teacher is then sharded too (``ddk.engine.parallel.shard_teacher``, as ``ddk distill --fsdp``
shards it): ``1/R`` of it per rank, its root group gathered once per micro-step and freed after
the loss.

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
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, get_last_checkpoint

from ddk._io import atomic_write_text, read_json
from ddk.controller import DDKController
from ddk.engine import checkpoint as ckpt
from ddk.engine.components import Components, build_components, open_teacher_cache
from ddk.engine.config import DistillOptions, check_cache_backend
from ddk.engine.methods import method_spec
from ddk.engine.models import check_positions, check_vocabularies, warn_larger_student
from ddk.engine.parallel import shard_teacher
from ddk.engine.resume import keep_settings, optimizer_settings
from ddk.engine.step import CACHED_KEYS, MODEL_KEYS, StepLoss, check_loss_models
from ddk.engine.tracking import interval_scalars
from ddk.integrations.deepspeed import prepare_zero3_teacher, zero3_enabled
from ddk.integrations.trainer_data import DomainBatcher, IndexedDataset, ValidationDataset, pack_records

__all__ = [
    "DDK_LOG_NAME",
    "DDK_RNG_STATE_NAME",
    "DDK_STATE_NAME",
    "DDKCallback",
    "DDKConfig",
    "DDKTrainer",
]

logger = logging.getLogger(__name__)

DDK_STATE_NAME = "ddk_state.json"
DDK_RNG_STATE_NAME = "ddk_rng_state.safetensors"  # one process; rank r of several: ddk_rng_state_<r>.safetensors
DDK_LOG_NAME = "ddk_log.jsonl"


# ---------------------------------------------------------------------------- configuration
@dataclass
class DDKConfig(TrainingArguments, DistillOptions):
    """``TrainingArguments`` plus the options of DDK (``ddk.engine.DistillOptions``, paper defaults), for ``DDKTrainer``.

    Every ``TrainingArguments`` field keeps its meaning; ``max_steps`` must be set (the mixture
    sampler's stream is infinite). The DDK fields are the ones ``ddk distill`` takes, by the same
    names (``method``, ``gamma``, ``temperature``, ``divergence``, ``beta``, ``alpha``,
    ``interval``, ``ddk_init``, ``doremi_step_size``, ``doremi_smoothing``, ``loss``, ``backend``,
    ``val_samples``, ``seq_len``, ``text_field``, ``domain_field``), validated by the one
    validator ``DistillOptions.check_options``; they parse from the command line with
    ``HfArgumentParser`` like the others. ``seq_len`` is required with a ``train_dataset`` to pack.

    Examples:
        >>> cfg = DDKConfig(output_dir="out", max_steps=10, seq_len=128, method="ddk", report_to="none")
        >>> cfg.gamma, cfg.interval, cfg.divergence
        (0.2, 1000, 'forward_kl')
    """

    pack_cache_dir: str | None = field(
        default=None, metadata={"help": "Folder caching the packed token sequences (keyed by content); None: no cache."}
    )
    teacher_offload: str = field(
        default="none",
        metadata={
            "help": "'cpu': under accelerate's FSDP2 the teacher's shards wait in host memory (FSDP2's "
            "CPUOffloadPolicy), as ddk distill --teacher-offload cpu; 'none': they stay on the device."
        },
    )

    def __post_init__(self) -> None:
        self.check_options("DDKConfig")
        if self.teacher_offload not in ("none", "cpu"):
            raise ValueError(f"DDKConfig: teacher_offload must be 'none' or 'cpu'; got {self.teacher_offload!r}.")
        if self.pack_cache_dir is not None and not isinstance(self.pack_cache_dir, (str, os.PathLike)):
            raise ValueError(f"DDKConfig: pack_cache_dir must be None or a folder path; got {self.pack_cache_dir!r}.")
        TrainingArguments.__post_init__(self)


# ---------------------------------------------------------------------------- random states
def _rng_file(folder: str | os.PathLike[str], process_index: int, world_size: int) -> Path:
    name = (
        DDK_RNG_STATE_NAME
        if world_size <= 1
        else DDK_RNG_STATE_NAME.replace(".safetensors", f"_{process_index}.safetensors")
    )
    return Path(folder) / name


# ---------------------------------------------------------------------------- callback
class DDKCallback(TrainerCallback):
    """Starts, steps and checkpoints a ``DDKController`` alongside a ``DDKTrainer``."""

    def __init__(self, trainer: DDKTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        tr = self.trainer
        if not tr.tracks_domains:
            return
        student = tr.accelerator.unwrap_model(tr.model)
        if tr.parts is not None:  # the teacher CE from its one source: teacher, cache manifest, or none
            tr.parts.ensure_teacher_ce(tr.teacher, student)
        elif not tr.controller.estimator.has_teacher_ce:
            if tr.teacher is None:
                raise ValueError(
                    "DDKTrainer: the controller's estimator must hold the teacher CE when no teacher is given "
                    "(estimator.teacher_ce = ...); got none."
                )
            tr.controller.estimator.compute_teacher(tr.teacher)
        if not tr.controller.started:
            tr.controller.start(student)
            self._log_interval(control)  # Eq. 1's weights and gaps, at step 0
        tr._log_time = time.perf_counter()  # the throughput of the first log leaves out the set-up

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        tr = self.trainer
        if tr.tracks_domains:
            if tr.controller.step_end(int(state.global_step), tr.accelerator.unwrap_model(tr.model)) is not None:
                self._log_interval(control)

    def _log_interval(self, control: Any) -> None:
        """The controller's newest record to the Trainer's logs (every ``report_to`` backend), keeping
        ``control.should_log`` (``Trainer.log`` clears it: the step's own log must still happen)."""
        should_log = control.should_log
        self.trainer.log(interval_scalars(self.trainer.controller.records[-1]))
        control.should_log = self.trainer.control.should_log = should_log

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Normally written already inside the checkpoint's save, before transformers rotates old
        # checkpoints (``DDKTrainer._save_rng_state``); here only when that hook did not run
        # (``save_only_model``).
        tr = self.trainer
        # decided by this process's own flag, never by a file another rank may not have written yet:
        # the state is a collective (every rank's online sums), so every rank takes the same branch
        if tr._ddk_saved_step != int(state.global_step):
            tr._save_ddk_state(Path(tr._get_output_dir(None)) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")


# ---------------------------------------------------------------------------- trainer
def _offload_refusal(has_teacher: bool, distributed_type: Any, fsdp_requested: bool) -> str:
    """Why ``DDKTrainer`` refuses ``teacher_offload="cpu"``, and what to do."""
    head = "DDKTrainer: teacher_offload='cpu' keeps a teacher sharded by accelerate's FSDP2 in host memory; "
    if not has_teacher:
        return head + "got no teacher (a teacher cache needs none). Drop teacher_offload."
    head += f"got distributed type {distributed_type} (not FSDP2). "
    if fsdp_requested:
        return head + (
            "accelerate runs FSDP only on an accelerator device: on the CPU it leaves fsdp out (the Trainer "
            "runs DDP, or one process). Run on GPUs, or drop teacher_offload."
        )
    return head + (
        "Set DDKConfig(fsdp=True, fsdp_config={'fsdp_version': 2}) (or fsdp_version: 2 in the accelerate config) "
        "and launch with torchrun or accelerate launch (one process per GPU; one GPU works), or drop teacher_offload."
    )


class DDKTrainer(Trainer):
    """A ``transformers.Trainer`` that distills a student from a frozen teacher with DDK.

    One call (``controller=None``): give ``train_dataset`` as a ``datasets.Dataset`` (or a list of
    dicts) with ``args.domain_field`` and either ``args.text_field`` (tokenized with
    ``processing_class``, packed to ``args.seq_len`` tokens) or a pre-tokenized ``input_ids``
    column (each row a document, packed the same way by ``pack_domains``, an EOS after each; a
    text column kept beside it is the split key). The domain column may hold strings or any hashable values; domains are
    numbered in sorted name order. The trainer builds the packed domains, the ``MixtureSampler``,
    the ``DiscrepancyEstimator`` (per-domain validation split of ``args.val_samples`` sequences,
    or ``eval_dataset`` ``{domain: Dataset}`` of the same columns), the method's weight schedule and the
    ``DDKController``, and passes the per-domain validation sets to ``Trainer`` as its
    ``eval_dataset`` (``evaluate()`` reports ``eval_<domain>_loss``, the student's validation CE there).

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
    it is the student's CE alone (no divergence term), the mean over the batch's valid tokens. ``method="cpt"`` needs no teacher (CE only).

    The teacher is moved to the trainer's device, put in eval mode, frozen and prepared through
    accelerate (``prepare_model(..., evaluation_mode=True)``); it is never differentiated. Under
    accelerate's FSDP2 it is then sharded over the ranks block by block
    (``ddk.engine.parallel.shard_teacher``): every rank runs as many teacher forwards (its
    validation CE over uneven shards padded with dropped forwards; ``evaluate()`` runs none), and
    each micro-step gathers its root group (embeddings, final norm, output layer) once and frees it
    after the loss. Under DDP or FSDP1 every rank holds it whole.

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
            only with ``method="cpt"``. Under DeepSpeed ZeRO-3 (``args.deepspeed`` with
            ``zero_optimization.stage`` 3) it becomes a ZeRO-3 inference engine of the student's
            configuration without optimizer (``ddk.integrations.deepspeed.prepare_zero3_teacher``):
            ``1/R`` of it per rank, gathered one module at a time in its forward, and its output
            layer once per step for the fused loss (the student's, too, differentiably: its
            gradient is reduce-scattered by ZeRO-3 as any other).
        teacher_tokenizer: the teacher's own tokenizer, checked against ``processing_class`` by the
            one tokenizer rule (``ddk.data.check_tokenizers``: the same ids of a probe text, size
            and special tokens); default the tokenizer saved in ``teacher.name_or_path``. Without
            either, a teacher with more output rows than the student is taken as padded (a warning).
        controller: low-level form only.
        **kwargs: further ``Trainer`` arguments (``callbacks``, ``optimizers``, ...).

    Raises:
        ValueError, TypeError: on a missing column, tokenizers that tokenize differently, a
            ``seq_len`` above a model's position limit, a missing teacher, a bad batch size or
            configuration, before anything is trained.

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
        teacher_tokenizer: Any = None,
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
        if teacher is not None and not isinstance(teacher, torch.nn.Module):
            raise TypeError(f"{fn}: teacher must be a torch.nn.Module; got {type(teacher).__name__}.")
        check_vocabularies(teacher, model, processing_class, fn=fn, teacher_tokenizer=teacher_tokenizer)
        warn_larger_student(teacher, model, fn=fn)
        if cfg is not None:  # before the corpus is packed
            if cfg.seq_len is not None:
                check_positions(cfg.seq_len, teacher, model, fn=fn, flag="args.seq_len")
            check_loss_models(cfg.loss, model, teacher)
        self.spec = method_spec(self.method, fn)
        self.adaptive = self.spec.adaptive
        options = cfg.distill_options() if cfg is not None else DistillOptions()
        autocast = torch.bfloat16 if getattr(args, "bf16", False) else None
        self.parts: Components | None = None

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
            # the sequences, the teacher's top-k and its CE come from the cache, or the records are packed
            packed = cache if cache is not None else pack_records(cfg, train_dataset, eval_dataset, processing_class)
            world = max(int(cfg.world_size), 1)
            self.parts = build_components(
                options,
                packed,
                global_batch_size=cfg.per_device_train_batch_size * world,
                seed=int(cfg.data_seed if cfg.data_seed is not None else cfg.seed),
                eval_batch_size=cfg.per_device_eval_batch_size,
                rank=int(cfg.process_index),
                world_size=world,
                autocast=autocast,
                log_path=Path(cfg.output_dir) / DDK_LOG_NAME if cfg.output_dir is not None else None,
                progress=not cfg.disable_tqdm,
            )
            controller, train_ds = self.parts.controller, self.parts.train_dataset
            validation = packed.validation_batches(cfg.per_device_eval_batch_size)
            eval_sets = {n: ValidationDataset(validation[n], d) for d, n in enumerate(self.parts.names)}
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
        from ddk.data.packed import DomainCollator
        from ddk.data.teacher_cache import TeacherCacheCollator

        if data_collator is None and cache is not None:
            data_collator = TeacherCacheCollator()
        if data_collator is None:
            data_collator = DomainCollator(pad_token_id=getattr(processing_class, "pad_token_id", None))
        batcher = DomainBatcher(
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
        # the one-call form runs the controller for every method, as `ddk distill` does (a uniform
        # mixture's per-domain CE logged at each interval); a hand-built controller only when adaptive
        self.tracks_domains = self.parts is not None or self.adaptive
        self.step_loss = self.parts.loss if self.parts is not None else StepLoss.of(options, len(names), autocast)
        if cfg is None:
            self.step_loss.check_models(model, teacher)
        self._check_teacher_offload(teacher)
        if teacher is not None and zero3_enabled(self.accelerator):  # DeepSpeed ZeRO-3: a sharded inference engine
            self.teacher: torch.nn.Module | None = prepare_zero3_teacher(teacher, self.accelerator)
        else:
            self.teacher = self._prepare_teacher(teacher)
        self.args.ignore_data_skip = True  # the sampler state says where the stream is
        self.model_accepts_loss_kwargs = False  # the Trainer neither counts tokens nor rescales: we do
        self._pending_rng: Path | None = None
        self._ddk_saved_step = -1  # the step whose DDK state this process saved last
        self._log_terms: torch.Tensor | None = None  # since the last log: ce, kd, tokens, input tokens, (D,) tokens
        self._log_time = time.perf_counter()
        self.add_callback(DDKCallback(self))

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _open_cache(
        teacher_cache: Any, teacher: Any, train_dataset: Any, controller: Any, tokenizer: Any, args: Any
    ) -> Any:
        """The ``TeacherCache`` of ``teacher_cache`` (a folder or an opened cache), checked, or None."""
        if teacher_cache is None:
            return None
        fn = "DDKTrainer"
        if teacher is not None or train_dataset is not None or controller is not None:
            raise ValueError(
                f"{fn}: teacher_cache replaces teacher, train_dataset and controller (the cache holds the "
                "sequences, the teacher's top-k and its per-domain CE); got one of them as well."
            )
        seq_len = getattr(args, "seq_len", None)
        check_cache_backend(getattr(args, "backend", "auto"), fn)
        return open_teacher_cache(
            teacher_cache, tokenizer, temperature=float(getattr(args, "temperature", 1.0)), seq_len=seq_len, fn=fn
        )

    def _check_teacher_offload(self, teacher: torch.nn.Module | None) -> None:
        """``teacher_offload="cpu"`` needs a teacher sharded by accelerate's FSDP2."""
        if getattr(self.args, "teacher_offload", "none") != "cpu":
            return
        if teacher is None or not getattr(self.accelerator, "is_fsdp2", False):
            raise ValueError(
                _offload_refusal(
                    teacher is not None, self.accelerator.distributed_type, bool(getattr(self.args, "fsdp", None))
                )
            )

    def _prepare_teacher(self, teacher: torch.nn.Module | None) -> torch.nn.Module | None:
        """The teacher frozen, in eval mode, on the trainer's device and prepared by accelerate; under
        accelerate's FSDP2 sharded over the ranks as ``ddk distill --fsdp`` shards it
        (``ddk.engine.parallel.shard_teacher``; with ``teacher_offload="cpu"`` its shards in host
        memory), after its identity was checked and before its first forward. Under DDP (or FSDP1)
        it stays whole on every rank; a teacher spread over devices (``hf_device_map``) stays where
        it is."""
        offload = getattr(self.args, "teacher_offload", "none") == "cpu"
        fsdp2 = bool(getattr(self.accelerator, "is_fsdp2", False))
        if teacher is None:
            return None
        teacher.requires_grad_(False)
        teacher.eval()
        if getattr(teacher, "hf_device_map", None) is not None:  # a teacher spread over devices stays where it is
            return self.accelerator.prepare_model(teacher, evaluation_mode=True)
        # offloaded: left in host memory, FSDP2 moves one group at a time to the device while sharding it
        teacher = self.accelerator.prepare_model(
            teacher if offload else teacher.to(self.args.device), evaluation_mode=True
        )
        if fsdp2:
            shard_teacher(teacher, offload=offload)
        return teacher

    # ------------------------------------------------------------------ data
    def get_train_dataloader(self) -> DataLoader:
        """A ``DataLoader`` whose ``batch_sampler`` is the controller's ``MixtureSampler``."""
        if self.train_dataset is None:
            raise ValueError("DDKTrainer.get_train_dataloader: train_dataset must be given; got None.")
        return DataLoader(
            IndexedDataset(self.train_dataset),
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
            try:
                ckpt.load_rng_file(self._pending_rng, "DDKTrainer.train")
            except ckpt.CheckpointError as exc:  # e.g. written by an older ddk: train on, not bit-identically
                logger.warning("%s Dropout will not continue bit-identically.", exc)
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
        batch = {k: inputs[k] for k in MODEL_KEYS + CACHED_KEYS if inputs.get(k) is not None}
        domain_ids = inputs.get("domain_ids")
        training = model.training
        if not training:  # evaluation: the student's CE, as the engine's validation CE (teacher or cache alike)
            with self.accelerator.autocast():
                out = self.step_loss.ce_only()(self._loss_student(model), None, batch)
            return (out.loss, {"loss": out.loss, "num_tokens": out.num_tokens}) if return_outputs else out.loss
        normalizer = None
        if training and num_items_in_batch is not None:
            n = torch.as_tensor(num_items_in_batch, device=batch["input_ids"].device).to(torch.float64).reshape(())
            normalizer = n.clamp(min=1.0) / self.accelerator.num_processes
        with self.accelerator.autocast():
            out = self.step_loss(
                self._loss_student(model), self.teacher, batch, domain_ids=domain_ids, normalizer=normalizer
            )
        self._add_log_terms(out, batch["input_ids"].numel())
        loss = out.loss
        if training and num_items_in_batch is None:
            loss = loss / max(int(getattr(self, "current_gradient_accumulation_steps", 1) or 1), 1)
        if training and self.controller.online and domain_ids is not None:
            self.controller.observe(out)
        if return_outputs:
            return loss, {"loss": loss, "ce_sum": out.ce_sum, "kd_sum": out.kd_sum, "num_tokens": out.num_tokens}
        return loss

    # ------------------------------------------------------------------ logs
    def _add_log_terms(self, out: Any, input_tokens: int) -> None:
        """Add a training micro-batch's sums to those of the next log (on its device: no host sync)."""
        head = torch.stack([out.ce_sum.double(), out.kd_sum.double(), out.num_tokens.double()])
        v = torch.cat([head, head.new_tensor([float(input_tokens)]), out.domain_tokens.double()])
        self._log_terms = v if self._log_terms is None else self._log_terms + v

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """``Trainer.log``; a training log (with ``loss``) gets the terms since the previous one, over all ranks:
        ``ce`` and ``kd`` (per valid target token; ``loss = ce + gamma * kd``), ``tokens/<domain>`` (valid
        target tokens) and ``throughput/tokens_per_s`` (input tokens per second). ``DDKCallback`` logs
        ``weight/<domain>``, ``student_ce/<domain>``, ``teacher_ce/<domain>``, ``gap/<domain>`` and
        ``ratio/<domain>`` at each DDK interval (``ddk.engine.tracking.interval_scalars``)."""
        if "loss" in logs and self._log_terms is not None:
            v = self._log_terms
            if self.accelerator.num_processes > 1:  # every rank logs at the same steps
                v = self.accelerator.reduce(v, reduction="sum")
            terms = v.tolist()  # at a logging step, where the Trainer syncs anyway
            now = time.perf_counter()
            tok = max(terms[2], 1.0)
            logs["ce"], logs["kd"] = terms[0] / tok, terms[1] / tok
            for name, n in zip(self.controller.estimator.domain_names, terms[4:]):
                logs[f"tokens/{name}"] = n
            logs["throughput/tokens_per_s"] = terms[3] / max(now - self._log_time, 1e-9)
            self._log_terms, self._log_time = None, now
        if start_time is None:
            super().log(logs)
        else:
            super().log(logs, start_time)

    def _loss_student(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module ``causal_lm_kd_loss`` gets: the (possibly wrapped) student. Under a
        data-parallel wrapper, or sharded in place with FSDP2, the fused loss calls the model's
        ``forward`` (hidden states only, no logits), so the wrapper synchronises the gradients and
        FSDP2 gathers the output layer the loss then reads (its gradient is reduce-scattered with
        the rest of its group: accelerate's holds the final norm and the output layer, kept
        gathered after the forward)."""
        return model

    # ------------------------------------------------------------------ resume
    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """transformers' loading of ``optimizer.pt`` and ``scheduler.pt``, then the settings built
        from the arguments put back (``ddk.engine.resume.keep_settings``): a checkpoint gives the
        moments and step counts, the learning rate is always the arguments' times the schedule at
        the resumed step, never one read from the files."""
        if checkpoint is None or self.optimizer is None:
            super()._load_optimizer_and_scheduler(checkpoint)
            return
        own = optimizer_settings(self.optimizer)
        super()._load_optimizer_and_scheduler(checkpoint)
        keep_settings(self.optimizer, self.lr_scheduler, own)

    def _save_rng_state(self, output_dir: str) -> None:
        """transformers' RNG files, then the DDK state: inside the checkpoint's save, so it is on
        disk before ``save_total_limit`` rotates the older checkpoints away (a crash between the
        rotation and ``on_save`` would otherwise leave no resumable checkpoint)."""
        super()._save_rng_state(output_dir)
        self._save_ddk_state(Path(output_dir))

    def _save_ddk_state(self, folder: Path) -> None:
        """``ddk_rng_state*.safetensors`` (every process) and ``ddk_state.json`` (process 0) into ``folder``."""
        args = self.args
        ckpt.save_rng_file(_rng_file(folder, args.process_index, args.world_size))
        self._ddk_saved_step = int(self.state.global_step)
        consumed = int(self.state.global_step) * int(args.gradient_accumulation_steps)
        # a collective under torch.distributed (every rank's online sums): every process calls it
        state = ckpt.controller_state(self.controller, self.args.device, at_batch=consumed)
        if self.is_world_process_zero() and folder.is_dir():
            atomic_write_text(folder / DDK_STATE_NAME, json.dumps(state))

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
            state = read_json(state_file, max_bytes=ckpt.MAX_STATE_BYTES, max_depth=ckpt.STATE_MAX_DEPTH, fn=fn)
            self._check_drawn(state, Path(path), fn)
            self.controller.load_state_dict(state)  # validated whole: a rejected state changes nothing
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
            done = self._finished_at(path)
            if done is not None:  # like a plain Trainer: a finished run trains nothing more
                self._pending_rng = None
                logger.info("DDKTrainer.train: %s is at step %d = max_steps; nothing to train.", path, done.global_step)
                self._load_from_checkpoint(path)  # the model of the finished run, as a plain Trainer leaves it
                self.state = done
                return TrainOutput(done.global_step, 0.0, {})
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _check_drawn(self, state: Any, path: Path, fn: str) -> None:
        """The sampler of ``ddk_state.json`` drew one global batch per micro-step of ``trainer_state.json``'s steps."""
        trainer_state = path / "trainer_state.json"
        if not trainer_state.is_file() or not isinstance(state, dict) or not isinstance(state.get("sampler"), dict):
            return  # the controller's own check names a malformed state
        step = read_json(trainer_state, fn=fn).get("global_step")
        want = step * int(self.args.gradient_accumulation_steps) if isinstance(step, int) else None
        got = state["sampler"].get("batches_yielded")
        if got != want:
            raise ValueError(
                f"{fn}: {path / DDK_STATE_NAME} field sampler.batches_yielded must equal global_step x "
                f"gradient_accumulation_steps = {step} x {self.args.gradient_accumulation_steps} (trainer_state.json); "
                f"got {got!r}. Resume from another checkpoint."
            )

    def _finished_at(self, path: str) -> Any:
        """The ``TrainerState`` of checkpoint ``path`` when it is at ``max_steps`` or past it, else None."""
        state_file = Path(path) / "trainer_state.json"
        if not state_file.is_file() or not self.args.max_steps or self.args.max_steps <= 0:
            return None
        state = TrainerState.load_from_json(str(state_file))
        return state if int(state.global_step) >= int(self.args.max_steps) else None
