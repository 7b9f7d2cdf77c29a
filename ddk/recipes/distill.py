"""``ddk distill``: distill the user's teacher into the user's student on a domain-labelled corpus.

One run: load the models and the tokenizer (``models``), pack the records per domain (``data``),
build the DDK components (``MixtureSampler``, ``DiscrepancyEstimator``, the method's weight schedule,
``DDKController``), then train with AdamW and warm-up + cosine; every step's loss is
``ddk.causal_lm_kd_loss`` (the fused ``lm_head`` loss unless ``loss=logits``), the same
batch-to-loss code ``DDKTrainer`` uses. Methods, at an equal token budget:

* ``cpt``: the student alone (CE; no teacher), uniform mixture;
* ``kd``: ``CE + gamma * KL(p_T || p_S)``, uniform mixture;
* ``ddk``: KD with DDK's mixture (Eq. 1, Eq. 2 every ``interval`` steps);
* ``ddk-no-smoothing``: the weights are ``softmax(ratio)`` at each update;
* ``ddk-online``: the discrepancy from the training batches' per-domain CE (the teacher's side
  is its validation CE), instead of validation passes;
* ``kd-doremi``: KD with DoReMi's reweighting (``ddk.DoReMiScheduler``: an exponentiated-gradient
  step on the student's excess CE over the teacher every ``interval`` steps, uniform start).

The run folder: ``config.json``, ``metrics.jsonl``, ``controller.jsonl``, ``checkpoint-<step>/``
(student, optimizer, LR schedule, RNG states, controller: safetensors + JSON + a SHA-256
manifest written last, see ``ddk.recipes.checkpoint``; the newest ``keep_checkpoints`` kept;
resumed from the newest valid one), ``student/`` (``save_pretrained`` plus the tokenizer and
``ddk_run.json``, the digest of the config that trained it), ``summary.json`` and plots.

A run folder has one writer: rank 0 holds its advisory lock (``.lock``, with its pid) for the
whole run, and a second ``ddk distill`` on it stops with an error naming that pid. A fresh start
(``--no-resume``, or no checkpoint) moves the previous run's files into ``replaced-<time>/``
instead of deleting them. SIGTERM/SIGINT finish the current step, write a checkpoint and raise
``Preempted`` (the CLI exits with 75); the same command then resumes.

This loop is the CLI's own rather than a layer over ``DDKTrainer``: it checkpoints the sampler,
the RNG states and the optimizer in one file per step, which is what makes SIGKILL-and-resume
bit-exact here (tested), and it slices each global batch over the ranks itself, so DDP, FSDP2
and one process follow the same trajectory. Both paths share the loss (``causal_lm_kd_loss``)
and the components.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ddk._io import atomic_write_text, folder_lock, json_fingerprint
from ddk.controller import DDKController
from ddk.discrepancy import DiscrepancyEstimator
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
from ddk.losses import KDLossOutput, causal_lm_kd_loss
from ddk.recipes import checkpoint as ckpt
from ddk.recipes.config import METHODS, RecipeConfig
from ddk.recipes.models import autocast_dtype, load_models, save_student
from ddk.recipes.parallel import device_for, full_student_state, global_sums, load_train_state, parallelize, train_state
from ddk.recipes.preempt import Preempted, StopSignals
from ddk.reliability import NonFiniteGuard, grad_norm
from ddk.sampling import MixtureSampler
from ddk.schedule import make_scheduler

__all__ = ["DistillStep", "Preempted", "config_digest", "distill", "evaluate", "make_optimizer"]

# options that may change between a checkpoint and its resume
RESUME_IGNORED = (
    "resume",
    "progress",
    "threads",
    "out",
    "log_every",
    "checkpoint_every",
    "data_dir",
    "offline",
    "on_nonfinite",
    "skip_bad_lines",
    "keep_checkpoints",
    "dist_backend",
    "debug_checks",
    "device",
)


# artefacts of a run, moved aside (never deleted) when the folder starts over
RUN_FILES = (
    "config.json",
    "metrics.jsonl",
    "controller.jsonl",
    "summary.json",
    "eval.json",
    "weights.png",
    "gaps.png",
    "student",
)
RUN_INFO = "ddk_run.json"  # in student/: the digest of the config that trained it


def config_digest(cfg_dict: dict[str, Any]) -> str:
    """Digest of the options that determine a run's result (``RESUME_IGNORED`` left out)."""
    return json_fingerprint({k: v for k, v in cfg_dict.items() if k not in RESUME_IGNORED})


