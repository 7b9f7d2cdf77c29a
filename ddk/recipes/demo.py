"""The bundled demo: a corpus from Debian and PyPI packages, a tokenizer trained on it, a teacher
pretrained on it and a fresh student, all cached under ``data_dir`` — then the same
``ddk distill --teacher --student --data`` path a user runs on their own models.

Stages (each cached, keyed by the hash of what determines it):

1. ``demo_corpus``: ``ddk.recipes.corpus.build_corpus`` writes ``<domain>/train.jsonl`` and
   ``<domain>/validation.jsonl``; a byte-level BPE tokenizer is trained on the training side.
2. ``demo_teacher``: a ``LlamaForCausalLM`` initialised locally and pretrained (CE only, through
   ``ddk.causal_lm_kd_loss`` with no teacher) on a uniform mixture of the packed domains, saved
   with ``save_pretrained`` and the tokenizer.
3. ``demo_student``: a smaller ``LlamaForCausalLM`` with random weights, saved likewise.
4. ``demo_config``: the config with ``teacher``, ``student``, ``tokenizer``, ``data`` and
   ``validation_data`` filled in; ``run_demo`` distills with it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ddk._io import atomic_write_text, file_sha256, folder_lock
from ddk.distributed import broadcast_object, init_from_env, rank_world, rank_zero_first
from ddk.losses import causal_lm_kd_loss
from ddk.recipes.config import RecipeConfig
from ddk.recipes.distill import distill, log, make_optimizer, run_folder_lock
from ddk.sampling import MixtureSampler

__all__ = ["demo_config", "demo_corpus", "demo_student", "demo_teacher", "llama_config", "run_demo"]

META = "demo_meta.json"
_TEACHER_KEYS = (
    "teacher_hidden",
    "teacher_layers",
    "teacher_heads",
    "teacher_intermediate",
    "teacher_steps",
    "teacher_lr",
    "teacher_batch_size",
    "teacher_seed",
    "weight_decay",
    "grad_clip",
    "warmup_steps",
    "min_lr_ratio",
    "seq_len",
)


def demo_corpus(cfg: RecipeConfig) -> tuple[Path, list[str], Path]:
    """Build or reuse the demo corpus and its tokenizer: ``(corpus folder, domain names, tokenizer folder)``."""
    from ddk.recipes.corpus import CorpusConfig, build_corpus, domain_texts
    from ddk.recipes.tokenizer import train_tokenizer

    root = cfg.data_path
    ccfg = CorpusConfig(
        domains=tuple(cfg.domains),
        user_folders=dict(cfg.user_folders),
        user_jsonl=tuple(cfg.user_jsonl),
        max_chars=cfg.max_chars,
        validation_fraction=cfg.validation_fraction,
        seed=0,
        cache_dir=str(root / "debs"),
        offline=cfg.offline,
        skip_bad_lines=cfg.skip_bad_lines,
    )
    cdir = root / "corpus" / ccfg.key()
    with folder_lock(cdir, "demo_corpus", "data_dir", wait=True):  # one writer; another demo waits, then reuses
        man = build_corpus(cdir, ccfg, progress=cfg.progress)
        names = sorted(man["domains"])
        tdir = cdir / f"tokenizer-v{cfg.vocab_size}-{man['digest']}"  # keyed by the corpus files' digests
        if not (tdir / "tokenizer.json").is_file():
            log(f"tokenizer: training byte-level BPE (vocab {cfg.vocab_size}) on the training split")
            texts = domain_texts(cdir, "train", names, on_error="skip" if cfg.skip_bad_lines else "raise")
            train_tokenizer((t for d in names for t in texts[d]), tdir, vocab_size=cfg.vocab_size)  # atomic
    return cdir, names, tdir


def llama_config(cfg: RecipeConfig, who: str, vocab_size: int) -> Any:
    """A small ``LlamaConfig`` for ``who`` in ``{"teacher", "student"}`` (tied embeddings)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=getattr(cfg, f"{who}_hidden"),
        intermediate_size=getattr(cfg, f"{who}_intermediate"),
        num_hidden_layers=getattr(cfg, f"{who}_layers"),
        num_attention_heads=getattr(cfg, f"{who}_heads"),
        num_key_value_heads=getattr(cfg, f"{who}_heads"),
        max_position_embeddings=max(cfg.seq_len, 64),
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )


