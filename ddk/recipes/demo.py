"""The bundled demo: a corpus from Debian and PyPI packages, a tokenizer trained on it, a teacher
pretrained on it and a fresh student, all cached under ``data_dir`` — then the same
``ddk distill --teacher --student --data`` path a user runs on their own models.

Stages (each cached, keyed by the hash of what determines it):

1. ``demo_corpus``: ``ddk.recipes.corpus.build_corpus`` writes ``<domain>/train.jsonl`` and
   ``<domain>/validation.jsonl``; a byte-level BPE tokenizer is trained on the training side.
2. ``demo_teacher``: a ``LlamaForCausalLM`` initialised locally and pretrained (CE only, through
   ``ddk.causal_lm_kd_loss`` with no teacher) on a uniform mixture of the packed domains, saved
   with ``save_pretrained`` and the tokenizer.
3. ``demo_student``: a smaller ``LlamaForCausalLM``, CE-pretrained on a uniform or a skewed
   mixture (``student_start``; or random weights), saved likewise: the paper's regime, a
   pretrained student distilled from a stronger teacher.
4. ``demo_config``: the config with ``teacher``, ``student``, ``tokenizer``, ``data`` and
   ``validation_data`` filled in; ``run_demo`` distills with it, ``compare_demo`` (``make demo``)
   distills the same student with KD and with DDK and prints both side by side.
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

from ddk._io import atomic_write_text, file_sha256, folder_lock, read_json
from ddk.distributed import broadcast_object, init_from_env, rank_world, rank_zero_first
from ddk.engine.progress import show_bars
from ddk.engine.runfolder import log, run_folder_lock
from ddk.engine.step import make_optimizer
from ddk.losses import causal_lm_kd_loss
from ddk.recipes.config import RecipeConfig
from ddk.recipes.distill import distill
from ddk.sampling import MixtureSampler

__all__ = [
    "DEMO_METHODS",
    "compare_demo",
    "demo_config",
    "demo_corpus",
    "demo_student",
    "demo_teacher",
    "llama_config",
    "run_demo",
    "student_mixture",
]

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
        test_fraction=cfg.test_fraction,
        seed=0,
        cache_dir=str(root / "debs"),
        offline=cfg.offline,
        skip_bad_lines=cfg.skip_bad_lines,
    )
    cdir = root / "corpus" / ccfg.key()
    with folder_lock(cdir, "demo_corpus", "data_dir", wait=True):  # one writer; another demo waits, then reuses
        man = build_corpus(cdir, ccfg, progress=show_bars(cfg.progress))
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
        max_position_embeddings=max(cfg.sequence_length, 64),
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
        meta = read_json(folder / META, fn="demo")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
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
    log(f"teacher: trained in {meta['train_seconds']:.0f} s, saved to {folder}")
    return folder


def _pretrain_teacher(cfg: RecipeConfig, packed: Any, tokenizer: Any, work: Path) -> tuple[Any, list[float], float]:
    """CE pretraining of the demo teacher on the uniform mixture: ``(teacher, loss per step, seconds)``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(cfg.teacher_seed)
    teacher = LlamaForCausalLM(llama_config(cfg, "teacher", len(tokenizer)))
    config = {k: getattr(cfg, k) for k in _TEACHER_KEYS}
    losses, seconds = _pretrain(
        cfg, teacher, packed, work, what="teacher", steps=cfg.teacher_steps, seed=cfg.teacher_seed, config=config
    )
    return teacher, losses, seconds


