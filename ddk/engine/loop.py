"""The engine's own loop, the one ``ddk distill`` runs.

One run: load the models and the tokenizer (``ddk.engine.models``), pack the records per domain
or open the teacher cache (``load_run_data``), build the DDK components once
(``build_components``: sampler, estimator, the method's schedule, controller, the ``StepLoss`` of
training and validation), then train with AdamW and warm-up + cosine (``make_optimizer``). Every
stateful part is saved under a fixed key of ``checkpoint-<step>/`` (``ddk.engine.checkpoint``:
safetensors + JSON + a SHA-256 manifest written last): ``student``, ``optimizer``, ``scheduler``,
``rng``, ``controller`` (the online sums all-reduced), ``nonfinite``; the newest
``keep_checkpoints`` kept; resumed from the newest valid one. With several ranks (or ``fsdp``) every rank
writes its shard of the student and optimizer and a checkpoint resumes at any number of ranks
(``ddk.engine.sharded``); under FSDP2 ``student/`` is written one gathered tensor at a time
(``ddk.engine.export``).

The run folder: ``config.json``, ``metrics.jsonl``, ``controller.jsonl``, ``checkpoint-<step>/``,
``student/`` (``save_pretrained`` plus the tokenizer and ``ddk_run.json``: the digest of the config
that trained it and its teacher's identity), ``summary.json``, plots, and with ``report_to`` the
per-domain curves in ``tensorboard/`` or ``wandb/`` (``ddk.engine.tracking``). One writer: rank 0 holds
the folder's advisory lock (``.lock``) for the whole run. A fresh start (``resume=False``, or no
checkpoint) moves the previous run's files into ``replaced-<time>/``. SIGTERM/SIGINT finish the
current step, write a checkpoint and raise ``Preempted`` (the CLI exits with 75); at any other
moment (start-up, the final validation, saving the student) they raise ``Preempted`` at once
(``ddk.engine.preempt.stop_signals``). The same command then resumes. ``metrics.jsonl`` and
``controller.jsonl`` are appended without following links and fsynced before each checkpoint.

The loop checkpoints the sampler, the RNG states and the optimizer in one folder per step, which
keeps SIGKILL-and-resume bit-exact, and slices each global batch over the ranks itself, so DDP,
FSDP2 and one process follow the same trajectory. ``DDKTrainer`` runs transformers' loop over the
same components, step loss, state and evaluation.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ddk._io import disk_full_message, fsync_file, is_disk_full, open_nofollow, printable, warn_user
from ddk.distributed import (
    all_reduce_sum_,
    broadcast_object,
    check_same_across_ranks,
    collective_device,
    global_token_normalizer,
    init_from_env,
    is_distributed,
    rank_world,
    rank_zero_first,
    tensor_checksum,
)
from ddk.engine import checkpoint as ckpt
from ddk.engine.components import build_components, load_run_data, load_test_data, report_test_split
from ddk.engine.config import RunConfig
from ddk.engine.evaluate import discrepancy_report, validation_identity
from ddk.engine.export import save_final_student
from ddk.engine.methods import method_spec
from ddk.engine.models import autocast_dtype, load_models, teacher_identity, teacher_place
from ddk.engine.parallel import device_for, global_sums, parallelize, train_state
from ddk.engine.preempt import Preempted, StopSignals, set_stage, stop_signals
from ddk.engine.progress import TrainLog, show_bars
from ddk.engine.resume import check_resume_state, extension_refusal, restore_state
from ddk.engine.runfolder import (
    atomic_json,
    check_no_links,
    config_digest,
    log,
    move_aside,
    result_options,
    run_folder_lock,
)
from ddk.engine.sharded import read_checkpoint, save_sharded_checkpoint, sharded_checkpoints
from ddk.engine.step import DistillStep, check_loss_models, forward_backward, make_optimizer, seed_everything
from ddk.engine.tracking import NullTracker, Tracker, check_report_to, interval_scalars, open_tracker, step_scalars
from ddk.reliability import NonFiniteGuard, grad_norm
from ddk_kernels.types import KDLossOutput

__all__ = ["Preempted", "distill"]


def distill(cfg: RunConfig, *, prepared: Any = None) -> dict[str, Any]:
    """Distill one student with ``cfg.method``; write the run folder; return the summary.

    Many processes (``torchrun --nproc_per_node=R -m ddk.recipes.cli distill ...``): when
    ``WORLD_SIZE > 1`` (or with ``fsdp``) it initialises the process group (``dist_backend``) and
    destroys it at the end. The step is wrapped in DDP (the teacher replicated), or the student and
    the teacher sharded with FSDP2 (the teacher's shards in host memory with ``teacher_offload="cpu"``).
    ``batch_size`` is the global batch (a multiple of ``R * grad_accum``):
    every rank draws the same global batch and trains on ``batch[rank::R]``, in ``grad_accum``
    micro-batches. Each rank's loss is ``(its CE sum + gamma * its KL sum) / (N / R)``, ``N`` the
    all-reduced number of valid tokens of the whole global batch, so DDP/FSDP's mean of the R
    gradients is the one-process gradient. Only rank 0 writes files and prints.

    Args:
        cfg: the recipe config (``teacher``, ``student``, ``data``, ``method``, ``steps``, ...).
        prepared: ``(teacher, student, tokenizer, packed)`` already loaded (the demo), else loaded here.

    Returns:
        ``summary.json``'s content (on every rank; rank 0 writes it).

    Raises:
        ValueError: bad options or inputs (the message says what to fix); with
            ``on_nonfinite="raise"``, a NaN/inf loss or gradient (``NonFiniteError``).
    """
    cfg.validate("distill")  # idempotent: a RunConfig built in code gets the same checks and absolute paths
    with stop_signals("distill", "start-up"):  # SIGTERM/SIGINT: Preempted (exit 75), at any moment
        created = init_from_env(cfg.process_group_backend, force=cfg.fsdp)
        try:
            _check_run(cfg, rank_world()[1])
            with run_folder_lock(cfg):
                return _distill(cfg, prepared)
        except OSError as exc:
            if is_disk_full(exc):
                folder = _full_folder(exc, (cfg.run_dir, Path(cfg.data_dir)))
                then = "every finished step is in the newest checkpoint, from which it resumes."
                arg = "out" if cfg.run_dir in (folder, *folder.parents) else "data_dir"
                raise ValueError(disk_full_message("distill", arg, folder, exc, then=then)) from None
            raise
        finally:
            if created:
                dist.destroy_process_group()


def _full_folder(exc: OSError, folders: tuple[Path, ...]) -> Path:
    """The folder a full disk stopped: the one of the file named by ``exc``, else the candidate with the least space."""
    if exc.filename:
        return Path(os.fsdecode(exc.filename)).parent

    def free(p: Path) -> int:
        try:
            st = os.statvfs(p)
        except (OSError, AttributeError):
            return 1 << 62
        return st.f_bavail * st.f_frsize

    return min(folders, key=free)


def _check_run(cfg: RunConfig, world: int) -> None:
    method_spec(cfg.method, "distill")
    check_report_to(cfg.report_to, "distill")  # its package installed, before the models load
    if cfg.uses_demo:
        raise ValueError(
            "distill: teacher, student and data must be given (--teacher, --student, --data; or --student with "
            f"--teacher-cache); got no student (teacher={cfg.teacher!r}). `ddk distill` without them runs the "
            "bundled demo through ddk.recipes.demo."
        )
    if cfg.fsdp and not is_distributed():
        raise ValueError(
            "distill: fsdp must run under torchrun (it needs a process group); got a plain process. "
            "Launch with `torchrun --nproc_per_node=R -m ddk.recipes.cli distill --fsdp ...` or drop --fsdp."
        )
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(
            f"distill: batch_size (the global batch) must be a multiple of ranks x grad_accum = "
            f"{world} x {cfg.grad_accum}; got {cfg.batch_size}."
        )


def _resume(ck: dict[str, Any], path: Path, cfg_dict: dict[str, Any]) -> None:
    defaults = RunConfig().run_dict()  # options added since the checkpoint was written: their defaults
    unknown = sorted(set(ck["config"]) - set(defaults) - set(cfg_dict))
    if unknown:
        raise ckpt.CheckpointError(
            f"distill: the checkpoint {path} must hold a config of this recipe; got unknown options {unknown[:10]}."
        )
    old, new = result_options({**defaults, **ck["config"]}), result_options(cfg_dict)
    if old != new:
        diff = sorted(k for k in new if old.get(k) != new[k])
        longer = extension_refusal(old, new, path, ck.get("step")) if set(diff) <= {"steps", "tokens"} else None
        if longer is not None:
            raise ValueError(longer)
        raise ValueError(
            f"distill: the checkpoint {path} must be of the same config to resume; "
            f"got different {diff} (use another --out or --no-resume)."
        )


def _distill(cfg: RunConfig, prepared: Any) -> dict[str, Any]:
    with stop_signals("distill", "start-up"):
        run = _Run(cfg, prepared)
        start_step = run.start_or_resume()
    run.train(start_step)
    return run.finish()


class _Run:
    """One distillation run inside the (optional) process group: models, data, DDK components,
    optimizer, and the run folder's files. ``_distill`` calls its stages in order."""

    def __init__(self, cfg: RunConfig, prepared: Any) -> None:
        self.cfg = cfg
        self.rank, self.world = rank_world()
        self.device = device_for(cfg)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.t_start = time.perf_counter()
        self._load(prepared)
        self.out = cfg.run_dir
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics_path, self.ctrl_path = self.out / "metrics.jsonl", self.out / "controller.jsonl"
        self._metrics_file: Any = None  # open while training (rank 0); fsynced before each checkpoint
        self.tracker: Tracker = NullTracker()  # report_to's, open while training (rank 0); flushed likewise
        # (3 + D,) float64 since the previous logging step (report_to): CE sum, divergence sum and valid
        # target tokens of the trained (finite) batches, then the valid target tokens per domain
        self._span: torch.Tensor | None = None
        self._last_log = (0, 0.0)  # (step, time) of the previous logging step: the throughput
        self.cfg_dict = cfg.to_dict()
        self.steps = cfg.total_steps
        self.start_step = 0  # the step training starts after (start_or_resume)
        self._build()

    def _load(self, prepared: Any) -> None:
        """Teacher, student, tokenizer and the packed domains (loaded here unless ``prepared``)."""
        cfg, device = self.cfg, self.device
        if prepared is None:
            teacher, student, tokenizer = load_models(cfg, device)
            check_loss_models(cfg.loss, student, teacher)  # before the corpus is packed or anything written
            with rank_zero_first():  # rank 0 tokenizes and caches, the others then read the cache
                data = load_run_data(cfg, tokenizer)
        else:
            teacher, student, tokenizer, data = prepared
            student = student.to(device)
            teacher = teacher.to(teacher_place(cfg, device)) if teacher is not None else None
        self.spec = method_spec(cfg.method, "distill")
        # cpt measures the gap against a given teacher but never distills from it
        self.teacher, self.student, self.tokenizer, self.data = teacher, student, tokenizer, data
        self.names = list(data.names)
        with rank_zero_first():
            self.test_data = load_test_data(cfg, tokenizer, self.names)

    def _build(self) -> None:
        """The components (``build_components``), the training step (wrapped for DDP/FSDP2), optimizer, guard."""
        cfg = self.cfg
        self.parts = build_components(
            cfg,
            self.data,
            global_batch_size=cfg.batch_size,
            seed=cfg.seed,
            eval_batch_size=cfg.eval_batch_size,
            rank=self.rank,
            world_size=self.world,
            device=self.device,
            num_batches=self.steps,
            autocast=autocast_dtype(cfg, self.device),
            log_path=self.ctrl_path,
        )
        self.sampler, self.estimator, self.controller = self.parts.sampler, self.parts.estimator, self.parts.controller
        self.train_ds = self.parts.train_dataset
        self.parts.loss.check_models(self.student, self.teacher)  # before any file is written
        self.step_mod = DistillStep(self.student, self.teacher if self.spec.teacher else None, self.parts.loss)
        # the teacher's checksum before FSDP2 shards it (a rank then holds a slice of each tensor)
        self.teacher_identity = teacher_identity(self.teacher, self.data) if self.rank == 0 else None
        # step_mod stays the bare module; with fsdp the teacher is sharded too
        self.model = parallelize(self.step_mod, self.student, cfg, self.device, self.teacher)
        self.opt, self.sched = make_optimizer(
            self.step_mod, cfg.lr, cfg.weight_decay, cfg.warmup_steps, self.steps, cfg.min_lr_ratio
        )
        self.guard = NonFiniteGuard(
            cfg.on_nonfinite,
            domain_names=self.names,
            fn="distill",
            hint="pass --on-nonfinite skip (config on_nonfinite: skip) to skip such batches; "
            "the run resumes from its last checkpoint",
        )

    def start_or_resume(self) -> int:
        """Resume from the newest valid checkpoint (rank 0 picks it, every rank loads it), else start: Eq. 1.

        A newest checkpoint that is torn or corrupted (manifest, sizes, SHA-256) is passed over
        with a warning for the previous one; if none is usable, nothing is written and the error
        says why. A fresh start moves the previous run's files aside (``replaced-<time>/``).
        """
        cfg, out = self.cfg, self.out
        picked: tuple[Path | None, str] = (None, "")
        if self.rank == 0:
            check_no_links(out)  # before anything is written: no run file is a link out of the folder
            ckpt.remove_stale_temporaries(out)
            if cfg.resume:
                try:
                    picked = (self._pick_checkpoint(), "")
                except ValueError as exc:  # every rank raises it, none waits on the others
                    picked = (None, str(exc))
        path, error = broadcast_object(picked)
        if error:
            raise ValueError(error)
        if path is None:
            if self.rank == 0:
                move_aside(out)
                atomic_json(out / "config.json", self.cfg_dict)
            self.parts.ensure_teacher_ce(self.teacher, self.step_mod)  # a resume reads it from the checkpoint
            self.controller.start(self.step_mod)
            seed_everything(cfg.seed)  # dropout and anything random in the step: a pure function of the seed
            log(
                f"distill: {cfg.method} on {len(self.names)} domains, {self.steps} steps of {cfg.batch_size} x "
                f"{cfg.sequence_length} tokens, into {out}"
            )
            if cfg.warmup_steps >= self.steps and self.rank == 0:
                warn_user(
                    f"distill: warmup_steps ({cfg.warmup_steps}) >= steps ({self.steps}): the whole run is warm-up, "
                    f"its learning rate rises and never decays; pass a smaller --warmup-steps (e.g. {self.steps // 10})."
                )
            return 0
        start = self._load_checkpoint(path)
        if self.rank == 0:
            ckpt.truncate_jsonl(self.metrics_path, start)
            ckpt.truncate_jsonl(self.ctrl_path, start)
        if start >= self.steps:  # a finished run: finish() validates it again and rewrites its files
            log(f"distill: {out} is finished (step {start} of {self.steps}); nothing to train")
        else:
            log(f"distill: resumed {out} at step {start}")  # a status line, with or without progress bars
        self.start_step = start
        return start

    def _pick_checkpoint(self) -> Path | None:
        """The newest verified checkpoint of the run folder (warning about newer unusable ones), or None."""
        out = self.out
        path, passed = ckpt.newest_valid_checkpoint(out)
        if passed:
            if path is None:
                raise ValueError(
                    f"distill: a checkpoint of {out} must be complete and intact to resume; got none: "
                    + " ".join(passed)
                    + " Nothing was overwritten: pass --no-resume to start over (the old "
                    "run is moved aside), or use another --out."
                )
            for why in passed:
                log(f"warning: {why} Resuming from the previous valid checkpoint {path.name}.")
        legacy = ckpt.legacy_checkpoints(out)
        if path is None and legacy:
            raise ValueError(
                f"distill: the checkpoints of {out} must be checkpoint-<step>/ folders (safetensors + "
                f"JSON) to resume; got {[p.name for p in legacy]} of an older ddk, which are never "
                "loaded (unpickling can run code). Pass --no-resume to start over (the old run is moved "
                "aside), or use another --out."
            )
        return path

    def _load_checkpoint(self, path: Path) -> int:
        """Restore every state of the checkpoint ``path``; return its step."""
        ck = read_checkpoint(path, step_mod=self.step_mod, student=self.student, opt=self.opt, fsdp=self.cfg.fsdp)
        _resume(ck, path, self.cfg_dict)
        parts = dict(
            student=self.student, opt=self.opt, sched=self.sched, controller=self.controller, fsdp=self.cfg.fsdp
        )
        parsed = check_resume_state(ck, path, steps=self.steps, **parts)  # the whole state, before anything changes
        try:
            step = restore_state(ck, parsed, step_mod=self.step_mod, guard=self.guard, **parts)
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as exc:
            raise ValueError(
                f"distill: the checkpoint {path} must hold the state of this run to resume; got "
                f"{type(exc).__name__}: {exc} Nothing was overwritten: pass --no-resume to start over "
                "(the old run is moved aside), or use another --out."
            ) from None
        self._check_teacher_ce(path)
        return step

    def _check_teacher_ce(self, path: Path) -> None:
        """The teacher CE a checkpoint carries steers the mixture: it must be what its source gives
        now (the teacher model, measured again, or the cache's manifest). A ``cpt`` run without a
        teacher measured its reference on the student at the start, which cannot be measured again."""
        est = self.estimator
        saved = est.teacher_ce
        manifest_ce = getattr(self.data, "teacher_ce", None)
        if self.teacher is not None:
            fresh = est.compute_teacher(self.teacher, force=True)
        elif manifest_ce is not None:
            fresh = torch.as_tensor(manifest_ce, dtype=torch.float64)
        else:
            return
        est.teacher_ce = saved  # the resumed run goes on with the bits it saved
        if not torch.allclose(fresh, saved, rtol=1e-4, atol=1e-6):
            raise ckpt.CheckpointError(
                f"distill: the checkpoint {path} must carry the teacher's per-domain CE; got "
                f"{[round(x, 6) for x in saved.tolist()]} where the teacher gives {[round(x, 6) for x in fresh.tolist()]}. "
                "Nothing was overwritten: pass --no-resume to start over (the old run is moved aside), or use "
                "another --out."
            )

    def save(self, step: int) -> None:
        """``checkpoint-<step>/``: one process writes it whole; under FSDP2 or with several ranks
        every rank writes its shard of the student and optimizer (``ddk.engine.sharded``), rank 0 the rest."""
        sharded = sharded_checkpoints(self.cfg.fsdp, self.world)
        student_state, opt_state = (
            (None, None) if sharded else train_state(self.step_mod, self.student, self.opt, False)
        )
        ctrl_state = ckpt.controller_state(self.controller, self.device)  # every rank's online sums
        state: dict[str, Any] | None = None
        if self.rank == 0:
            self._sync_logs()  # the logs up to this step are on the disk before its checkpoint is
            state = {
                "config": self.cfg_dict,
                **({} if sharded else {"student": student_state, "optimizer": opt_state}),
                "scheduler": self.sched.state_dict(),
                "rng": ckpt.rng_state(),
                "controller": ctrl_state,
                "nonfinite": self.guard.state_dict(),
            }
            if not sharded:
                ckpt.save_checkpoint(self.out, step, state, self.cfg.keep_checkpoints)
        if sharded:
            save_sharded_checkpoint(self.out, step, state, self.step_mod, self.opt, self.cfg.keep_checkpoints)
        log(f"distill: step {step}/{self.steps}: saved checkpoint-{step}")  # a status line, bars or none

    def _sync_logs(self) -> None:
        """``fsync`` of ``metrics.jsonl`` and ``controller.jsonl`` (rank 0, at each checkpoint)."""
        if self._metrics_file is not None:
            self._metrics_file.flush()
            os.fsync(self._metrics_file.fileno())
        if self.ctrl_path.is_file():
            fsync_file(self.ctrl_path)
        self.tracker.flush()

    def train_step(self, step: int, collate: Any) -> tuple[KDLossOutput, bool]:
        """One optimizer step on this rank's slice of the next global batch; ``(output, finite)``."""
        idx = torch.as_tensor(self.sampler.next_global_batch())[self.rank :: self.world]
        batch = {k: v.to(self.device) for k, v in collate([self.train_ds[int(i)] for i in idx]).items()}
        norm = global_token_normalizer((batch["labels"][:, 1:] != -100).sum())
        lo = forward_backward(self.model, batch, norm, self.cfg.grad_accum)
        params = self.student.parameters()
        gnorm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip) if self.cfg.grad_clip else grad_norm(params)
        if hasattr(gnorm, "full_tensor"):  # FSDP2: a DTensor; the guard all-reduces plain tensors
            gnorm = gnorm.full_tensor()
        dom_tok = batch["domain_ids"].unsqueeze(1).expand(-1, batch["input_ids"].shape[1] - 1).reshape(-1)
        finite = self.guard.check(step, lo, grad_norm=gnorm, domain_ids=dom_tok)
        if finite:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)  # skipped (on_nonfinite="skip"): no update; step, sampler, LR advance
        self.sched.step()
        if self.controller.online and finite:
            self.controller.observe(lo)
        return lo, finite

    def train(self, start_step: int) -> None:
        """Steps ``start_step + 1 .. steps``: DDK updates, metrics, debug checks, checkpoints."""
        from ddk.data import DomainCollator, TeacherCache, TeacherCacheCollator

        cfg, steps = self.cfg, self.steps
        collate = TeacherCacheCollator() if isinstance(self.data, TeacherCache) else DomainCollator()
        debug = cfg.debug_checks or os.environ.get("DDK_DEBUG", "") not in ("", "0")
        self.student.train()
        self._last_log = (start_step, time.perf_counter())
        report = TrainLog(  # a bar on a terminal, else a plain line per logging step (rank 0)
            f"distill {cfg.method}", start_step, steps, self.names, bars=show_bars(cfg.progress), enabled=self.rank == 0
        )
        with (
            open_nofollow(self.metrics_path, "a", fn="distill") if self.rank == 0 else open(os.devnull, "w") as mf,
            stop_signals("distill", "training") as stop,
            stop.defer(),  # a signal finishes the step and writes a checkpoint
            self._tracking(start_step),
        ):
            self._metrics_file = mf if self.rank == 0 else None
            for step in range(start_step + 1, steps + 1):
                lo, finite = self.train_step(step, collate)
                if self.cfg.report_to != "none":  # the terms and tokens of the span since the previous logging step
                    self._add_span(lo, finite)
                n_rec = len(self.controller.records)
                self.controller.step_end(step, self.step_mod)
                rec = _metrics(self, step, lo, finite, n_rec)
                tokens_per_s = self._throughput(step) if rec is not None else None
                self._track(step, rec, n_rec, tokens_per_s)
                report.step(step, rec, tokens_per_s)
                if rec is not None:
                    mf.write(json.dumps(rec) + "\n")
                    mf.flush()
                if debug and (step % cfg.interval == 0 or step == steps):
                    sums = {
                        "domain weights": tensor_checksum([torch.tensor(self.sampler.weights, dtype=torch.float64)])
                    }
                    if not cfg.fsdp:  # FSDP shards differ by design
                        sums["student parameters"] = tensor_checksum(self.student.parameters())
                    check_same_across_ranks(sums, where=f"distill step {step}")
                saved = step % cfg.checkpoint_every == 0 or step == steps
                if saved:
                    self.save(step)
                signum = self._stop_signal(stop)
                if signum:
                    if not saved:
                        self.save(step)
                    report.close()
                    name = stop.signame or f"signal {signum}"
                    stop.handled = True  # Preempted's message says it (the CLI prints it: one line)
                    raise Preempted(name, step, str(self.out / f"checkpoint-{step}"))
            self._metrics_file = None
        report.close()

    @contextlib.contextmanager
    def _tracking(self, start_step: int) -> Iterator[None]:
        """``report_to``'s tracker (rank 0) while training, closed however it ends; a fresh start reports Eq. 1."""
        if self.rank != 0 or self.cfg.report_to == "none":
            yield
            return
        self.tracker = open_tracker(self.cfg.report_to, self.out, start_step=start_step, config=self.cfg_dict)
        try:
            if start_step == 0:
                for rec in self.controller.records:  # the init record of ``controller.start``
                    self.tracker.log_scalars(interval_scalars(rec), int(rec["step"]))
            yield
        finally:
            self.tracker.close()
            self.tracker = NullTracker()

    def _throughput(self, step: int) -> float:
        """Tokens per second (all ranks) since the previous logging step; ``step`` becomes that step."""
        last_step, last_time = self._last_log
        now = time.perf_counter()
        self._last_log = (step, now)
        return (step - last_step) * self.cfg.batch_size * self.cfg.sequence_length / max(now - last_time, 1e-9)

    def _add_span(self, lo: KDLossOutput, finite: bool) -> None:
        """Add a step's sums (this rank's, on its device: no host sync) to those of the logging span."""
        head = torch.stack([lo.ce_sum.detach(), lo.kd_sum.detach(), lo.num_tokens.detach()]).double()
        if not finite:  # a skipped batch trained nothing: only its tokens count
            head = torch.zeros_like(head)
        v = torch.cat([head, lo.domain_tokens.detach().double()])
        self._span = v if self._span is None else self._span + v

    def _track(self, step: int, rec: dict[str, Any] | None, n_rec: int, tokens_per_s: float | None) -> None:
        """The step's scalars to the tracker: the controller's new records, throughput, and over the
        span since the previous logging step, all ranks (as ``DDKTrainer`` logs): ``loss``, ``ce``
        and ``kd`` per valid target token of the trained batches, and the valid target tokens per domain."""
        span, terms = None, None
        if rec is not None and self._span is not None:  # every rank: one all-reduce per logging step
            v = all_reduce_sum_(self._span).tolist()
            self._span = None
            span = [round(x) for x in v[3:]]
            if v[2] > 0:
                gamma = self.parts.loss.gamma
                terms = {"loss": (v[0] + gamma * v[1]) / v[2], "ce": v[0] / v[2], "kd": v[1] / v[2]}
        if isinstance(self.tracker, NullTracker):
            return
        scalars: dict[str, float] = {}
        for r in self.controller.records[n_rec:]:
            scalars.update(interval_scalars(r))
        if rec is not None:
            scalars.update(step_scalars(rec, self.names, tokens_per_s, domain_tokens=span, terms=terms))
        if scalars:
            self.tracker.log_scalars(scalars, step)

    def _stop_signal(self, stop: StopSignals) -> int:
        """The signal number any rank received (0: none); one small all-reduce per step under torchrun."""
        flag = stop.signum or 0
        if self.world > 1:
            t = torch.tensor([float(flag)], device=collective_device(self.device))
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = int(t.item())
        return flag

    def finish(self) -> dict[str, Any]:
        """Final validation pass, ``student/`` and ``summary.json`` (rank 0 writes)."""
        cfg, out = self.cfg, self.out
        self.student.eval()
        set_stage("the final validation")
        final = discrepancy_report(self.parts, self.step_mod, self.teacher)
        if self.test_data is not None:
            assert self.teacher is not None  # RunConfig.validate: test_data needs a teacher
            final["test"] = report_test_split(
                self.parts,
                self.test_data,
                self.step_mod,
                self.teacher,
                eval_batch_size=cfg.eval_batch_size,
                device=self.device,
            )
        set_stage("saving the student")
        save_final_student(  # under FSDP2 one tensor at a time, never the whole student on a rank
            self.step_mod,
            self.student,
            self.tokenizer,
            out,
            fsdp=cfg.fsdp,
            run_info={
                "config_digest": config_digest(cfg),
                "teacher_identity": self.teacher_identity,
                "method": cfg.method,
                "steps": self.steps,
            },
        )
        summary = {
            "method": cfg.method,
            "seed": cfg.seed,
            **final,
            "final_weights": list(self.sampler.weights),
            "samples_per_domain": self.sampler.cumulative_counts().tolist(),
            "skipped_batches": self.guard.skipped_batches,
            "skipped_steps": list(self.guard.skipped_steps),
            "tokens": self.steps * cfg.batch_size * cfg.sequence_length,
            "wall_seconds": time.perf_counter() - self.t_start,
            "student_params": sum(p.numel() for p in self.student.parameters()),
            "teacher_params": sum(p.numel() for p in self.teacher.parameters()) if self.teacher is not None else 0,
            "teacher_identity": self.teacher_identity,
            "validation_identity": validation_identity(self.data) if self.rank == 0 else None,
        }
        set_stage("writing summary.json")
        if self.rank == 0:
            atomic_json(out / "summary.json", summary)
        worst = int(np.argmax(final["gap"]))
        secs, start = summary["wall_seconds"], self.start_step
        if start >= self.steps:
            done = f"nothing trained (finished before); validated again in {secs:.0f} s"
        else:
            done = f"done: {self.steps} steps" + (f" ({self.steps - start} after the resume)" if start else "")
            done += f" in {secs:.0f} s"
        log(
            f"distill: {done}; validation gap mean {final['mean_gap']:.4f}, worst {final['worst_gap']:.4f} "
            f"({printable(self.names[worst])}); student in {out / 'student'}"
        )
        return summary


