"""``ddk teacher-cache --teacher T --data FILE... --top-k K --out DIR``: run the teacher once and
store its top-k log-probabilities per position (``ddk.data.build_teacher_cache``), so that
``ddk distill --student S --teacher-cache DIR`` needs no teacher in memory.

The data are packed as ``ddk distill`` packs them (``seq_len``, ``val_samples``, the same cache
of token ids), with the teacher's tokenizer (or ``--tokenizer``). The teacher runs in bf16
autocast on CUDA (``--dtype``), in batches of ``eval_batch_size`` sequences, and under torchrun
every rank computes its share of the shards. A killed build resumes when the command is run again;
SIGTERM/SIGINT at any moment stop it with ``Preempted`` (the CLI exits with 75) and lose no finished shard.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist

from ddk.recipes.config import RecipeConfig

__all__ = ["teacher_cache"]


def teacher_cache(cfg: RecipeConfig) -> Any:
    """Build (or resume, or find) the teacher cache of ``cfg`` in ``cfg.out``; return the ``TeacherCache``."""
    from ddk.engine.preempt import stop_signals

    fn = "teacher-cache"
    if not cfg.teacher or not cfg.data or not cfg.out:
        raise ValueError(
            f"{fn}: teacher, data and out must be given (--teacher PATH --data FILE... --out DIR); got "
            f"teacher={cfg.teacher!r}, data={list(cfg.data)}, out={cfg.out!r}."
        )
    with stop_signals(fn, "start-up", kept="The finished shards are kept"):  # SIGTERM/SIGINT: Preempted
        return _teacher_cache(cfg, fn)


def _teacher_cache(cfg: RecipeConfig, fn: str) -> Any:
    from ddk._io import printable
    from ddk.data import build_teacher_cache, check_tokenizers
    from ddk.distributed import init_from_env, rank_world, rank_zero_first
    from ddk.engine.components import load_run_data
    from ddk.engine.models import autocast_dtype, check_positions, load_pretrained, load_tokenizer, teacher_tokenizer_of
    from ddk.engine.parallel import device_for
    from ddk.engine.preempt import set_stage
    from ddk.engine.progress import show_bars
    from ddk.engine.runfolder import log

    created = init_from_env(cfg.process_group_backend)
    try:
        device = device_for(cfg)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        tok_flag = "--tokenizer" if cfg.tokenizer else "--teacher"
        tokenizer = load_tokenizer(cfg.tokenizer or cfg.teacher, fn=fn, flag=tok_flag)  # with the EOS check
        amp = autocast_dtype(cfg, device)
        teacher = (
            load_pretrained("teacher", cfg.teacher, fn=fn, flag="--teacher", dtype=amp or torch.float32)
            .to(device)
            .eval()
        )
        for p in teacher.parameters():
            p.requires_grad_(False)
        own = teacher_tokenizer_of(teacher, fn) if cfg.tokenizer else None  # --tokenizer vs the teacher's own
        check_tokenizers(tokenizer, own, teacher=teacher, fn=fn)  # the one tokenizer rule; rows >= tokens
        check_positions(cfg.sequence_length, teacher, None, fn=fn)  # before any data is packed
        with rank_zero_first():
            packed = load_run_data(dataclasses.replace(cfg, teacher_cache=""), tokenizer)
        set_stage("the teacher-cache build")
        cache = build_teacher_cache(
            teacher,
            packed,
            cfg.out,
            top_k=cfg.top_k,
            temperature=float(cfg.temperature),
            vocab_size=len(tokenizer),
            tokenizer=tokenizer,
            batch_size=cfg.eval_batch_size,
            device=device,
            autocast=amp,
            progress=show_bars(cfg.progress),
        )
        if rank_world()[0] == 0:
            tokens = sum(cache.manifest["tokens"]["train"]) + sum(cache.manifest["tokens"]["validation"])
            ce = ", ".join(f"{printable(n)} {c:.3f}" for n, c in zip(cache.names, cache.teacher_ce.tolist()))
            log(
                f"teacher cache: {cache.root} (k={cache.top_k}, T={cache.temperature:g}): {tokens:,} positions, "
                f"{cache.disk_bytes() / 2**20:.1f} MiB ({cache.disk_bytes() / max(tokens, 1):.1f} bytes per position); "
                f"teacher validation CE: {ce}"
            )
        return cache
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()