def _pretrain(
    cfg: RecipeConfig,
    model: Any,
    packed: Any,
    work: Path,
    *,
    what: str,
    steps: int,
    seed: int,
    config: dict[str, Any],
    weights: list[float] | None = None,
) -> tuple[list[float], float]:
    """CE pretraining of ``model`` on the packed demo corpus: ``(loss per step, seconds)``.

    ``teacher_lr`` (warm-up + cosine), ``teacher_batch_size`` sequences a step, drawn with the
    domain ``weights`` (None: uniform). Checkpoints (the format of ``ddk distill``'s) go to
    ``work`` every ``checkpoint_every`` steps and when SIGTERM/SIGINT arrives (then
    ``Preempted`` is raised); a later call resumes from the newest valid one, bit-identically.
    """
    from ddk.data import DomainCollator
    from ddk.engine import checkpoint as ckpt
    from ddk.engine.preempt import Preempted, StopSignals

    data, collate = packed.train_dataset(), DomainCollator()
    sampler = MixtureSampler(packed.sizes, cfg.teacher_batch_size, seed=seed + 1000, domain_names=list(packed.names))
    if weights is not None:
        sampler.set_weights(weights)
    opt, sched = make_optimizer(model, cfg.teacher_lr, cfg.weight_decay, cfg.warmup_steps, steps, cfg.min_lr_ratio)
    losses: list[float] = []
    start, seconds = 0, 0.0
    work.mkdir(parents=True, exist_ok=True)
    path, passed = ckpt.newest_valid_checkpoint(work, fn=what)
    for why in passed:
        log(f"{what}: skipping a damaged checkpoint: {why}")
    if path is not None:
        ck = ckpt.load_checkpoint(path, fn=what)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        sampler.load_state_dict(ck["sampler"])
        ckpt.set_rng_state(ck["rng"], fn=what)
        start, losses, seconds = int(ck["step"]), list(ck["losses"]), float(ck["seconds"])
        log(f"{what}: resumed from {path} at step {start}")

    def save(step: int, elapsed: float) -> Path:
        state = {
            "config": config,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "sampler": sampler.state_dict(),
            "rng": ckpt.rng_state(),
            "losses": losses,
            "seconds": elapsed,
        }
        return ckpt.save_checkpoint(work, step, state, keep=1)

    t0 = time.perf_counter() - seconds
    model.train()
    bar = tqdm(range(start + 1, steps + 1), desc=what, initial=start, total=steps, disable=not show_bars(cfg.progress))
    with StopSignals(what) as stop:
        for step in bar:
            batch = collate([data[int(i)] for i in sampler.next_global_batch()])
            loss = causal_lm_kd_loss(model, None, {"input_ids": batch["input_ids"]}, gamma=0.0).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
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
    return losses, time.perf_counter() - t0


def student_mixture(cfg: RecipeConfig, names: list[str]) -> list[float] | None:
    """The demo student's pretraining mixture: None (uniform) for ``student_start="uniform"``; for
    ``"skewed"``, weight ``scarce_share`` for each of ``scarce_domains`` and 1 for the others
    (normalised). An unknown scarce domain is an error naming the corpus's domains."""
    if cfg.student_start != "skewed":
        return None
    unknown = sorted(set(cfg.scarce_domains) - set(names))
    if unknown or not cfg.scarce_domains or set(cfg.scarce_domains) >= set(names):
        raise ValueError(
            f"demo_student: scarce_domains must be some, not all, of the corpus's domains {names}; got "
            f"{list(cfg.scarce_domains)}" + (f" (unknown: {unknown})." if unknown else ".")
        )
    raw = [cfg.scarce_share if n in cfg.scarce_domains else 1.0 for n in names]
    return [w / sum(raw) for w in raw]


_STUDENT_KEYS = ("student_hidden", "student_layers", "student_heads", "student_intermediate", "seq_len", "student_seed")
_STUDENT_PRETRAIN_KEYS = (
    "student_start",
    "student_pretrain_steps",
    "teacher_lr",
    "teacher_batch_size",
    "weight_decay",
    "grad_clip",
    "warmup_steps",
    "min_lr_ratio",
)


