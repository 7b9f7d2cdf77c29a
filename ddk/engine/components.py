"""The DDK components of a run, assembled once for every client.

``build_components`` turns packed domains (``ddk.data.PackedDomains``) or a teacher cache
(``ddk.data.TeacherCache``) into the ``MixtureSampler``, the ``DiscrepancyEstimator`` (validation
CE by the run's ``StepLoss``), the method's weight schedule and the ``DDKController``;
``Components.ensure_teacher_ce`` sets the teacher's per-domain CE from its one source: the teacher
model, the cache's manifest, or (no teacher: ``cpt``) the student's own CE at the start.

The validation split is the same for every client: ``VALIDATION_SPLIT_SEED`` keys the stable
per-domain hash split of ``ddk.data.pack_domains``, whatever the training seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddk.controller import DDKController
from ddk.discrepancy import DiscrepancyEstimator
from ddk.engine.config import DistillOptions, RunConfig, data_source
from ddk.engine.methods import MethodSpec, make_scheduler, method_spec
from ddk.engine.progress import show_bars
from ddk.engine.step import StepLoss
from ddk.sampling import MixtureSampler

__all__ = [
    "VALIDATION_SPLIT_SEED",
    "Components",
    "build_components",
    "load_run_data",
    "load_test_data",
    "open_teacher_cache",
    "report_test_split",
]

VALIDATION_SPLIT_SEED = 0  # the split of every client: never the training seed


@dataclass
class Components:
    """The stateful DDK parts of a run and the data they index.

    Attributes:
        spec: the method's ``MethodSpec``.
        names: the domain names, in the sampler's order.
        data: the ``PackedDomains`` or ``TeacherCache``.
        train_dataset: items indexed by the sampler's global index.
        sampler, estimator, controller: as their classes.
        loss: the ``StepLoss`` of training and validation.
    """

    spec: MethodSpec
    names: tuple[str, ...]
    data: Any
    train_dataset: Any
    sampler: MixtureSampler
    estimator: DiscrepancyEstimator
    controller: DDKController
    loss: StepLoss

    def ensure_teacher_ce(self, teacher: nn.Module | None, student: nn.Module) -> torch.Tensor:
        """The teacher's per-domain validation CE ``(D,)`` float64, set once from the teacher model,
        else the teacher cache's manifest, else (no teacher) the student's own CE now."""
        est = self.estimator
        if not est.has_teacher_ce:
            manifest_ce = getattr(self.data, "teacher_ce", None)
            if teacher is not None:
                est.compute_teacher(teacher)
            elif manifest_ce is not None:
                est.teacher_ce = manifest_ce
            else:
                est.compute_teacher(student)
        return est.teacher_ce


def build_components(
    options: DistillOptions,
    data: Any,
    *,
    global_batch_size: int,
    seed: int,
    eval_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
    num_batches: int | None = None,
    autocast: torch.dtype | None = None,
    log_path: str | Path | None = None,
    progress: bool = False,
) -> Components:
    """Sampler, estimator, schedule and controller of ``options.method`` over ``data``.

    Args:
        options: the run's ``DistillOptions`` (a ``RunConfig`` or ``DDKConfig`` is one).
        data: ``PackedDomains`` or ``TeacherCache`` (``names``, ``sizes``, ``train_dataset()``,
            ``validation_batches(n)``).
        global_batch_size: sequences per optimizer step over all ranks.
        seed: the sampler's seed (the data order).
        eval_batch_size: sequences per validation batch.
        rank: this process's rank (its slice of each global batch).
        world_size: the number of processes.
        device: where validation runs (default: the model's).
        num_batches: the sampler's length (None: unbounded).
        autocast: the dtype of the forward passes, or None.
        log_path: the controller's JSON-lines log.
        progress: progress bars of the validation passes.
    """
    spec = method_spec(options.method, "build_components")
    names = tuple(data.names)
    loss = StepLoss.of(options, len(names), autocast)
    sampler = MixtureSampler(
        list(data.sizes),
        global_batch_size,
        seed=int(seed),
        domain_names=list(names),
        num_batches=num_batches,
        rank=rank,
        world_size=world_size,
    )
    estimator = DiscrepancyEstimator(
        data.validation_batches(eval_batch_size), loss_fn=loss.validation_ce, device=device, progress=progress
    )
    scheduler = make_scheduler(
        options.method,
        len(names),
        alpha=float(options.alpha),
        init=options.ddk_init,
        signal=options.ddk_signal,
        temperature=float(options.ddk_temperature),
        step_size=float(options.doremi_step_size),
        smoothing=float(options.doremi_smoothing),
    )
    controller = DDKController(
        estimator, scheduler, sampler, interval=int(options.interval), log_path=log_path, online=spec.online
    )
    return Components(spec, names, data, data.train_dataset(), sampler, estimator, controller, loss)


def open_teacher_cache(
    cache: Any, tokenizer: Any, *, temperature: float, seq_len: int | None, fn: str = "distill"
) -> Any:
    """The ``ddk.data.TeacherCache`` of ``cache`` (a folder or an opened cache), verified (every
    file's SHA-256 and values on the first open after it changed, ``ddk.data.verify``) and checked
    against the tokenizer (the one tokenizer rule, ``ddk.data.check_tokenizers``, and its size), the temperature and the sequence length; a mismatch
    is a ``ValueError`` naming it."""
    from ddk.data import TeacherCache

    opened = cache if isinstance(cache, TeacherCache) else TeacherCache(cache)
    opened.check(
        tokenizer=tokenizer,
        vocab_size=len(tokenizer) if tokenizer is not None else None,
        temperature=float(temperature),
        seq_len=int(seq_len) if seq_len is not None else None,
        fn=fn,
    )
    return opened


def _pack(cfg: RunConfig, tokenizer: Any, paths: Any, validation: Any, val_samples: int | None = None) -> Any:
    """``ddk.data.pack_files`` of the record options ``paths`` and ``validation`` (``NAME=FILE``
    entries: one domain's file, ``data_source``) with the run's fields, bad-record policy, size
    cap, sequence length, validation size, split seed, processes and cache: the corpus is streamed
    from its files, packed once per cache folder (under ``torchrun`` the other ranks wait and open
    it), and a cache whose files are unchanged opens without reading them."""
    from ddk.data import pack_files

    return pack_files(
        [data_source(p) for p in paths],
        tokenizer,
        seq_len=cfg.sequence_length,
        val_samples=cfg.val_samples if val_samples is None else val_samples,
        validation=[data_source(p) for p in validation] if validation else None,
        seed=VALIDATION_SPLIT_SEED,
        cache_dir=cfg.data_path / "packed",
        text_field=cfg.text_field,
        domain_field=cfg.domain_field,
        on_missing="skip" if cfg.skip_bad_records else "raise",
        max_record_bytes=cfg.max_record_bytes,
        num_proc=cfg.num_proc or None,
        progress=show_bars(cfg.progress),
    )


def load_run_data(cfg: RunConfig, tokenizer: Any, fn: str = "distill") -> Any:
    """``PackedDomains`` of ``cfg.data`` (and ``cfg.validation_data``) tokenized with ``tokenizer``,
    or with ``cfg.teacher_cache`` the checked ``TeacherCache``.

    Sequences of ``cfg.seq_len`` tokens, packed within each domain; validation is ``cfg.val_samples``
    sequences per domain, from ``validation_data`` or the stable per-domain split of ``data``
    (``VALIDATION_SPLIT_SEED``); cached under ``data_dir/packed``, streamed from the files in
    ``cfg.num_proc`` processes (``ddk.data.pack_files``).
    """
    if cfg.teacher_cache:
        return open_teacher_cache(cfg.teacher_cache, tokenizer, temperature=cfg.temperature, seq_len=cfg.seq_len, fn=fn)
    return _pack(cfg, tokenizer, cfg.data, cfg.validation_data)


#: sequences per domain read from the test records: all of them (the cap only bounds the packing call)
TEST_SAMPLES_CAP = 1 << 40


def load_test_data(cfg: RunConfig, tokenizer: Any, names: Any, fn: str = "distill") -> Any:
    """``PackedDomains`` whose ``validation`` sets are ``cfg.test_data``'s records (every sequence of
    ``cfg.seq_len`` tokens they pack into, per domain: ``cfg.val_samples`` caps the validation sets
    only; cached like the training data), or None without test data. The test records must have
    exactly the run's domains ``names``."""
    import warnings

    if not cfg.test_data:
        return None
    with warnings.catch_warnings():  # the records on both sides, on purpose (only validation is read)
        warnings.filterwarnings("ignore", message="pack_files: validation records must not occur")
        packed = _pack(cfg, tokenizer, cfg.test_data, cfg.test_data, val_samples=TEST_SAMPLES_CAP)
    if tuple(packed.names) != tuple(names):
        raise ValueError(
            f"{fn}: test_data must have exactly the training domains {list(names)}; got {list(packed.names)}."
        )
    return packed


def report_test_split(
    parts: Components,
    test_data: Any,
    student: nn.Module,
    teacher: nn.Module,
    *,
    eval_batch_size: int,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Per-domain CE of ``student`` and ``teacher`` on the test sets of ``test_data`` (from
    ``load_test_data``), with the run's validation loss: ``student_ce``, ``teacher_ce``, ``gap``
    (lists over domains, nats/token), ``mean_gap``, ``worst_gap``. Nothing here reaches the
    mixture: the estimator is a fresh one."""
    est = DiscrepancyEstimator(
        test_data.validation_batches(eval_batch_size), loss_fn=parts.loss.validation_ce, device=device, progress=False
    )
    est.compute_teacher(teacher)
    disc = est.estimate(student)
    return {
        "student_ce": disc.student_ce.tolist(),
        "teacher_ce": disc.teacher_ce.tolist(),
        "gap": disc.gap.tolist(),
        "mean_gap": float(disc.gap.mean()),
        "worst_gap": float(disc.gap.max()),
        "sequences": [int(len(v)) for v in test_data.validation],
    }
