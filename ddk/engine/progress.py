"""What a run prints while it trains: a progress bar on a terminal, plain lines anywhere else.

* ``show_bars(progress)``: tqdm bars only when asked for (``progress``) *and* stderr is a
  terminal, so a log file or a pipe never fills with ``\\r``-redrawn bars.
* ``TrainLog``: the training loop's report on rank 0. With bars, one bar with the loss and the
  mean gap; without (stderr not a terminal, or ``progress=False``), one plain line per logging
  step (``log_every``, the interval ends, the last step; ``plain_line``).
* Status lines (``ddk.engine.runfolder.log``: a resume, a checkpoint written, the end) are printed
  apart from both, with ``tqdm.write``: above a bar, and never silenced by ``progress=False``.

Everything goes to stderr: redirect it (``2>run.log``) for a quiet run.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from ddk._io import printable

__all__ = ["TrainLog", "plain_line", "show_bars"]

_WEIGHTS_SHOWN = 8  # domains whose weights a plain line names; more: the lightest and the heaviest


def show_bars(progress: bool) -> bool:
    """True when tqdm bars should be drawn: ``progress`` asked for them and stderr is a terminal."""
    try:
        return bool(progress) and sys.stderr.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def plain_line(desc: str, step: int, total: int, rec: dict[str, Any], names: Sequence[str], tokens_per_s: float) -> str:
    """One line for a logging step's ``metrics.jsonl`` record ``rec``: step, loss, CE, KD (nats per
    token), learning rate and throughput; at an interval end (``rec`` has ``ratio``) the mean and
    worst gap (``log(ppl_S / ppl_T)``, nats per token) and the domain weights.

    Examples:
        >>> rec = {"loss": 3.2, "ce": 3.1, "kd": 0.5, "lr": 1e-3, "weights": [0.7, 0.3], "ratio": [1.5, 1.2]}
        >>> plain_line("distill ddk", 20, 400, rec, ["code", "prose"], 1234.5)
        'distill ddk: step 20/400  loss 3.2000  ce 3.1000  kd 0.5000  lr 1.00e-03  1,234 tok/s  gap 0.2939 (worst code 0.4055)  weights code 0.700 prose 0.300'
    """
    parts = [f"{desc}: step {step}/{total}"]
    if rec.get("loss") is None:
        parts.append("skipped (non-finite loss or gradient)")
    else:
        parts += [f"loss {rec['loss']:.4f}", f"ce {rec['ce']:.4f}", f"kd {rec['kd']:.4f}"]
    parts += [f"lr {rec['lr']:.2e}", f"{tokens_per_s:,.0f} tok/s"]
    if "ratio" in rec:
        gap = np.log(np.asarray(rec["ratio"], dtype=np.float64))
        worst = int(np.argmax(gap))
        parts.append(f"gap {gap.mean():.4f} (worst {names[worst]} {gap[worst]:.4f})")
        w = list(rec["weights"])
        if len(w) <= _WEIGHTS_SHOWN:
            parts.append("weights " + " ".join(f"{n} {x:.3f}" for n, x in zip(names, w)))
        else:
            lo, hi = int(np.argmin(w)), int(np.argmax(w))
            parts.append(f"weights {names[lo]} {w[lo]:.4f} .. {names[hi]} {w[hi]:.4f}")
    return "  ".join(parts)


class TrainLog:
    """The training loop's report: a tqdm bar (``bars``) or plain lines, on rank 0 only (``enabled``).

    Args:
        desc: the bar's and the lines' prefix (``"distill ddk"``).
        start: the step the run starts after (a resume's step, else 0).
        total: the run's last step.
        names: the domain names, in the sampler's order.
        bars: draw a bar (``show_bars(progress)``) instead of plain lines.
        enabled: print anything at all (rank 0).
    """

    def __init__(self, desc: str, start: int, total: int, names: Sequence[str], *, bars: bool, enabled: bool) -> None:
        self.desc, self.total, self.names, self.enabled = desc, total, [printable(n) for n in names], enabled
        self.bar: Any = None
        if enabled and bars:
            from tqdm.auto import tqdm

            self.bar = tqdm(desc=desc, initial=start, total=total)

    def step(self, step: int, rec: dict[str, Any] | None, tokens_per_s: float | None) -> None:
        """After step ``step``; ``rec``: its ``metrics.jsonl`` record on a logging step, else None."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            if rec is not None and "ratio" in rec:
                self.bar.set_postfix(
                    loss="skipped" if rec["loss"] is None else f"{rec['loss']:.3f}",
                    gap=f"{np.mean(np.log(rec['ratio'])):.3f}",
                )
        elif rec is not None:
            line = plain_line(self.desc, step, self.total, rec, self.names, tokens_per_s or 0.0)
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