def demo_student(cfg: RecipeConfig, tokenizer: Any, packed: Any = None) -> Path:
    """The demo student (seed ``student_seed``), saved with ``save_pretrained``; return its folder.

    ``student_start="random"``: random weights. ``"uniform"`` / ``"skewed"``: CE-pretrained for
    ``student_pretrain_steps`` on ``packed`` with the uniform mixture, or with ``scarce_domains``
    drawn at ``scarce_share`` the rate of the others (``student_mixture``); the per-domain
    validation CE after pretraining goes into ``demo_meta.json``. Cached by config hash.
    """
    from transformers import LlamaForCausalLM

    from ddk.data import tokenizer_hash

    pretrained = cfg.student_start != "random" and cfg.student_pretrain_steps > 0
    keys = _STUDENT_KEYS + (_STUDENT_PRETRAIN_KEYS if pretrained else ())
    keys += ("scarce_domains", "scarce_share") if pretrained and cfg.student_start == "skewed" else ()
    if pretrained and packed is None:
        raise ValueError("demo_student: a pretrained student start needs the packed corpus; got packed=None.")
    extra = [tokenizer_hash(tokenizer), packed.key if pretrained else None]
    folder = cfg.data_path / "students" / cfg.hash_of(keys, extra=extra)
    meta = _cached_model(folder, "student")
    if meta is not None:
        return folder
    torch.manual_seed(cfg.student_seed)
    student = LlamaForCausalLM(llama_config(cfg, "student", len(tokenizer)))
    meta = {"config": {k: getattr(cfg, k) for k in keys}, "start": cfg.student_start if pretrained else "random"}
    if pretrained:
        weights = student_mixture(cfg, list(packed.names))
        work = folder.with_name(folder.name + ".training")
        losses, seconds = _pretrain(
            cfg,
            student,
            packed,
            work,
            what=f"student ({cfg.student_start} start)",
            steps=cfg.student_pretrain_steps,
            seed=cfg.student_seed,
            config=meta["config"],
            weights=weights,
        )
        meta.update(
            mixture=dict(zip(packed.names, weights or [1.0 / len(packed.names)] * len(packed.names))),
            loss_curve=losses[::10],
            train_seconds=seconds,
            validation_ce=_validation_ce(student, packed, cfg.eval_batch_size),
        )
        ce = ", ".join(f"{n} {c:.2f}" for n, c in meta["validation_ce"].items())
        log(f"student: pretrained ({cfg.student_start} mixture) in {seconds:.0f} s; validation CE: {ce}")
    _save_model(student.eval(), tokenizer, folder, meta)
    if pretrained:
        shutil.rmtree(folder.with_name(folder.name + ".training"), ignore_errors=True)
    return folder


def _validation_ce(model: Any, packed: Any, batch_size: int) -> dict[str, float]:
    """Per-domain validation CE (nats/token) of ``model`` on ``packed``'s validation split, in this
    process alone (no collective: under torchrun only rank 0 builds the demo caches)."""
    from ddk.engine.step import StepLoss

    validation_ce = StepLoss.cross_entropy().validation_ce
    out = {}
    model.eval()
    with torch.no_grad():
        for name, batches in packed.validation_batches(batch_size).items():
            sums = [validation_ce(model, b) for b in batches]
            out[name] = float(sum(c for c, _ in sums) / sum(float(n) for _, n in sums))
    return out


