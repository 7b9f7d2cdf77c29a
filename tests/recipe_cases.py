"""Shared set-up of the recipe tests: the user's saved models and corpus, and a small run config;
the run folders' checks (same student, a flipped bit) and the environment of a child ``ddk`` process."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_models import make_pair, write_jsonl

ROOT = Path(__file__).resolve().parent.parent

#: the tiny models of ``hf_models`` (and so ``own_cfg``) need both
HAS_HF = all(importlib.util.find_spec(m) is not None for m in ("transformers", "tokenizers"))
needs_hf = pytest.mark.skipif(not HAS_HF, reason="needs transformers and tokenizers")


def own_models(root: Path, family: str = "llama", dropout: float = 0.0) -> tuple[Path, Path, Path]:
    """``(teacher, student, corpus.jsonl)`` under ``root``, built once per folder."""
    base = root / f"models-{family}-d{dropout}"
    if not (base / "student" / "config.json").is_file():
        make_pair(base, family, dropout=dropout)
    corpus = root / "corpus.jsonl"
    if not corpus.is_file():
        write_jsonl(corpus, docs_per_domain=30)
    return base / "teacher", base / "student", corpus


def own_cfg(root: Path, family: str = "llama", *, dropout: float = 0.0, **kw: Any) -> Any:
    """A ``RecipeConfig`` distilling the tiny ``family`` pair on the 3-domain corpus (6 steps, CPU)."""
    from ddk.recipes.config import make_config

    teacher, student, corpus = own_models(root, family, dropout)
    base: dict[str, Any] = dict(
        teacher=str(teacher),
        student=str(student),
        data=(str(corpus),),
        data_dir=str(root / "cache"),
        seq_len=16,
        val_samples=4,
        eval_batch_size=4,
        steps=6,
        batch_size=4,
        warmup_steps=2,
        interval=3,
        log_every=2,
        checkpoint_every=3,
        out=str(root / "runs" / "ddk"),
        progress=False,
        device="cpu",  # bit-exact checks: CPU
    )
    base.update(kw)
    return make_config(**base)


def run_cfg(tmp: Path, name: str, **kw: Any) -> Any:
    """``own_cfg`` writing its run folder to ``tmp/runs/name``."""
    return own_cfg(tmp, out=str(tmp / "runs" / name), **kw)


def demo_cfg(root: Path, corpus: Path, **kw: Any) -> Any:
    """A ``RecipeConfig`` of the bundled demo on ``corpus`` alone (offline, tiny teacher and student, CPU)."""
    from ddk.recipes.config import make_config

    base: dict[str, Any] = dict(
        data_dir=str(root / "demo"),
        domains=(),
        user_jsonl=(str(corpus),),
        max_chars=20000,
        validation_fraction=0.25,
        offline=True,
        vocab_size=320,
        seq_len=16,
        val_samples=4,
        eval_batch_size=4,
        teacher_hidden=32,
        teacher_layers=1,
        teacher_heads=2,
        teacher_intermediate=64,
        teacher_steps=8,
        teacher_batch_size=4,
        student_hidden=16,
        student_layers=1,
        student_heads=2,
        student_intermediate=32,
        student_pretrain_steps=6,
        steps=4,
        batch_size=4,
        warmup_steps=2,
        interval=2,
        log_every=2,
        checkpoint_every=3,
        out=str(root / "runs" / "demo"),
        progress=False,
        device="cpu",
    )
    base.update(kw)
    return make_config(**base)


def crash_in_step(monkeypatch: Any, cfg: Any, step: int) -> None:
    """Run ``ddk.recipes.distill.distill(cfg)`` and interrupt it (``KeyboardInterrupt``) inside
    training step ``step`` (the validation passes run without grad and are not counted)."""
    import ddk.engine.step as engine_step
    import ddk.recipes.distill as distill_mod

    calls = {"n": 0}
    orig = engine_step.causal_lm_kd_loss

    def flaky(*a: Any, **k: Any) -> Any:
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == step:
                raise KeyboardInterrupt("simulated crash")
        return orig(*a, **k)

    monkeypatch.setattr(engine_step, "causal_lm_kd_loss", flaky)
    with pytest.raises(KeyboardInterrupt):
        distill_mod.distill(cfg)
    monkeypatch.undo()


def user_jsonl(path: Path, n: int = 12) -> Path:
    """A user's JSONL of domains ``a`` and ``b`` (``n`` records each) with 2 corrupted lines, 4 and 8."""
    rows = [
        json.dumps({"domain": d, "source": f"{d}{i}", "text": f"{d} text number {i} " * 8})
        for d in ("a", "b")
        for i in range(n)
    ]
    rows.insert(3, '{"domain": "a", "text": "cut off')
    rows.insert(7, "not json at all")
    path.write_text("\n".join(rows) + "\n")
    return path


def student_tensors(run: Path) -> dict[str, torch.Tensor]:
    """The trained student of the run folder ``run``."""
    from safetensors.torch import load_file

    return load_file(str(run / "student" / "model.safetensors"))


def same_student(a: Path, b: Path) -> None:
    """Assert that the run folders ``a`` and ``b`` hold bit-identical students."""
    sa, sb = student_tensors(a), student_tensors(b)
    assert sa.keys() == sb.keys() and [k for k in sa if not torch.equal(sa[k], sb[k])] == []


def flip_bit(path: Path, offset: int = -3) -> None:
    """Corrupt one bit of the file ``path``."""
    blob = bytearray(path.read_bytes())
    blob[offset] ^= 0x10
    path.write_bytes(bytes(blob))


def child_env() -> dict[str, str]:
    """The environment of a child Python process: this checkout and tests/ importable, CPU, one thread."""
    return dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
    )