def _save_model(model: Any, tokenizer: Any, folder: Path, meta: dict[str, Any]) -> None:
    """``save_pretrained`` of model and tokenizer plus ``demo_meta.json`` (with every file's SHA-256),
    into ``folder`` atomically."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    meta = {**meta, "files": {f.name: file_sha256(f) for f in sorted(tmp.iterdir()) if f.is_file()}}
    atomic_write_text(tmp / META, json.dumps(meta, indent=2))
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def _cached_model(folder: Path, what: str) -> dict[str, Any] | None:
    """``demo_meta.json`` of a cached demo model whose files all have their recorded SHA-256, else None
    (a plain miss, or, with a warning, an unreadable meta file or a changed weight file: rebuilt)."""
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log(f"warning: {what}: rebuilding {folder}: its {META} is unreadable ({type(exc).__name__}: {exc})")
        return None
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or not files:
        log(f"warning: {what}: rebuilding {folder}: its {META} lists no file digests")
        return None
    for name, digest in files.items():
        f = folder / str(name)
        if Path(str(name)).name != name or not f.is_file() or file_sha256(f) != digest:
            log(f"warning: {what}: rebuilding {folder}: {f} is missing or changed since it was saved")
            return None
    return meta


def demo_teacher(cfg: RecipeConfig, packed: Any, tokenizer: Any) -> Path:
    """Pretrain (or find the cached) demo teacher on the packed demo corpus; return its folder.

    The pretraining checkpoints into ``<folder>.training`` and resumes from there after a crash
    or a SIGTERM/SIGINT (``Preempted``); the folder is removed once the teacher is saved.
    """
    from ddk.data import tokenizer_hash

    folder = cfg.data_path / "teachers" / cfg.hash_of(_TEACHER_KEYS, extra=[packed.key, tokenizer_hash(tokenizer)])
    meta = _cached_model(folder, "teacher")
    if meta is not None:
        if cfg.progress:
            log(f"teacher: cached at {folder} (trained in {float(meta.get('train_seconds') or 0):.0f} s)")
        return folder
    teacher, losses, seconds = _pretrain_teacher(cfg, packed, tokenizer, folder.with_name(folder.name + ".training"))
    meta = {
        "config": {k: getattr(cfg, k) for k in _TEACHER_KEYS},
        "data_key": packed.key,
        "domains": list(packed.names),
        "loss_curve": losses[::10],
        "final_loss": losses[-1] if losses else None,
        "train_seconds": seconds,
    }
    _save_model(teacher.eval(), tokenizer, folder, meta)
    shutil.rmtree(folder.with_name(folder.name + ".training"), ignore_errors=True)
    if cfg.progress:
        log(f"teacher: trained in {meta['train_seconds']:.0f} s, saved to {folder}")
    return folder


def _pretrain_teacher(cfg: RecipeConfig, packed: Any, tokenizer: Any, work: Path) -> tuple[Any, list[float], float]:
    """CE pretraining of the demo teacher: ``(teacher, loss per step, seconds)``.

    Checkpoints (the format of ``ddk distill``'s) go to ``work`` every ``checkpoint_every`` steps
    and when SIGTERM/SIGINT arrives (then ``Preempted`` is raised); a later call resumes from
    the newest valid one, bit-identically.
    """
    from transformers import LlamaForCausalLM

    from ddk.data import DomainCollator
    from ddk.recipes import checkpoint as ckpt
    from ddk.recipes.preempt import Preempted, StopSignals

    torch.manual_seed(cfg.teacher_seed)
    teacher = LlamaForCausalLM(llama_config(cfg, "teacher", len(tokenizer)))
    data, collate = packed.train_dataset(), DomainCollator()
    sampler = MixtureSampler(
        packed.sizes, cfg.teacher_batch_size, seed=cfg.teacher_seed + 1000, domain_names=list(packed.names)
    )
    opt, sched = make_optimizer(
        teacher, cfg.teacher_lr, cfg.weight_decay, cfg.warmup_steps, cfg.teacher_steps, cfg.min_lr_ratio
    )
    config = {k: getattr(cfg, k) for k in _TEACHER_KEYS}
    losses: list[float] = []
    start, seconds = 0, 0.0
    work.mkdir(parents=True, exist_ok=True)
    path, passed = ckpt.newest_valid_checkpoint(work, fn="teacher")
    for why in passed:
        log(f"teacher: skipping a damaged checkpoint: {why}")
    if path is not None:
        ck = ckpt.load_checkpoint(path, fn="teacher")
        teacher.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        sampler.load_state_dict(ck["sampler"])
        ckpt.set_rng_state(ck["rng"], fn="teacher")
        start, losses, seconds = int(ck["step"]), list(ck["losses"]), float(ck["seconds"])
        log(f"teacher: resumed from {path} at step {start}")

    def save(step: int, elapsed: float) -> Path:
        state = {
            "config": config,
            "model": teacher.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "sampler": sampler.state_dict(),
            "rng": ckpt.rng_state(),
            "losses": losses,
            "seconds": elapsed,
        }
        return ckpt.save_checkpoint(work, step, state, keep=1)

    t0 = time.perf_counter() - seconds
    teacher.train()
    bar = tqdm(
        range(start + 1, cfg.teacher_steps + 1),
        desc="teacher",
        initial=start,
        total=cfg.teacher_steps,
        disable=not cfg.progress,
    )
    with StopSignals("teacher") as stop:
        for step in bar:
            batch = collate([data[int(i)] for i in sampler.next_global_batch()])
            loss = causal_lm_kd_loss(teacher, None, {"input_ids": batch["input_ids"]}, gamma=0.0).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(teacher.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if step % 10 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if step % cfg.checkpoint_every == 0 or stop.signum:
                written = save(step, time.perf_counter() - t0)
                if stop.signum:
                    bar.close()
                    raise Preempted(stop.signame, step, str(written))
    bar.close()
    return teacher, losses, time.perf_counter() - t0


def demo_student(cfg: RecipeConfig, tokenizer: Any) -> Path:
    """A randomly initialised demo student (seed ``cfg.seed``) saved with ``save_pretrained``; return its folder."""
    from transformers import LlamaForCausalLM

    from ddk.data import tokenizer_hash

    keys = ("student_hidden", "student_layers", "student_heads", "student_intermediate", "seq_len", "seed")
    folder = cfg.data_path / "students" / cfg.hash_of(keys, extra=tokenizer_hash(tokenizer))
    if _cached_model(folder, "student") is None:
        torch.manual_seed(cfg.seed)
        _save_model(
            LlamaForCausalLM(llama_config(cfg, "student", len(tokenizer))),
            tokenizer,
            folder,
            {"config": {k: getattr(cfg, k) for k in keys}},
        )
    return folder


def demo_config(cfg: RecipeConfig) -> RecipeConfig:
    """``cfg`` with the demo's teacher, student, tokenizer and data (built or found in the cache).

    Under ``torchrun`` rank 0 builds the caches while the others wait, then they read them.
    """
    from ddk.data import load_records, pack_domains
    from ddk.recipes.tokenizer import load_tokenizer

    with rank_zero_first():
        cdir, names, tdir = demo_corpus(cfg)
        tokenizer = load_tokenizer(tdir)
        train = tuple(str(cdir / n / "train.jsonl") for n in names)
        validation = tuple(str(cdir / n / "validation.jsonl") for n in names)
        records = load_records(list(train), progress=cfg.progress)
        packed = pack_domains(
            records,
            tokenizer,
            seq_len=cfg.seq_len,
            val_samples=cfg.val_samples,
            validation=load_records(list(validation), progress=cfg.progress),
            cache_dir=cfg.data_path / "packed",
            progress=cfg.progress,
        )
        with folder_lock(cfg.data_path / "teachers", "demo_config", "data_dir", wait=True):  # one trainer per cache
            teacher = demo_teacher(cfg, packed, tokenizer)
        with folder_lock(cfg.data_path / "students", "demo_config", "data_dir", wait=True):
            student = demo_student(cfg, tokenizer)
    return dataclasses.replace(
        cfg, teacher=str(teacher), student=str(student), tokenizer=str(tdir), data=train, validation_data=validation
    )


def run_demo(cfg: RecipeConfig) -> dict[str, Any]:
    """Demo corpus + tokenizer + teacher + student (cached) + one distillation + table + plots, timed.

    A finished demo run is redone from scratch; an interrupted one resumes from its checkpoint.
    Under ``torchrun`` it runs on every rank like ``distill``.
    """
    created = init_from_env(cfg.process_group_backend, force=cfg.fsdp)
    try:
        with run_folder_lock(cfg):  # before the corpus and the teacher: a busy or read-only --out fails at once
            if broadcast_object((cfg.run_dir / "summary.json").is_file()):
                cfg = dataclasses.replace(cfg, resume=False)
            t0 = time.perf_counter()
            cfg = demo_config(cfg)
            t_prep = time.perf_counter() - t0
            summary = distill(cfg)
        if rank_world()[0] == 0:
            print(
                f"\ntimes: corpus + tokenizer + teacher {t_prep:.0f} s, distill {summary['wall_seconds']:.0f} s, "
                f"total {time.perf_counter() - t0:.0f} s"
            )
            print(f"run folder: {cfg.run_dir}")
        summary["demo_seconds"] = {"prepare": t_prep, "total": time.perf_counter() - t0}
        return summary
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()