def _metrics(run: _Run, step: int, lo: KDLossOutput, finite: bool, n_rec: int) -> dict[str, Any] | None:
    """The ``metrics.jsonl`` record of a step (every ``log_every`` and ``interval`` steps, skipped ones, the last)."""
    cfg = run.cfg
    at_interval = step % cfg.interval == 0 or step == run.steps
    if finite and step % cfg.log_every and not at_interval:
        return None
    gamma = run.parts.loss.gamma
    ce_sum, kd_sum, num_tok, dom_tok = global_sums(lo)  # over all ranks (as is in one process)
    tok = max(int(num_tok), 1)
    rec: dict[str, Any] = {
        "step": step,
        "tokens_seen": step * cfg.batch_size * cfg.sequence_length,
        "loss": (float(ce_sum) + gamma * float(kd_sum)) / tok,
        "ce": float(ce_sum) / tok,
        "kd": float(kd_sum) / tok,
        "lr": run.sched.get_last_lr()[0],
        "weights": list(run.sampler.weights),
        "batch_domain_tokens": dom_tok.tolist(),
        "skipped_batches": run.guard.skipped_batches,
    }
    if not finite:
        rec.update(skipped=True, loss=None, ce=None, kd=None)
    if at_interval:
        new = run.controller.records[n_rec:]
        if new and not run.controller.online:
            disc = new[-1]
            rec.update(student_ce=disc["student_ce"], teacher_ce=disc["teacher_ce"], ratio=disc["ratio"])
        else:
            e = run.estimator.estimate(run.step_mod)
            rec.update(student_ce=e.student_ce.tolist(), teacher_ce=e.teacher_ce.tolist(), ratio=e.ratio.tolist())
            if new:
                rec["online_ratio"] = new[-1]["ratio"]
    return rec
