"""Tests of ddk/engine/evaluate.py: ``evaluate_run`` on a run folder, on the tiny models of ``recipe_cases``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from recipe_cases import crash_in_step
from recipe_cases import run_cfg as _cfg

import ddk.recipes.distill as real


def test_stale_student_is_moved_aside_and_evaluate_refuses_a_foreign_one(tmp_path, monkeypatch):
    kd = _cfg(tmp_path, "run", method="kd", steps=2)
    real.distill(kd)
    run = Path(kd.out)
    crash_in_step(monkeypatch, _cfg(tmp_path, "run", method="cpt", steps=2, resume=False), 1)
    assert not (run / "student").exists()  # the kd student went aside with the rest of that run
    with pytest.raises(ValueError, match=r"evaluate: run_dir must be a finished distill run"):
        real.evaluate(run)
    old = next(p for p in run.iterdir() if p.name.startswith("replaced-"))
    shutil.copytree(old / "student", run / "student")  # a student of another config, put back by hand
    with pytest.raises(
        ValueError,
        match=r"evaluate: the student/ of .* must be the one trained with its config\.json "
        r"\(config digest [0-9a-f]{16}\); got a student of config digest '[0-9a-f]{16}'",
    ):
        real.evaluate(run)
