"""Tests of ddk/engine/tracking.py: the scalars of a run in TensorBoard (read back from the event
files), a resumed run without duplicate steps, W&B (a stand-in module; the real one offline when
installed) and the errors of ``report_to``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from ddk.engine import tracking
from ddk.engine.tracking import check_report_to, interval_scalars, open_tracker, step_scalars

HAS_TB = importlib.util.find_spec("tensorboard") is not None
needs_tb = pytest.mark.skipif(not HAS_TB, reason="needs tensorboard (pip install tensorboard; in requirements-dev.txt)")


def _events(folder: Path) -> Any:
    """The scalars of the event files of ``folder``, as TensorBoard reads them (purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def _series(acc: Any, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_interval_scalars_gap_is_student_minus_teacher_ce() -> None:
    rec = {
        "domain_names": ["a", "b"],
        "weights": [0.25, 0.75],
        "student_ce": [3.0, 4.0],
        "teacher_ce": [2.0, 2.5],
        "ratio": [2.718, 4.48],
    }
    got = interval_scalars(rec)
    assert got["gap/b"] == 1.5 and got["weight/a"] == 0.25 and got["ratio/b"] == 4.48
    assert sorted(k.split("/")[0] for k in got) == sorted(["weight", "student_ce", "teacher_ce", "gap", "ratio"] * 2)


def test_step_scalars_skipped_batch_reports_no_loss_terms() -> None:
    rec = {"loss": None, "ce": None, "kd": None, "lr": 1e-3, "batch_domain_tokens": [3, 4]}
    assert step_scalars(rec, ["a", "b"]) == {"train/lr": 1e-3, "tokens/a": 3.0, "tokens/b": 4.0}


def test_check_report_to_unknown_or_missing_package_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"^distill: report_to must be one of \('none', 'tensorboard', 'wandb'\)"):
        check_report_to("mlflow", "distill")
    real = importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    with pytest.raises(ValueError) as info:
        check_report_to("wandb", "distill")
    assert str(info.value) == (
        "distill: report_to='wandb' needs the wandb package; got it not installed. Install it with "
        "`pip install wandb`, or pass --report-to none (config report_to: none)."
    )
    check_report_to("none", "distill")


def test_run_config_report_to_must_be_a_backend(tmp_path: Path) -> None:
    from ddk.engine.config import RunConfig

    with pytest.raises(ValueError, match=r"^RunConfig: report_to must be one of .*; got 'tb'\.$"):
        RunConfig(report_to="tb").validate()


def test_wandb_tracker_offline_resume_keeps_the_run_id_and_a_fresh_start_takes_a_new_one(tmp_path: Path) -> None:
    from wandb_offline import offline_env, offline_runs

    out = tmp_path / "run"
    with offline_env(tmp_path):
        t = open_tracker("wandb", out, config={"method": "ddk", "steps": 6})
        t.log_scalars({"weight/a": 0.5, "train/ce": 2.0}, step=1)
        t.log_scalars({"weight/a": 0.25}, step=3)
        t.close()
        open_tracker("wandb", out, start_step=2).close()  # a resume: the same W&B run
        open_tracker("wandb", out).close()  # a fresh start in the same folder: a new one
    first, resumed, fresh = offline_runs(out / "wandb")
    assert first.run_id == resumed.run_id != fresh.run_id
    assert (out / "wandb" / "ddk-run-id").read_text() == fresh.run_id + "\n"
    assert (first.project, first.name) == ("ddk", "run")
    assert first.config["method"] == "ddk" and first.config["steps"] == 6
    assert first.series("weight/a") == [(1, 0.5), (3, 0.25)] and first.series("train/ce") == [(1, 2.0)]
    assert resumed.history == fresh.history == []


@needs_tb
def test_tensorboard_tracker_purges_the_steps_a_resume_writes_again(tmp_path: Path) -> None:
    t = open_tracker("tensorboard", tmp_path)
    for step in range(5):
        t.log_scalars({"x": float(step)}, step)
    t.close()
    t = open_tracker("tensorboard", tmp_path, start_step=2)  # resumed at checkpoint 2: steps 3, 4 again
    for step in range(3, 6):
        t.log_scalars({"x": 10.0 * step}, step)
    t.close()
    assert _series(_events(tmp_path / "tensorboard"), "x") == [(0, 0), (1, 1), (2, 2), (3, 30), (4, 40), (5, 50)]


# ---------------------------------------------------------------------------- the engine's loop
pytestmark_hf = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("transformers", "tokenizers")), reason="needs transformers"
)


