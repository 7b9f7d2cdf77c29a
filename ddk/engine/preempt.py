"""Graceful preemption of ``ddk distill`` and ``ddk teacher-cache``: SIGTERM or SIGINT at any
moment stop with :data:`EXIT_PREEMPTED`, and rerunning the same command resumes with nothing lost.

While training, a signal finishes the current step and writes a checkpoint (``StopSignals.defer``
around the loop); at any other moment (start-up, the final validation, saving the student, the
plots, a teacher-cache build) :func:`stop_signals` raises :class:`Preempted` at once: every file
there is written atomically, so the same command redoes that stage from the newest checkpoint or
the finished shards. Cluster schedulers (Slurm, Kubernetes) send SIGTERM some time before they
kill a job; Ctrl-C sends SIGINT. A second signal of the same kind takes its default action (stop
at once), so an impatient user is never stuck. Imported by the CLI without torch.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any, ClassVar

__all__ = ["EXIT_PREEMPTED", "Preempted", "StopSignals", "first_rank", "set_stage", "stop_signals"]

#: exit status of ``ddk distill`` stopped by SIGTERM/SIGINT after writing its checkpoint
#: (``EX_TEMPFAIL`` of sysexits.h: "try again later" -- rerun the same command to resume).
EXIT_PREEMPTED = 75


class Preempted(BaseException):
    """Stopped by a signal: after writing ``checkpoint`` (training), or during ``stage`` (``step``
    -1, ``checkpoint`` ""); rerun the same command to resume.

    A ``BaseException``, like ``KeyboardInterrupt``: code that wraps errors (``except Exception``,
    e.g. around loading a model) lets it through, so the CLI still exits 75."""

    def __init__(self, signame: str, step: int, checkpoint: str, *, stage: str = "", kept: str = "") -> None:
        if checkpoint:
            msg = f"stopped by {signame} after step {step}; wrote {checkpoint}. "
            msg += "Rerun the same command to resume from it."
        else:
            kept = kept or "Nothing finished is lost"
            msg = f"stopped by {signame} during {stage or 'start-up'}. {kept}: rerun the same command to resume."
        super().__init__(msg)
        self.signame, self.step, self.checkpoint, self.stage = signame, step, checkpoint, stage


class StopSignals:
    """``with StopSignals("distill") as stop:`` records the first SIGTERM/SIGINT in ``stop.signum``
    instead of dying; outside the main thread it does nothing (signals cannot be caught there).

    With ``at_once=True`` the first signal raises :class:`Preempted` (naming ``stage``; ``kept``
    says what survives) where the program is, except inside ``with stop.defer():``, where it is
    only recorded (the training loop checks ``signum`` after each step); a signal recorded there
    and not acted on raises when the block ends.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    _current: ClassVar[StopSignals | None] = None  # the innermost active one (main thread)

    def __init__(self, fn: str, *, at_once: bool = False, stage: str = "", kept: str = "") -> None:
        self.fn, self.at_once, self.stage, self.kept = fn, at_once, stage, kept
        self.signum: int | None = None
        self.handled = False  # a deferred signal acted on (the loop raised Preempted)
        self._deferred = 0
        self._old: dict[int, Any] = {}
        self._outer: StopSignals | None = None

    @property
    def signame(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))  # the next one acts at once
        if self.at_once and not self._deferred:
            self.handled = True
            raise Preempted(self.signame, -1, "", stage=self.stage, kept=self.kept)
        if first_rank():  # under torchrun every rank gets the signal; rank 0 says it once
            print(
                f"{self.fn}: got {signal.Signals(signum).name}: finishing this step and writing a checkpoint "
                "(send it again to stop at once)",
                file=sys.stderr,
                flush=True,
            )

    @contextlib.contextmanager
    def defer(self) -> Iterator[StopSignals]:
        """Inside the block a signal is only recorded (``signum``); one not acted on (``handled``) raises at its end."""
        self._deferred += 1
        try:
            yield self
        finally:
            self._deferred -= 1
        if self.at_once and not self._deferred and self.signum is not None and not self.handled:
            self.handled = True
            raise Preempted(self.signame, -1, "", stage=self.stage, kept=self.kept)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
            self._outer, StopSignals._current = StopSignals._current, self
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        if self._old:
            StopSignals._current = self._outer
        self._old.clear()


def first_rank() -> bool:
    """Whether this process is rank 0 of a torchrun launch, or not launched by torchrun (``RANK``)."""
    return os.environ.get("RANK", "0") in ("", "0")


@contextlib.contextmanager
def stop_signals(fn: str, stage: str, kept: str = "") -> Iterator[StopSignals]:
    """The active :class:`StopSignals` of the main thread with its ``stage`` set for the block
    (restored after), or a new one with ``at_once=True`` (see :class:`StopSignals`)."""
    cur = StopSignals._current
    if cur is None:
        with StopSignals(fn, at_once=True, stage=stage, kept=kept) as new:
            yield new
        return
    old = cur.stage, cur.kept
    cur.stage, cur.kept = stage, kept or cur.kept
    try:
        yield cur
    finally:
        cur.stage, cur.kept = old


def set_stage(stage: str) -> None:
    """Name the stage a signal would interrupt now (the active :class:`StopSignals`'s ``stage``;
    the enclosing :func:`stop_signals` block restores it); nothing without one."""
    if StopSignals._current is not None:
        StopSignals._current.stage = stage
