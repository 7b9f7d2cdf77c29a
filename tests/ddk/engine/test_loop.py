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
    capsys.readouterr()
    real.distill(cfg)
    _same_student(Path(ref.out), run)
    err = capsys.readouterr().err
    assert f"distill: resumed {run} at step 3" in err and "distill: done: 6 steps (3 after the resume) in " in err


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


def _mean_ce(model: torch.nn.Module, seqs) -> float:  # type: ignore[no-untyped-def]
    """Token-weighted next-token CE of ``model`` on ``(m, L)`` sequences, in float64 (the oracle)."""
    total, n = 0.0, 0
    with torch.no_grad():
        for row in seqs:
            ids = torch.as_tensor(row, dtype=torch.long)[None]
            logits = model(input_ids=ids).logits[0, :-1].double()
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            n += ids.shape[1] - 1
    return total / n


def test_test_data_gaps_are_reported_at_the_end_and_never_reach_the_mixture(tmp_path: Path) -> None:
    import dataclasses

    from hf_models import write_jsonl
    from transformers import AutoModelForCausalLM

    from ddk.engine.components import load_test_data
    from ddk.engine.models import load_tokenizer

    test_file = write_jsonl(tmp_path / "test.jsonl", docs_per_domain=8, seed=123)
    with_test = _cfg(tmp_path, "with-test", method="ddk", test_data=(str(test_file),))
    plain = _cfg(tmp_path, "plain", method="ddk")
    a, b = real.distill(with_test), real.distill(plain)
    # the test split changes nothing of the run: same mixture, same student, same validation gaps
    assert a["final_weights"] == b["final_weights"] and a["gap"] == b["gap"]
    _same_student(Path(with_test.out), Path(plain.out))
    assert "test" not in b
    test = a["test"]
    assert set(test) == {"student_ce", "teacher_ce", "gap", "mean_gap", "worst_gap", "sequences"}
    tok = load_tokenizer(str(Path(with_test.out) / "student"))
    packed = load_test_data(dataclasses.replace(with_test).validate(), tok, a["domains"])
    assert test["sequences"] == [len(v) for v in packed.validation] and min(test["sequences"]) >= 1
    assert min(test["sequences"]) > with_test.val_samples  # the whole test split: val_samples caps validation only
    student = AutoModelForCausalLM.from_pretrained(str(Path(with_test.out) / "student")).eval()
    teacher = AutoModelForCausalLM.from_pretrained(with_test.teacher).eval()
    for i, seqs in enumerate(packed.validation):
        s, t = _mean_ce(student, seqs), _mean_ce(teacher, seqs)
        assert test["student_ce"][i] == pytest.approx(s, rel=1e-5)
        assert test["teacher_ce"][i] == pytest.approx(t, rel=1e-5)
        assert test["gap"][i] == pytest.approx(s - t, rel=1e-4, abs=1e-6)
    assert test["worst_gap"] == max(test["gap"]) and test["mean_gap"] == pytest.approx(sum(test["gap"]) / 3)
    # the test records are not the validation records
    assert test["student_ce"] != a["student_ce"]


def test_test_data_with_other_domains_or_without_a_teacher_model_is_refused(tmp_path: Path) -> None:
    from hf_models import write_jsonl

    other = write_jsonl(tmp_path / "other.jsonl", docs_per_domain=8, domains=("code", "prose"))
    with pytest.raises(
        ValueError, match=r"test_data must have exactly the training domains \['code', 'math', 'prose'\]"
    ):
        real.distill(_cfg(tmp_path, "other", test_data=(str(other),)))
    with pytest.raises(ValueError, match="test_data needs a teacher model"):
        _cfg(tmp_path, "cache", teacher="", data=(), teacher_cache=str(tmp_path), test_data=(str(other),)).validate()


def test_nan_in_the_final_checkpoint_is_refused_and_keeps_the_good_student(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "nan-final", steps=2, checkpoint_every=2)
    real.distill(cfg)
    run = Path(cfg.out)
    student = {p.name: p.read_bytes() for p in (run / "student").iterdir()}
    ck = ckpt.load_checkpoint(run / "checkpoint-2")
    name = next(k for k, v in ck["student"].items() if v.is_floating_point())
    ck["student"][name].view(-1)[0] = float("nan")
    shutil.rmtree(run / "checkpoint-2")
    ckpt.save_checkpoint(run, ck.pop("step"), ck, keep=2)  # the library's own writer: digests recomputed
    with pytest.raises(
        ckpt.CheckpointError,
        match=rf"distill: the checkpoint .*checkpoint-2 must hold values this run can resume from; got a bad field "
        rf"of .*checkpoint-2/tensors\.safetensors: student\['{name}'\] must hold finite numbers; got 1 of \d+ values "
        r"NaN or infinite\. Nothing was overwritten",
    ):
        real.distill(cfg)
    assert {p.name: p.read_bytes() for p in (run / "student").iterdir()} == student


@pytest.mark.parametrize("rank", [None, "0", "1"])
def test_a_deferred_signal_is_announced_by_rank_zero_alone(monkeypatch, capsys, rank):
    """Under torchrun every rank gets SIGTERM: only rank 0 (or a process outside torchrun) says it."""
    import os
    import signal

    from ddk.engine.preempt import stop_signals

    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    with stop_signals("distill", "training") as stop, stop.defer():
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
        stop.handled = True
    said = "distill: got SIGTERM: finishing this step" in capsys.readouterr().err
    assert said == (rank != "1")