def demo_config(cfg: RecipeConfig) -> RecipeConfig:
    """``cfg`` with the demo's teacher, student, tokenizer and data (built or found in the cache).

    Under ``torchrun`` rank 0 builds the caches while the others wait, then they read them.
    """
    from ddk.data import load_records, pack_domains
    from ddk.recipes.tokenizer import load_tokenizer

    if cfg.threads:  # the teacher's and the student's pretraining run here, before distill sets it
        torch.set_num_threads(cfg.threads)
    with rank_zero_first():
        cdir, names, tdir = demo_corpus(cfg)
        tokenizer = load_tokenizer(tdir)
        train = tuple(str(cdir / n / "train.jsonl") for n in names)
        validation = tuple(str(cdir / n / "validation.jsonl") for n in names)
        bars = show_bars(cfg.progress)
        records = load_records(list(train), progress=bars)
        packed = pack_domains(
            records,
            tokenizer,
            seq_len=cfg.sequence_length,
            val_samples=cfg.val_samples,
            validation=load_records(list(validation), progress=bars),
            cache_dir=cfg.data_path / "packed",
            progress=bars,
            num_proc=cfg.num_proc or None,
        )
        with folder_lock(cfg.data_path / "teachers", "demo_config", "data_dir", wait=True):  # one trainer per cache
            teacher = demo_teacher(cfg, packed, tokenizer)
        with folder_lock(cfg.data_path / "students", "demo_config", "data_dir", wait=True):
            student = demo_student(cfg, tokenizer, packed)
    test = tuple(str(cdir / n / "test.jsonl") for n in names) if cfg.test_fraction > 0 else ()
    return dataclasses.replace(
        cfg,
        teacher=str(teacher),
        student=str(student),
        tokenizer=str(tdir),
        data=train,
        validation_data=validation,
        test_data=test,
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


DEMO_METHODS: tuple[str, ...] = ("kd", "ddk")


def compare_demo(cfg: RecipeConfig, methods: tuple[str, ...] = DEMO_METHODS, preset: str = "demo") -> dict[str, Any]:
    """``make demo``: the same pretrained demo student distilled with each of ``methods`` (KD and DDK).

    Each method runs into ``<out>/<method>/`` at the same token budget and data seed; then the
    per-domain tables, the difference ``DDK - KD`` per domain (negative: DDK ends closer to the
    teacher), and ``compare.png`` (final gaps side by side) and DDK's weight plot are written
    to ``<out>/`` and printed: ``ddk.recipes.report.compare_summaries``, what ``ddk compare``
    prints for any runs. ``preset`` is only named in the output. Under ``torchrun`` every
    rank runs it, like ``distill``.

    Returns:
        ``{"preset", "methods": {method: summary}, "difference": {...} | None, "seconds": {...}}``.
    """
    from ddk.recipes.report import compare_summaries

    created = init_from_env(cfg.process_group_backend, force=cfg.fsdp)
    try:
        root = cfg.run_dir
        t0 = time.perf_counter()
        filled = demo_config(cfg)
        t_prep = time.perf_counter() - t0
        summaries: dict[str, dict[str, Any]] = {}
        for method in methods:
            run_cfg = dataclasses.replace(filled, method=method, out=str(root / method))
            with run_folder_lock(run_cfg):
                if broadcast_object((run_cfg.run_dir / "summary.json").is_file()):
                    run_cfg = dataclasses.replace(run_cfg, resume=False)  # a finished run is redone
                summaries[method] = distill(run_cfg)
        result: dict[str, Any] = {"preset": preset, "methods": summaries, "difference": None}
        result["seconds"] = {"prepare": t_prep, "total": time.perf_counter() - t0}
        if rank_world()[0] != 0:
            return result
        comp = compare_summaries(  # the table and plot of `ddk compare`, the methods named in capitals
            {m.upper(): s for m, s in summaries.items()},
            root / "compare.png",
            title=f"Per-domain gap to the teacher after distillation (preset {preset!r})",
            column="method",
        )
        if methods[0] == "kd" and "ddk" in methods:
            result["difference"] = comp.difference["DDK"]  # DDK - KD: negative where DDK ends closer
        lines = [
            "",
            f"== demo (preset {preset!r}): {' vs '.join(m.upper() for m in methods)} from the same student ==",
            _models_line(filled, summaries[methods[0]]),
            comp.text,
            "(One seed: differences below ~0.02 are within noise.)",
        ]
        lines += [f"plot: {comp.plot}"] + [f"plot: {p}" for s in summaries.values() for p in s.get("plots", [])]
        lines.append(
            f"times: corpus + tokenizer + teacher + student {t_prep:.0f} s, "
            + ", ".join(f"{m} {s['wall_seconds']:.0f} s" for m, s in summaries.items())
            + f", total {time.perf_counter() - t0:.0f} s"
        )
        lines.append(f"run folders: {', '.join(str(root / m) for m in methods)}")
        text = "\n".join(lines)
        print(text)
        atomic_write_text(root / "comparison.txt", text + "\n")
        atomic_write_text(root / "comparison.json", json.dumps(result, indent=2))
        return result
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def _models_line(cfg: RecipeConfig, summary: dict[str, Any]) -> str:
    start = (
        "random weights"
        if cfg.student_start == "random" or cfg.student_pretrain_steps == 0
        else f"CE-pretrained {cfg.student_pretrain_steps} steps on the {cfg.student_start} mixture"
        + (f" ({', '.join(cfg.scarce_domains)} at {cfg.scarce_share:g}x)" if cfg.student_start == "skewed" else "")
    )
    return (
        f"teacher {summary['teacher_params']:,} parameters ({cfg.teacher_layers} layers, hidden {cfg.teacher_hidden}, "
        f"{cfg.teacher_steps} steps); student {summary['student_params']:,} parameters ({cfg.student_layers} layers, "
        f"hidden {cfg.student_hidden}; {start}); {summary['tokens']:,} tokens per method, seed {cfg.seed}"
    )
