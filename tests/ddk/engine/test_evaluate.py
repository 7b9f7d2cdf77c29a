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


def test_validation_identity_changes_with_any_validation_token_and_not_with_training_data():
    import numpy as np

    from ddk.data import PackedDomains
    from ddk.engine.evaluate import validation_identity

    val = (np.arange(12, dtype=np.int32).reshape(3, 4), np.ones((2, 4), dtype=np.int32))

    def packed(validation, train_rows=5, names=("a", "b")):
        train = tuple(np.zeros((train_rows, 4), dtype=np.int32) for _ in names)
        return PackedDomains(
            names=names, seq_len=4, train=train, validation=validation, eos_token_id=0, key="k", root=None
        )

    ref = validation_identity(packed(val))
    assert ref["sequences"] == [3, 2] and len(ref["checksum"]) == 16
    assert validation_identity(packed(val, train_rows=9)) == ref  # other training records, same validation
    assert validation_identity(packed(tuple(a.astype(np.int64) for a in val))) == ref  # a cache's int64 ids
    changed = (val[0].copy(), val[1])
    changed[0][2, 3] += 1
    assert validation_identity(packed(changed))["checksum"] != ref["checksum"]
    assert validation_identity(packed(val, names=("a", "c")))["checksum"] != ref["checksum"]
    assert validation_identity(packed((val[0][:2], val[1])))["checksum"] != ref["checksum"]
