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
        "`ddk distill --config '/runs/my run/config.json' --student '/runs/my run/student' --steps 3 "
        "--warmup-steps 0 --seed 4 "
        "--out '/runs/my run-continued'`" in msg
    )
    assert "must keep its budget of 6 steps to resume; got 9 steps" in msg and "--no-resume" in msg
    assert "first finish it" not in msg
    # a token budget: 300 tokens were 5 steps (320 tokens); 500 are 8, the 180 tokens beyond are 3 steps
    tok = extension_refusal(_cfg(tokens=300), _cfg(tokens=500), ck, 5)
    assert (
        tok is not None
        and "--tokens 180 --warmup-steps 0 --seed 4" in tok
        and "budget of 5 steps to resume; got 8 steps" in tok
    )
    # steps after a token budget: config.json's tokens must be cleared
    assert "--steps 4 --tokens 0 --warmup-steps 0 --seed 4" in (
        extension_refusal(_cfg(tokens=300), _cfg(steps=9), ck, 5) or ""
    )
    # a run stopped early is finished first, with its own budget
    early = extension_refusal(_cfg(), _cfg(steps=9), ck.with_name("checkpoint-3"), 3)
    assert (
        early is not None
        and "It stopped at step 3 of 6: first finish it with its own budget (its command with --steps 6)" in early
    )


def test_extension_refusal_sets_a_warm_up_of_at_most_a_tenth_of_the_extra_steps() -> None:
    # config.json's warm-up (20) would outlast 20 extra steps: the learning rate would never decay
    ck = Path("/r/checkpoint-20")
    msg = extension_refusal(_cfg(steps=20, warmup_steps=20), _cfg(steps=40, warmup_steps=20), ck, 20) or ""
    assert "--steps 20 --warmup-steps 2 --seed 4" in msg and "a warm-up of 2 steps and a cosine decay over" in msg
    short = extension_refusal(_cfg(steps=20, warmup_steps=5), _cfg(steps=220, warmup_steps=5), ck, 20) or ""
    assert "--steps 200 --warmup-steps 5 " in short  # the run's own warm-up when shorter than a tenth


def test_extension_refusal_is_none_unless_the_budget_grows() -> None:
    ck = Path("/r/checkpoint-6")
    assert extension_refusal(_cfg(), _cfg(steps=5), ck, 6) is None
    assert extension_refusal(_cfg(), _cfg(tokens=384), ck, 6) is None  # the same 6 steps
    assert extension_refusal(_cfg(steps=True), _cfg(steps=9), ck, 6) is None  # not a config of ddk
    assert extension_refusal(_cfg(), _cfg(steps=9), ck, "6") is None
