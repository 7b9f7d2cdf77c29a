"""Graceful preemption of ``ddk distill``: SIGTERM or SIGINT finish the current step, write a
checkpoint and stop with :data:`EXIT_PREEMPTED`; rerunning the same command resumes.

Cluster schedulers (Slurm, Kubernetes) send SIGTERM some time before they kill a job; Ctrl-C
sends SIGINT. A second signal of the same kind takes its default action (stop at once), so an
impatient user is never stuck. Imported by the CLI without torch.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any

__all__ = ["EXIT_PREEMPTED", "Preempted", "StopSignals"]

#: exit status of ``ddk distill`` stopped by SIGTERM/SIGINT after writing its checkpoint
#: (``EX_TEMPFAIL`` of sysexits.h: "try again later" -- rerun the same command to resume).
EXIT_PREEMPTED = 75


class Preempted(Exception):
    """``distill`` stopped by a signal after writing ``checkpoint``; rerun the same command to resume."""

    def __init__(self, signame: str, step: int, checkpoint: str) -> None:
        super().__init__(
            f"stopped by {signame} after step {step}; wrote {checkpoint}. Rerun the same command to resume from it."
        )
        self.signame, self.step, self.checkpoint = signame, step, checkpoint


class StopSignals:
    """``with StopSignals("distill") as stop:`` records the first SIGTERM/SIGINT in ``stop.signum``
    instead of dying; outside the main thread it does nothing (signals cannot be caught there)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, fn: str) -> None:
        self.fn = fn
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    @property
    def signame(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))  # the next one acts at once
        print(
            f"{self.fn}: got {signal.Signals(signum).name}: finishing this step and writing a checkpoint "
            "(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()