def log(msg: str) -> None:
    """Print to stderr from rank 0 only."""
    if rank_world()[0] == 0:
        print(msg, file=sys.stderr, flush=True)


def atomic_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2))


class DistillStep(nn.Module):
    """The training step as a module: the student is its submodule, the teacher is held outside
    its parameters (never trained, never sharded with the student).

    ``forward(input_ids (B, L), labels (B, L), domain_ids (B,), normalizer, distill=True, cached=None)``
    returns ``(loss, KDLossOutput)`` from ``ddk.causal_lm_kd_loss`` (``cached``: the batch's
    ``(teacher_topk_ids, teacher_topk_logprobs, teacher_tail)`` from a teacher cache); one forward touches every student
    parameter (``lm_head`` included), so DDP and FSDP2 reduce its gradients. ``distill=False``
    gives the student's CE alone (the validation passes; under FSDP2 they too must enter through
    the root module).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        *,
        num_domains: int,
        gamma: float,
        temperature: float,
        loss: str,
        backend: str,
        autocast: torch.dtype | None,
        cached: bool = False,
    ) -> None:
        super().__init__()
        self.student = student
        self._teacher = [teacher]  # a list: not a submodule
        self.num_domains = num_domains
        self.cached = cached  # the teacher comes with each batch (a teacher cache)
        kd_on = teacher is not None or cached
        self.options = dict(gamma=gamma if kd_on else 0.0, temperature=temperature, backend=backend)
        self.loss = loss
        self.autocast = autocast

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        domain_ids: torch.Tensor | None = None,
        normalizer: torch.Tensor | None = None,
        distill: bool = True,
        cached: tuple[torch.Tensor, ...] | None = None,
    ) -> tuple[torch.Tensor, KDLossOutput]:
        batch = {"input_ids": input_ids, "labels": labels}
        if distill and self.cached and cached is not None:  # (top-k ids, log-probabilities, tail) of the teacher
            batch.update(zip(("teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail"), cached))
        with torch.autocast(
            input_ids.device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None
        ):
            if not distill:
                out = causal_lm_kd_loss(self.student, None, batch, gamma=0.0)
            else:
                out = causal_lm_kd_loss(
                    self.student,
                    self._teacher[0],
                    batch,
                    domain_ids=domain_ids,
                    num_domains=self.num_domains,
                    loss=self.loss,
                    normalizer=normalizer,
                    **self.options,
                )
        return out.loss, out


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), NumPy and Python's ``random``."""
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def validation_ce(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(CE sum, tokens)`` of a causal LM (or a ``DistillStep``'s student) on one validation batch,
    by the fused loss (no ``(B, L, V)`` logits); the estimator's ``loss_fn``."""
    ids = batch["input_ids"]
    labels = batch.get("labels", ids)
    if isinstance(model, DistillStep):
        out = model(ids, labels, distill=False)[1]
    else:
        out = causal_lm_kd_loss(model, None, {"input_ids": ids, "labels": labels}, gamma=0.0)
    return out.ce_sum.double(), out.num_tokens


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float, warmup: int, total: int, min_ratio: float
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no decay on norms and biases) + linear warm-up to ``lr`` then cosine to ``lr * min_ratio``."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def sum_outputs(outs: list[KDLossOutput]) -> KDLossOutput:
    """One ``KDLossOutput`` of a step's micro-batches (losses are already over the global normaliser)."""
    if len(outs) == 1:
        return outs[0]
    return KDLossOutput(
        *(
            sum(getattr(o, f) for o in outs)
            for f in ("loss", "ce_sum", "kd_sum", "num_tokens", "domain_ce_sum", "domain_kd_sum", "domain_tokens")
        )
    )


def distill(cfg: RecipeConfig, *, prepared: Any = None) -> dict[str, Any]:
    """Distill one student with ``cfg.method``; write the run folder; return the summary.

    Many processes (``torchrun --nproc_per_node=R -m ddk.recipes.cli distill ...``): when
    ``WORLD_SIZE > 1`` (or with ``fsdp``) it initialises the process group (``dist_backend``) and
    destroys it at the end. The step is wrapped in DDP, or the student sharded with FSDP2; the
    teacher is replicated. ``batch_size`` is the global batch (a multiple of ``R * grad_accum``):
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
    created = init_from_env(cfg.process_group_backend, force=cfg.fsdp)
    try:
        _check_run(cfg, rank_world()[1])
        with run_folder_lock(cfg):
            return _distill(cfg, prepared)
    finally:
        if created:
            dist.destroy_process_group()


def run_folder_lock(cfg: RecipeConfig) -> Any:
    """The run folder's lock on rank 0 (``ddk._io.folder_lock``; also checks it can be written); nothing elsewhere."""
    if rank_world()[0] != 0:
        return _nullcontext()
    return folder_lock(
        cfg.run_dir, "distill", "out", hint="Wait for that run to finish (or stop it), or pass another --out."
    )


def _check_run(cfg: RecipeConfig, world: int) -> None:
    if cfg.method not in METHODS:
        raise ValueError(f"distill: method must be one of {METHODS}; got {cfg.method!r}.")
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
    defaults = RecipeConfig().to_dict()  # options added since the checkpoint was written: their defaults
    unknown = sorted(set(ck["config"]) - set(defaults))
    if unknown:
        raise ckpt.CheckpointError(
            f"distill: the checkpoint {path} must hold a config of this recipe; got unknown options {unknown[:10]}."
        )
    old = {k: v for k, v in {**defaults, **ck["config"]}.items() if k not in RESUME_IGNORED}
    new = {k: v for k, v in cfg_dict.items() if k not in RESUME_IGNORED}
    if old != new:
        diff = sorted(k for k in new if old.get(k) != new[k])
        raise ValueError(
            f"distill: the checkpoint {path} must be of the same config to resume; "
            f"got different {diff} (use another --out or --no-resume)."
        )


def _distill(cfg: RecipeConfig, prepared: Any) -> dict[str, Any]:
    run = _Run(cfg, prepared)
    start_step = run.start_or_resume()
    run.train(start_step)
    return run.finish()


class _Run:
    """One distillation run inside the (optional) process group: models, data, DDK components,
    optimizer, and the run folder's files. ``_distill`` calls its stages in order."""

    def __init__(self, cfg: RecipeConfig, prepared: Any) -> None:
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
        self.cfg_dict = cfg.to_dict()
        self.steps = cfg.total_steps
        self._build()

    def _load(self, prepared: Any) -> None:
        """Teacher, student, tokenizer and the packed domains (loaded here unless ``prepared``)."""
        cfg, device = self.cfg, self.device
        if prepared is None:
            teacher, student, tokenizer = load_models(cfg, device)
            from ddk.recipes.data import distill_data

            with rank_zero_first():  # rank 0 tokenizes and caches, the others then read the cache
                packed = distill_data(cfg, tokenizer)
        else:
            teacher, student, tokenizer, packed = prepared
            student = student.to(device)
            teacher = teacher.to(device) if teacher is not None else None
        self.teacher, self.student, self.tokenizer, self.packed = teacher, student, tokenizer, packed
        self.cached = bool(cfg.teacher_cache)  # packed is a ddk.data.TeacherCache
        self.names = list(packed.names)

    def _build(self) -> None:
        """The training step (wrapped for DDP/FSDP2), optimizer, sampler, estimator, smoother, controller, guard."""
        cfg, d = self.cfg, len(self.names)
        self.step_mod = DistillStep(
            self.student,
            None if cfg.method == "cpt" else self.teacher,
            num_domains=d,
            gamma=cfg.gamma,
            temperature=cfg.temperature,
            loss=cfg.loss,
            backend=cfg.backend,
            autocast=autocast_dtype(cfg, self.device),
            cached=self.cached and cfg.method != "cpt",
        )
        self.model = parallelize(self.step_mod, self.student, cfg, self.device)  # step_mod stays the bare module
        self.opt, self.sched = make_optimizer(
            self.step_mod, cfg.lr, cfg.weight_decay, cfg.warmup_steps, self.steps, cfg.min_lr_ratio
        )
        self.train_ds = self.packed.train_dataset()
        self.sampler = MixtureSampler(
            self.packed.sizes,
            cfg.batch_size,
            seed=cfg.seed,
            domain_names=self.names,
            num_batches=self.steps,
            rank=self.rank,
            world_size=self.world,
        )
        self.estimator = DiscrepancyEstimator(
            self.packed.validation_batches(cfg.eval_batch_size),
            loss_fn=validation_ce,
            device=self.device,
            progress=False,
        )
        if self.teacher is not None:
            self.estimator.compute_teacher(self.teacher)
        elif self.cached:  # the teacher's exact per-domain validation CE, from the cache's manifest
            self.estimator.teacher_ce = self.packed.teacher_ce
        else:  # cpt without a teacher: the logged "teacher" CE is the student's own at the start
            self.estimator.teacher_ce = self.estimator.estimate(self.step_mod).student_ce
        smoother = make_scheduler(
            cfg.method,
            d,
            alpha=cfg.alpha,
            init=cfg.ddk_init,
            step_size=cfg.doremi_step_size,
            smoothing=cfg.doremi_smoothing,
        )
        self.guard = NonFiniteGuard(
            cfg.on_nonfinite,
            domain_names=self.names,
            fn="distill",
            hint="pass --on-nonfinite skip (config on_nonfinite: skip) to skip such batches; "
            "the run resumes from its last checkpoint",
        )
        self.controller = DDKController(
            self.estimator,
            smoother,
            self.sampler,
            interval=cfg.interval,
            log_path=self.ctrl_path,
            online=cfg.method == "ddk-online",
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
                _move_aside(out)
                atomic_json(out / "config.json", self.cfg_dict)
            self.controller.start(self.step_mod)
            seed_everything(cfg.seed)  # dropout and anything random in the step: a pure function of the seed
            return 0
        start = self._load_checkpoint(path)
        if self.rank == 0:
            ckpt.truncate_jsonl(self.metrics_path, start)
            ckpt.truncate_jsonl(self.ctrl_path, start)
        if cfg.progress:
            log(f"distill: resumed {out} at step {start}")
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
        ck = ckpt.load_checkpoint(path)
        _resume(ck, path, self.cfg_dict)
        try:
            load_train_state(self.step_mod, self.student, self.opt, ck, self.cfg.fsdp)
            if not self.cfg.fsdp:
                _check_optimizer_state(self.opt)
            _check_like("scheduler", ck["scheduler"], self.sched.state_dict())
            self.sched.load_state_dict(ck["scheduler"])
            self.controller.load_state_dict(ck["controller"])
            self.guard.load_state_dict(ck.get("nonfinite", {"skipped_steps": []}))
            ckpt.set_rng_state(ck["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as exc:
            raise ValueError(
                f"distill: the checkpoint {path} must hold the state of this run to resume; got "
                f"{type(exc).__name__}: {exc} Nothing was overwritten: pass --no-resume to start over "
                "(the old run is moved aside), or use another --out."
            ) from None
        return int(ck["step"])

    def save(self, step: int) -> None:
        """``checkpoint-<step>/`` (rank 0 writes; under FSDP every rank gathers)."""
        student_state, opt_state = train_state(self.step_mod, self.student, self.opt, self.cfg.fsdp)
        ctrl_state = self.controller.state_dict()
        if self.world > 1 and self.controller.online:  # every rank's online sums, restored on rank 0 at resume
            acc = ctrl_state["estimator"]["online"] or [[0.0] * 4 for _ in self.names]
            acc = all_reduce_sum_(torch.tensor(acc, dtype=torch.float64, device=collective_device(self.device)))
            ctrl_state["estimator"]["online"] = acc.cpu().tolist()
        if self.rank == 0:
            state = {
                "config": self.cfg_dict,
                "student": student_state,
                "optimizer": opt_state,
                "scheduler": self.sched.state_dict(),
                "rng": ckpt.rng_state(),
                "controller": ctrl_state,
                "nonfinite": self.guard.state_dict(),
            }
            ckpt.save_checkpoint(self.out, step, state, self.cfg.keep_checkpoints)

    def train_step(self, step: int, collate: Any) -> tuple[KDLossOutput, bool]:
        """One optimizer step on this rank's slice of the next global batch; ``(output, finite)``."""
        idx = torch.as_tensor(self.sampler.next_global_batch())[self.rank :: self.world]
        batch = {k: v.to(self.device) for k, v in collate([self.train_ds[int(i)] for i in idx]).items()}
        norm = global_token_normalizer((batch["labels"][:, 1:] != -100).sum())
        lo = _forward_backward(self.model, batch, norm, self.cfg.grad_accum)
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
        from ddk.data import DomainCollator, TeacherCacheCollator

        cfg, steps = self.cfg, self.steps
        collate = TeacherCacheCollator() if self.cached else DomainCollator()
        debug = cfg.debug_checks or os.environ.get("DDK_DEBUG", "") not in ("", "0")
        self.student.train()
        bar = tqdm(
            range(start_step + 1, steps + 1),
            desc=f"distill {cfg.method}",
            initial=start_step,
            total=steps,
            disable=not cfg.progress or self.rank != 0,
        )
        with (
            self.metrics_path.open("a", encoding="utf-8") if self.rank == 0 else open(os.devnull, "w") as mf,
            StopSignals("distill") as stop,
        ):
            for step in bar:
                lo, finite = self.train_step(step, collate)
                n_rec = len(self.controller.records)
                self.controller.step_end(step, self.step_mod)
                rec = _metrics(self, step, lo, finite, n_rec)
                if rec is not None:
                    if "ratio" in rec:
                        bar.set_postfix(
                            loss="skipped" if rec["loss"] is None else f"{rec['loss']:.3f}",
                            gap=f"{np.mean(np.log(rec['ratio'])):.3f}",
                        )
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
                    bar.close()
                    name = stop.signame or f"signal {signum}"
                    log(
                        f"distill: stopped by {name} after step {step}; checkpoint-{step} written. Rerun the same "
                        "command to resume."
                    )
                    raise Preempted(name, step, str(self.out / f"checkpoint-{step}"))
        bar.close()

    def _stop_signal(self, stop: StopSignals) -> int:
        """The signal number any rank received (0: none); one small all-reduce per step under torchrun."""
        flag = stop.signum or 0
        if self.world > 1:
            t = torch.tensor([float(flag)], device=collective_device(self.device))
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = int(t.item())
        return flag

    def finish(self) -> dict[str, Any]:
        """Final validation pass, ``student/``, ``summary.json``, plots and the table (rank 0)."""
        cfg, out = self.cfg, self.out
        self.student.eval()
        final = self.estimator.estimate(self.step_mod)
        save_student(
            full_student_state(self.step_mod, self.student, cfg.fsdp),
            self.student,
            self.tokenizer,
            out,
            run_info={"config_digest": config_digest(self.cfg_dict), "method": cfg.method, "steps": self.steps},
        )
        summary = {
            "method": cfg.method,
            "seed": cfg.seed,
            "domains": self.names,
            "student_ce": final.student_ce.tolist(),
            "teacher_ce": final.teacher_ce.tolist(),
            "gap": final.gap.tolist(),
            "ratio": final.ratio.tolist(),
            "mean_gap": float(final.gap.mean()),
            "worst_gap": float(final.gap.max()),
            "mean_ratio": float(final.ratio.mean()),
            "final_weights": list(self.sampler.weights),
            "samples_per_domain": self.sampler.cumulative_counts().tolist(),
            "skipped_batches": self.guard.skipped_batches,
            "skipped_steps": list(self.guard.skipped_steps),
            "tokens": self.steps * cfg.batch_size * cfg.seq_len,
            "wall_seconds": time.perf_counter() - self.t_start,
            "student_params": sum(p.numel() for p in self.student.parameters()),
            "teacher_params": sum(p.numel() for p in self.teacher.parameters()) if self.teacher is not None else 0,
        }
        if self.rank != 0:
            return summary
        atomic_json(out / "summary.json", summary)
        from ddk.recipes.report import format_table, plots

        summary["plots"] = plots(out, cfg.method)
        print(format_table([summary]))
        for p in summary["plots"]:
            print(f"plot: {p}")
        return summary


def _move_aside(out: Path) -> Path | None:
    """Move the previous run's files (``RUN_FILES``, checkpoints) into ``out/replaced-<time>/``; never delete them."""
    old = [out / n for n in RUN_FILES if (out / n).exists()]
    old += [p for _, p in ckpt.checkpoints(out)] + ckpt.legacy_checkpoints(out)
    if not old:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = out / f"replaced-{stamp}"
    n = 1
    while dest.exists():
        n += 1
        dest = out / f"replaced-{stamp}-{n}"
    dest.mkdir()
    for p in old:
        os.replace(p, dest / p.name)
    log(f"distill: starting over in {out}; the previous run's files were moved to {dest}")
    return dest


def _check_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """Every per-parameter tensor of the loaded optimizer state has its parameter's shape."""
    for g, group in enumerate(opt.param_groups):
        for i, p in enumerate(group["params"]):
            for k, v in opt.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and v.dim() and v.shape != p.shape:
                    raise ValueError(
                        f"optimizer state {k!r} of parameter {i} of group {g} must have the parameter's "
                        f"shape {tuple(p.shape)}; got {tuple(v.shape)}."
                    )


def _check_like(where: str, got: Any, like: Any) -> None:
    """``got`` has the structure of ``like`` (same keys, list lengths and kinds of value; numbers interchange)."""

    def kind(x: Any) -> str:
        if isinstance(x, bool):
            return "bool"
        if isinstance(x, (int, float)):
            return "number"
        return "none" if x is None else type(x).__name__

    if isinstance(like, dict):
        if not isinstance(got, dict) or set(got) != set(like):
            raise ValueError(
                f"{where} must have the keys {sorted(like)}; got "
                f"{sorted(got) if isinstance(got, dict) else type(got).__name__}."
            )
        for k in like:
            _check_like(f"{where}.{k}", got[k], like[k])
    elif isinstance(like, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(like):
            raise ValueError(f"{where} must be a list of {len(like)}; got {str(got)[:80]}.")
        for i, (a, b) in enumerate(zip(got, like)):
            _check_like(f"{where}[{i}]", a, b)
    elif like is not None and kind(got) != kind(like):
        raise ValueError(f"{where} must be a {kind(like)}; got {got!r}.")
    elif kind(got) == "number" and not math.isfinite(got):
        raise ValueError(f"{where} must be finite; got {got!r}.")


def _forward_backward(
    model: nn.Module, batch: dict[str, torch.Tensor], norm: torch.Tensor | None, accum: int
) -> KDLossOutput:
    """Forward and backward of one rank's slice in ``accum`` micro-batches; returns their summed output.

    ``norm`` (the global valid-token count over the ranks) divides every micro-batch's sums, so the
    accumulated gradient is that of the whole global batch's mean, whatever its split. Under DDP
    only the last micro-batch all-reduces the gradients."""
    if norm is None:  # one process: the valid tokens of the whole batch (not of each micro-batch)
        norm = (batch["labels"][:, 1:] != -100).sum().clamp(min=1)
    outs = []
    chunks = [torch.arange(batch["input_ids"].shape[0]).chunk(accum)[i] for i in range(accum)]
    for i, rows in enumerate(chunks):
        last = i == accum - 1
        no_sync = getattr(model, "no_sync", None)  # DDP's: skip the all-reduce of all but the last micro-batch
        sync = no_sync() if callable(no_sync) and not last else _nullcontext()
        cached = None
        if "teacher_topk_ids" in batch:
            cached = tuple(batch[k][rows] for k in ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail"))
        with sync:
            loss, out = model(
                batch["input_ids"][rows], batch["labels"][rows], batch["domain_ids"][rows], norm, cached=cached
            )
            loss.backward()
        outs.append(out)
    return sum_outputs(outs)


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _metrics(run: _Run, step: int, lo: KDLossOutput, finite: bool, n_rec: int) -> dict[str, Any] | None:
    """The ``metrics.jsonl`` record of a step (every ``log_every`` and ``interval`` steps, skipped ones, the last)."""
    cfg = run.cfg
    at_interval = step % cfg.interval == 0 or step == run.steps
    if finite and step % cfg.log_every and not at_interval:
        return None
    gamma = 0.0 if cfg.method == "cpt" else cfg.gamma
    ce_sum, kd_sum, num_tok, dom_tok = global_sums(lo)  # over all ranks (as is in one process)
    tok = max(int(num_tok), 1)
    rec: dict[str, Any] = {
        "step": step,
        "tokens_seen": step * cfg.batch_size * cfg.seq_len,
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


def _read_run_config(run: Path, fn: str = "evaluate") -> RecipeConfig:
    """The ``config.json`` of a run folder, validated like user input (types, ranges, known options)."""
    from ddk.recipes.config import make_config

    path = run / "config.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"{fn}: {path} must be the JSON config written by ddk distill; got an unreadable file "
            f"({type(exc).__name__}: {exc})."
        ) from None
    if not isinstance(saved, dict):
        raise ValueError(f"{fn}: {path} must hold a mapping of config options; got {type(saved).__name__}.")
    try:
        return make_config(**saved)
    except ValueError as exc:
        raise ValueError(f"{fn}: {path} must be a valid config written by ddk distill; got: {exc}") from None


def _check_student_of(run: Path, cfg: RecipeConfig, fn: str = "evaluate") -> None:
    """``run/student`` was trained with ``run/config.json`` (its ``ddk_run.json`` holds the same digest)."""
    want = config_digest(cfg.to_dict())
    try:
        got = json.loads((run / "student" / RUN_INFO).read_text(encoding="utf-8")).get("config_digest")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        got = None
    if got != want:
        raise ValueError(
            f"{fn}: the student/ of {str(run)!r} must be the one trained with its config.json (config "
            f"digest {want}); got {'a student of config digest ' + repr(got) if got else 'a student without a readable ' + RUN_INFO}. "
            "It is left from another run: rerun `ddk distill` with this folder's config."
        )


def evaluate(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Per-domain validation CE of a finished run's student and of its teacher; writes ``eval.json``.

    The run's ``config.json`` is validated like user input, and the student must carry the digest
    of that config (``student/ddk_run.json``): a ``student/`` left from another run is refused.
    """
    from ddk.recipes.data import distill_data
    from ddk.recipes.models import load_pretrained
    from ddk.recipes.report import format_table

    run = Path(run_dir)
    if not (run / "student" / "config.json").is_file() or not (run / "config.json").is_file():
        raise ValueError(
            f"evaluate: run_dir must be a finished distill run (with config.json and student/); got {str(run)!r}."
        )
    cfg = _read_run_config(run)
    _check_student_of(run, cfg)
    device = device_for(cfg)
    teacher, _, tokenizer = load_models(cfg, device)
    student = load_pretrained("student", str(run / "student"), fn="evaluate").to(device).eval()
    packed = distill_data(cfg, tokenizer)
    est = DiscrepancyEstimator(
        packed.validation_batches(cfg.eval_batch_size), loss_fn=validation_ce, device=device, progress=cfg.progress
    )
    if teacher is not None:
        est.compute_teacher(teacher)
    else:
        est.teacher_ce = est.estimate(student).student_ce
    disc = est.estimate(student)
    res = {
        "method": cfg.method,
        "seed": cfg.seed,
        "domains": list(packed.names),
        "student_ce": disc.student_ce.tolist(),
        "teacher_ce": disc.teacher_ce.tolist(),
        "gap": disc.gap.tolist(),
        "ratio": disc.ratio.tolist(),
        "mean_gap": float(disc.gap.mean()),
        "worst_gap": float(disc.gap.max()),
        "mean_ratio": float(disc.ratio.mean()),
    }
    atomic_json(run / "eval.json", res)
    print(format_table([res]))
    return res
