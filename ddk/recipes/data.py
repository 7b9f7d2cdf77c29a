"""The user's corpus for ``ddk distill``: records loaded with ``ddk.data.load_records`` and packed per
domain with ``ddk.data.pack_domains`` (cached under ``data_dir/packed``, memory-mapped)."""

from __future__ import annotations

from typing import Any

from ddk.recipes.config import RecipeConfig

__all__ = ["distill_data"]


def distill_data(cfg: RecipeConfig, tokenizer: Any) -> Any:
    """``PackedDomains`` of ``cfg.data`` (and ``cfg.validation_data``) tokenized with ``tokenizer``.

    Sequences of ``cfg.seq_len`` tokens, packed within each domain; validation is ``cfg.val_samples``
    sequences per domain, from ``validation_data`` or a stable per-domain split of ``data``.
    With ``cfg.teacher_cache``: the ``ddk.data.TeacherCache``, checked against the tokenizer, its
    vocabulary, ``temperature`` and ``seq_len`` (a mismatch is an error naming it).
    """
    from ddk.data import TeacherCache, load_records, pack_domains, tokenizer_hash

    if cfg.teacher_cache:
        cache = TeacherCache(cfg.teacher_cache)
        cache.check(
            tokenizer_hash=tokenizer_hash(tokenizer),
            vocab_size=len(tokenizer),
            temperature=float(cfg.temperature),
            seq_len=cfg.seq_len,
            fn="distill",
        )
        return cache

    on_missing = "skip" if cfg.skip_bad_records else "raise"
    opts = dict(text_field=cfg.text_field, domain_field=cfg.domain_field, on_missing=on_missing, progress=cfg.progress)
    records = load_records(list(cfg.data), **opts)
    validation = load_records(list(cfg.validation_data), **opts) if cfg.validation_data else None
    return pack_domains(
        records,
        tokenizer,
        seq_len=cfg.seq_len,
        val_samples=cfg.val_samples,
        validation=validation,
        cache_dir=cfg.data_path / "packed",
        progress=cfg.progress,
    )