@needs_tb
@pytestmark_hf
def test_distill_report_to_tensorboard_writes_weights_per_domain_and_loss_terms(tmp_path: Path) -> None:
    from recipe_cases import run_cfg

    import ddk.recipes.distill as real

    cfg = run_cfg(tmp_path, "tb", report_to="tensorboard")
    real.distill(cfg)
    out = Path(cfg.out)
    acc = _events(out / "tensorboard")
    ctrl, metrics = _jsonl(out / "controller.jsonl"), _jsonl(out / "metrics.jsonl")
    names = ctrl[0]["domain_names"]
    assert len(names) == 3
    for i, name in enumerate(names):
        got = _series(acc, f"weight/{name}")
        assert [s for s, _ in got] == [r["step"] for r in ctrl] == [0, 3, 6]
        assert [v for _, v in got] == pytest.approx([r["weights"][i] for r in ctrl], rel=1e-6)
        gap = [r["student_ce"][i] - r["teacher_ce"][i] for r in ctrl]
        assert [v for _, v in _series(acc, f"gap/{name}")] == pytest.approx(gap, rel=1e-5, abs=1e-6)
        for key in ("student_ce", "teacher_ce", "ratio"):
            assert [v for _, v in _series(acc, f"{key}/{name}")] == pytest.approx([r[key][i] for r in ctrl], rel=1e-6)
        # tokens/<domain>: the valid target tokens since the previous logging step (as DDKTrainer), read back
        tokens = _series(acc, f"tokens/{name}")
        assert [s for s, _ in tokens] == [m["step"] for m in metrics] == [2, 3, 4, 6]
        batch = {m["step"]: m["batch_domain_tokens"][i] for m in metrics}
        assert tokens[1][1] == batch[3] and tokens[2][1] == batch[4]  # one-step spans: that step's batch
        summary = json.loads((out / "summary.json").read_text())  # every step's tokens once: steps 1-2, 3, 4, 5-6
        assert sum(v for _, v in tokens) == summary["samples_per_domain"][i] * (cfg.seq_len - 1)
    # train/loss, ce, kd: per valid target token over the span (as DDKTrainer), from every step's record
    every = run_cfg(tmp_path, "every", log_every=1)
    real.distill(every)
    per_step = {m["step"]: m for m in _jsonl(Path(every.out) / "metrics.jsonl")}
    assert sorted(per_step) == [1, 2, 3, 4, 5, 6]
    gamma = cfg.gamma
    for key in ("ce", "kd", "loss", "lr"):
        got = _series(acc, f"train/{key}")
        assert [s for s, _ in got] == [m["step"] for m in metrics] == [2, 3, 4, 6]
        if key == "lr":
            assert [v for _, v in got] == pytest.approx([m[key] for m in metrics], rel=1e-6)
            continue
        want = []
        for span in ([1, 2], [3], [4], [5, 6]):
            tok = [sum(per_step[s]["batch_domain_tokens"]) for s in span]
            ce = sum(per_step[s]["ce"] * t for s, t in zip(span, tok)) / sum(tok)
            kd = sum(per_step[s]["kd"] * t for s, t in zip(span, tok)) / sum(tok)
            want.append({"ce": ce, "kd": kd, "loss": ce + gamma * kd}[key])
        assert [v for _, v in got] == pytest.approx(want, rel=1e-6)
        assert got[1][1] == pytest.approx(metrics[1][key], rel=1e-6)  # a one-step span: that step's record
        assert got[0][1] != pytest.approx(metrics[0][key], rel=1e-6)  # steps 1-2, not step 2 alone
    assert all(v > 0 for _, v in _series(acc, "throughput/tokens_per_s"))


@needs_tb
@pytestmark_hf
def test_distill_report_to_tensorboard_resumed_run_has_no_duplicate_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from recipe_cases import crash_in_step, run_cfg

    import ddk.recipes.distill as real

    cfg = run_cfg(tmp_path, "tb", report_to="tensorboard")
    crash_in_step(monkeypatch, cfg, 5)  # checkpoint-3 written; steps 4 (logged) and 5 are trained again
    real.distill(cfg)
    out = Path(cfg.out)
    acc = _events(out / "tensorboard")
    metrics = _jsonl(out / "metrics.jsonl")
    ce = _series(acc, "train/ce")
    assert [s for s, _ in ce] == [m["step"] for m in metrics] == [2, 3, 4, 6]
    # the one-step spans (steps 3 and 4, step 4 logged again after the resume) are those steps' records
    assert [v for _, v in ce[1:3]] == pytest.approx([m["ce"] for m in metrics[1:3]], rel=1e-6)
    name = _jsonl(out / "controller.jsonl")[0]["domain_names"][0]
    assert [s for s, _ in _series(acc, f"weight/{name}")] == [0, 3, 6]


