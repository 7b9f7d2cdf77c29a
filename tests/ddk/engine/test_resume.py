"""Tests of ddk/engine/resume.py: the refusal of a resume with a larger budget (``extension_refusal``)."""

from __future__ import annotations

from pathlib import Path

from ddk.engine.resume import extension_refusal


def _cfg(**kw: int) -> dict[str, int]:
    return {"steps": 6, "tokens": 0, "batch_size": 4, "seq_len": 16, "seed": 3, **kw}


def test_extension_refusal_names_the_command_that_continues_from_the_student() -> None:
    ck = Path("/runs/my run/checkpoint-6")
    msg = extension_refusal(_cfg(), _cfg(steps=9), ck, 6)
    assert msg is not None
    assert (
        "`ddk distill --config '/runs/my run/config.json' --student '/runs/my run/student' --steps 3 --seed 4 "
        "--out '/runs/my run-continued'`" in msg
    )
    assert "must keep its budget of 6 steps to resume; got 9 steps" in msg and "--no-resume" in msg
    assert "first finish it" not in msg
    # a token budget: 300 tokens were 5 steps (320 tokens); 500 are 8, the 180 tokens beyond are 3 steps
    tok = extension_refusal(_cfg(tokens=300), _cfg(tokens=500), ck, 5)
    assert tok is not None and "--tokens 180 --seed 4" in tok and "budget of 5 steps to resume; got 8 steps" in tok
    # steps after a token budget: config.json's tokens must be cleared
    assert "--steps 4 --tokens 0 --seed 4" in (extension_refusal(_cfg(tokens=300), _cfg(steps=9), ck, 5) or "")
    # a run stopped early is finished first, with its own budget
    early = extension_refusal(_cfg(), _cfg(steps=9), ck.with_name("checkpoint-3"), 3)
    assert (
        early is not None
        and "It stopped at step 3 of 6: first finish it with its own budget (its command with --steps 6)" in early
    )


def test_extension_refusal_is_none_unless_the_budget_grows() -> None:
    ck = Path("/r/checkpoint-6")
    assert extension_refusal(_cfg(), _cfg(steps=5), ck, 6) is None
    assert extension_refusal(_cfg(), _cfg(tokens=384), ck, 6) is None  # the same 6 steps
    assert extension_refusal(_cfg(steps=True), _cfg(steps=9), ck, 6) is None  # not a config of ddk
    assert extension_refusal(_cfg(), _cfg(steps=9), ck, "6") is None
