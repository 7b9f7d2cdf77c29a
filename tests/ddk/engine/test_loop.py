"""Tests of ddk/engine/loop.py: ``distill``'s NaN/inf policy, SIGTERM, and the errors it raises before
training, on the tiny models of ``recipe_cases``."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import torch
from recipe_cases import own_cfg
from recipe_cases import run_cfg as _cfg
from recipe_cases import same_student as _same_student

import ddk.engine.loop as engine_loop
import ddk.engine.step as engine_step
import ddk.recipes.distill as real
from ddk.engine import checkpoint as ckpt
from ddk.engine.preempt import Preempted
from ddk.reliability import NonFiniteError


def _nan_loss_at(step: int, hit: dict):  # type: ignore[no-untyped-def]
    """A ``causal_lm_kd_loss`` whose ``step``-th training call gives a NaN loss and NaN sums in its first domain."""
    import dataclasses as dc

    import ddk.engine.step as engine_step

    orig = engine_step.causal_lm_kd_loss

    def poisoned(*a, **kw):  # type: ignore[no-untyped-def]
        out = orig(*a, **kw)
        if not torch.is_grad_enabled():
            return out
        hit["calls"] = hit.get("calls", 0) + 1
        if hit["calls"] != step:
            return out
        d0 = int(kw["domain_ids"][0])
        hit["domain"] = d0
        sums = out.domain_ce_sum.clone()
        sums[d0] = float("nan")
        return dc.replace(out, loss=out.loss * float("nan"), domain_ce_sum=sums)

    return poisoned


def test_recipe_distill_nonfinite_raises_with_step_and_domain(recipe, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    import ddk.engine.step as engine_step
    import ddk.recipes.distill as distill_mod

    root, cfg = recipe
    hit: dict = {}
    monkeypatch.setattr(engine_step, "causal_lm_kd_loss", _nan_loss_at(2, hit))
    with pytest.raises(NonFiniteError) as info:
        distill_mod.distill(dataclasses.replace(cfg, out=str(root / "runs" / "raise")))
    name = ["code", "math", "prose"][hit["domain"]]
    msg = str(info.value)
    assert msg.startswith("distill: the loss and gradients must be finite; got loss=nan")
    assert f"at step 2 in the per-domain sums of domain(s) ['{name}']" in msg
    assert msg.endswith(
        "Pass --on-nonfinite skip (config on_nonfinite: skip) to skip such batches; the run resumes from "
        "its last checkpoint."
    )


def test_recipe_distill_nonfinite_skip_counts_in_metrics_and_summary(recipe, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    import ddk.engine.step as engine_step
    import ddk.recipes.distill as distill_mod

    root, cfg = recipe
    monkeypatch.setattr(engine_step, "causal_lm_kd_loss", _nan_loss_at(2, {}))
    c = dataclasses.replace(cfg, out=str(root / "runs" / "skip"), on_nonfinite="skip")
    summary = distill_mod.distill(c)
    assert summary["skipped_batches"] == 1 and summary["skipped_steps"] == [2]
    recs = {r["step"]: r for r in map(json.loads, (Path(c.out) / "metrics.jsonl").read_text().splitlines())}
    assert recs[2]["skipped"] is True and recs[2]["loss"] is None and recs[1]["skipped_batches"] == 0
    assert recs[4]["skipped_batches"] == 1 and "skipped" not in recs[3]
    assert json.loads((Path(c.out) / "summary.json").read_text())["skipped_batches"] == 1
    assert all(math.isfinite(x) for x in summary["student_ce"])


@pytest.mark.e2e
def test_sigterm_finishes_the_step_writes_a_checkpoint_and_resumes_bit_identically(tmp_path, monkeypatch, capsys):
    ref = _cfg(tmp_path, "ref", checkpoint_every=100)
    real.distill(ref)
    cfg = _cfg(tmp_path, "run", checkpoint_every=100)
    calls = {"n": 0}
    orig = engine_step.causal_lm_kd_loss

    def preempted(*a, **k):  # type: ignore[no-untyped-def]
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 3:  # the scheduler's SIGTERM arrives inside step 3
                os.kill(os.getpid(), signal.SIGTERM)
        return orig(*a, **k)

    monkeypatch.setattr(engine_step, "causal_lm_kd_loss", preempted)
    with pytest.raises(
        Preempted,
        match=r"stopped by SIGTERM after step 3; wrote .*checkpoint-3\. Rerun the same "
        r"command to resume from it\.",
    ):
        real.distill(cfg)
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored
    run = Path(cfg.out)
    assert [p.name for _, p in ckpt.checkpoints(run)] == ["checkpoint-3"] and not (run / "summary.json").exists()
    real.distill(cfg)
    _same_student(Path(ref.out), run)


def test_unwritable_out_and_torn_model_files_are_errors_not_tracebacks(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cfg = own_cfg(tmp_path, out=str(blocker / "run"))
    monkeypatch.setattr(
        engine_loop, "load_models", lambda *a: pytest.fail("models loaded before the run folder was checked")
    )
    with pytest.raises(
        ValueError,
        match=r"distill: out must be a folder this process can write; got .*a-file/run' "
        r"\((NotADirectoryError|FileExistsError)",
    ):
        real.distill(cfg)
    monkeypatch.undo()

    bad = tmp_path / "torn-student"
    shutil.copytree(own_cfg(tmp_path).student, bad)
    blob = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    cfg = _cfg(tmp_path, "torn", student=str(bad))
    with pytest.raises(
        ValueError,
        match=rf"distill: --student must be a transformers causal LM folder or hub id; "
        rf"loading '{bad}' failed: ",
    ):
        real.distill(cfg)