def _without_clock(row: dict[str, Any]) -> dict[str, Any]:
    """A W&B history row less what depends on the clock (its time stamps and the throughput)."""
    return {k: v for k, v in row.items() if k not in ("_timestamp", "_runtime", "throughput/tokens_per_s")}


@pytestmark_hf
def test_distill_report_to_wandb_offline_continues_the_run_after_a_resume_with_the_runs_series(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from recipe_cases import crash_in_step, run_cfg
    from wandb_offline import offline_env, offline_runs

    import ddk.recipes.distill as real

    cfg = run_cfg(tmp_path, "wb", report_to="wandb")
    out = Path(cfg.out)
    with offline_env(tmp_path):
        crash_in_step(monkeypatch, cfg, 5)  # checkpoint-3 written; steps 4 (logged) and 5 are trained again
        real.distill(cfg)
    first, resumed = offline_runs(out / "wandb")  # offline, a resume writes a second folder of the same run
    assert first.run_id == resumed.run_id == (out / "wandb" / "ddk-run-id").read_text().strip()
    assert (first.project, first.name, first.config["method"]) == ("ddk", "wb", "ddk")
    assert [r["_step"] for r in first.history] == [0, 2, 3, 4]  # the init record, then logging steps to the crash
    assert [r["_step"] for r in resumed.history] == [4, 6]  # from checkpoint-3 on: no init record again
    # step 4, logged again, holds the same values (the resume is bit-exact), so whichever copy W&B keeps
    # (online, a resumed run drops steps the run holds) is the run's; the series are those of the files
    assert _without_clock(resumed.history[0]) == pytest.approx(_without_clock(first.history[-1]), rel=1e-6)
    rows: dict[int, dict[str, Any]] = {}
    for run in (first, resumed):
        for row in run.history:
            rows.setdefault(row["_step"], row)  # a step's first copy, as W&B keeps online

    def series(key: str) -> list[tuple[int, Any]]:
        return [(step, row[key]) for step, row in sorted(rows.items()) if key in row]

    ctrl, metrics = _jsonl(out / "controller.jsonl"), _jsonl(out / "metrics.jsonl")
    names = ctrl[0]["domain_names"]
    assert len(names) == 3
    for i, name in enumerate(names):
        for key, tag in (
            ("weights", "weight"),
            ("student_ce", "student_ce"),
            ("teacher_ce", "teacher_ce"),
            ("ratio", "ratio"),
        ):
            got = series(f"{tag}/{name}")
            assert [s for s, _ in got] == [r["step"] for r in ctrl] == [0, 3, 6]
            assert [v for _, v in got] == pytest.approx([r[key][i] for r in ctrl], rel=1e-6)
        gap = [r["student_ce"][i] - r["teacher_ce"][i] for r in ctrl]
        assert [v for _, v in series(f"gap/{name}")] == pytest.approx(gap, rel=1e-5, abs=1e-6)
        tokens = series(f"tokens/{name}")
        assert [s for s, _ in tokens] == [m["step"] for m in metrics] == [2, 3, 4, 6]
        summary = json.loads((out / "summary.json").read_text())  # every step's tokens once: steps 1-2, 3, 4, 5-6
        assert sum(v for _, v in tokens) == summary["samples_per_domain"][i] * (cfg.seq_len - 1)
    for key in ("ce", "kd", "loss", "lr"):
        got = series(f"train/{key}")
        assert [s for s, _ in got] == [m["step"] for m in metrics] == [2, 3, 4, 6]
        # the terms are span averages (checked against every step's record in the TensorBoard test):
        # the one-step spans (steps 3 and 4) are those steps' records; the learning rate is the step's
        checked = slice(None) if key == "lr" else slice(1, 3)
        assert [v for _, v in got[checked]] == pytest.approx([m[key] for m in metrics[checked]], rel=1e-6)
    assert all(v > 0 for _, v in series("throughput/tokens_per_s"))
