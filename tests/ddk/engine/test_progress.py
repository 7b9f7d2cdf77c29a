"""Tests of ddk/engine/progress.py: bars only on a terminal, plain lines elsewhere."""

from __future__ import annotations

import io
import sys

import pytest

from ddk.engine.progress import TrainLog, plain_line, show_bars


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_show_bars_only_when_asked_and_stderr_is_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file or a pipe
    assert show_bars(True) is False
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert show_bars(True) is True and show_bars(False) is False


def test_plain_line_skipped_step_and_many_domains() -> None:
    rec = {"loss": None, "ce": None, "kd": None, "lr": 2e-3}
    assert plain_line("distill kd", 7, 9, rec, ["a"], 10.0) == (
        "distill kd: step 7/9  skipped (non-finite loss or gradient)  lr 2.00e-03  10 tok/s"
    )
    names = [f"d{i}" for i in range(12)]
    weights = [0.05] * 11 + [0.45]
    rec = {"loss": 1.0, "ce": 1.0, "kd": 0.0, "lr": 1e-3, "weights": weights, "ratio": [1.0] * 12}
    line = plain_line("distill ddk", 10, 10, rec, names, 5.0)
    assert line.endswith("gap 0.0000 (worst d0 0.0000)  weights d0 0.0500 .. d11 0.4500") and "\n" not in line


def test_train_log_prints_one_line_per_logging_step_on_rank_zero_only(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    rec = {"loss": 2.0, "ce": 1.9, "kd": 0.5, "lr": 1e-3}
    log = TrainLog("distill kd", 0, 4, ["a", "b"], bars=False, enabled=True)
    for step in range(1, 5):
        log.step(step, rec if step % 2 == 0 else None, 100.0 if step % 2 == 0 else None)
    log.close()
    TrainLog("distill kd", 0, 4, ["a", "b"], bars=False, enabled=False).step(2, rec, 1.0)  # another rank
    assert err.getvalue().splitlines() == [
        "distill kd: step 2/4  loss 2.0000  ce 1.9000  kd 0.5000  lr 1.00e-03  100 tok/s",
        "distill kd: step 4/4  loss 2.0000  ce 1.9000  kd 0.5000  lr 1.00e-03  100 tok/s",
    ]
