"""Experiment tracking: the scalars a DDK run reports, and where they go (TensorBoard, W&B, none).

What is reported, written once for both clients (``ddk distill`` and ``DDKTrainer``):

* at each DDK interval (the controller's ``init`` and ``update`` records, ``controller.jsonl``),
  per domain ``d``: ``weight/<d>`` (the mixture weight from that step on), ``student_ce/<d>`` and
  ``teacher_ce/<d>`` (validation CE, nats/token), ``gap/<d>`` (student CE - teacher CE) and
  ``ratio/<d>`` (``ppl_S / ppl_T``, the signal of Eq. 1/2): ``interval_scalars``;
* at each logging step: ``train/loss``, ``train/ce`` and ``train/kd`` (the CE and divergence
  terms per valid target token of the batches trained since the previous logging step, over all
  ranks; ``loss = ce + gamma * kd``), ``train/lr``, ``tokens/<d>`` (the valid
  target tokens of domain ``d`` trained since the previous logging step, over all ranks) and
  ``throughput/tokens_per_s`` (tokens trained per second since the previous logging step):
  ``step_scalars``.

Where: ``open_tracker(report_to, out, start_step=...)`` returns a ``Tracker`` (``log_scalars``,
``flush``, ``close``). ``tensorboard`` writes event files into ``<out>/tensorboard/`` with
``torch.utils.tensorboard.SummaryWriter``; a resumed run opens it with ``purge_step`` = the first
step it trains again, so TensorBoard drops what the interrupted run wrote after its checkpoint and
no step appears twice. ``wandb`` logs to Weights & Biases (optional: ``pip install wandb``; its
files in ``<out>/wandb/``, the run id kept there so a resumed run continues the same W&B run, which
ignores steps it already holds; ``WANDB_PROJECT`` names the project, ``ddk`` by default,
``WANDB_MODE=offline`` keeps it local: there a resume writes a second ``offline-run-*-<id>`` folder of
the same run, holding again the steps logged after the checkpoint, with the same values, for
``wandb sync`` to upload after the first). ``none`` reports nothing.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "REPORT_TO",
    "NullTracker",
    "TensorBoardTracker",
    "Tracker",
    "WandbTracker",
    "check_report_to",
    "interval_scalars",
    "open_tracker",
    "step_scalars",
]

#: the values of ``report_to`` (``--report-to``)
REPORT_TO: tuple[str, ...] = ("none", "tensorboard", "wandb")

_PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb"}  # the package each backend needs


class Tracker(Protocol):
    """Where a run's scalars go."""

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        """Record every ``tag: value`` of ``values`` at optimizer step ``step``."""

    def flush(self) -> None:
        """Write what is buffered (called before each checkpoint)."""

    def close(self) -> None:
        """Flush and release the backend."""


class NullTracker:
    """``report_to="none"`` (and every rank but 0): reports nothing."""

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker:
    """Event files in ``log_dir`` (``SummaryWriter``); ``purge_step``: the first step written again after a resume."""

    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, float(value), global_step=step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run with its files in ``<out>/wandb/``, resumed by the id kept there."""

    ID_FILE = "ddk-run-id"

    def __init__(self, out: Path, config: Mapping[str, Any] | None = None, resumed: bool = False) -> None:
        import wandb

        folder = out / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / self.ID_FILE
        run_id = id_file.read_text().strip() if resumed and id_file.is_file() else ""
        if not run_id:
            run_id = secrets.token_hex(8)
            id_file.write_text(run_id + "\n")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "ddk"),
            name=out.name,
            dir=str(out),
            id=run_id,
            resume="allow",
            config=dict(config or {}),
        )

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        self.run.log({k: float(v) for k, v in values.items()}, step=step)

    def flush(self) -> None:
        pass  # wandb writes in its own process

    def close(self) -> None:
        self.run.finish()


def check_report_to(report_to: str, fn: str) -> None:
    """``report_to`` is one of ``REPORT_TO`` and its package is installed, else a ``ValueError`` naming the fix
    (the loop calls it before loading anything; ``RunConfig.validate`` checks only the name, so a run folder
    stays readable where the package is not installed)."""
    if report_to not in REPORT_TO:
        raise ValueError(f"{fn}: report_to must be one of {REPORT_TO}; got {report_to!r}.")
    package = _PACKAGE.get(report_to)
    if package is not None and importlib.util.find_spec(package) is None:
        raise ValueError(
            f"{fn}: report_to={report_to!r} needs the {package} package; got it not installed. "
            f"Install it with `pip install {package}`, or pass --report-to none (config report_to: none)."
        )


def open_tracker(
    report_to: str,
    out: Path,
    *,
    start_step: int = 0,
    config: Mapping[str, Any] | None = None,
    fn: str = "distill",
) -> Tracker:
    """The ``Tracker`` of ``report_to`` for the run folder ``out``, training from ``start_step`` on.

    Args:
        report_to: ``"none"``, ``"tensorboard"`` or ``"wandb"``.
        out: the run folder (TensorBoard writes ``out/tensorboard/``, W&B ``out/wandb/``).
        start_step: the step the run resumes at (0: a fresh start). TensorBoard purges the steps
            after it that an interrupted run wrote; W&B continues the run of ``out/wandb/``.
        config: the run's options, stored with a W&B run.
        fn: the caller's name, for the error.

    Raises:
        ValueError: an unknown ``report_to``, or its package missing (the message names the fix).
    """
    check_report_to(report_to, fn)
    if report_to == "tensorboard":
        return TensorBoardTracker(out / "tensorboard", purge_step=start_step + 1 if start_step > 0 else None)
    if report_to == "wandb":
        return WandbTracker(out, config=config, resumed=start_step > 0)
    return NullTracker()


def interval_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The per-domain scalars of a controller record (``init``/``update``: ``domain_names``,
    ``weights``, ``student_ce``, ``teacher_ce``, ``ratio``, lists of D floats).

    Examples:
        >>> rec = {"domain_names": ["a"], "weights": [1.0], "student_ce": [3.0], "teacher_ce": [2.5], "ratio": [1.6]}
        >>> interval_scalars(rec)
        {'weight/a': 1.0, 'student_ce/a': 3.0, 'teacher_ce/a': 2.5, 'gap/a': 0.5, 'ratio/a': 1.6}
    """
    out: dict[str, float] = {}
    for i, name in enumerate(record["domain_names"]):
        s, t = float(record["student_ce"][i]), float(record["teacher_ce"][i])
        out[f"weight/{name}"] = float(record["weights"][i])
        out[f"student_ce/{name}"] = s
        out[f"teacher_ce/{name}"] = t
        out[f"gap/{name}"] = s - t
        out[f"ratio/{name}"] = float(record["ratio"][i])
    return out


def step_scalars(
    metrics: Mapping[str, Any],
    domain_names: Sequence[str],
    tokens_per_s: float | None = None,
    domain_tokens: Sequence[float] | None = None,
    terms: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """The logging step's scalars from its ``metrics.jsonl`` record (``loss``, ``ce``, ``kd`` per
    token, None for a skipped batch; ``lr``; ``batch_domain_tokens``, D ints) and the throughput.
    ``tokens/<d>`` is ``domain_tokens`` (D counts: ``ddk distill`` passes those since the previous
    logging step, as ``DDKTrainer`` logs), else the record's ``batch_domain_tokens``; ``terms``
    (``loss``, ``ce``, ``kd``: ``ddk distill`` passes those over the same span) replace the record's.

    Examples:
        >>> rec = {"loss": 2.2, "ce": 2.0, "kd": 1.0, "lr": 1e-3, "batch_domain_tokens": [10, 20]}
        >>> step_scalars(rec, ["a", "b"], tokens_per_s=300.0)["tokens/b"]
        20.0
    """
    values = {**metrics, **(terms or {})}
    out = {f"train/{k}": float(values[k]) for k in ("loss", "ce", "kd", "lr") if values.get(k) is not None}
    counts = metrics.get("batch_domain_tokens", ()) if domain_tokens is None else domain_tokens
    for name, n in zip(domain_names, counts):
        out[f"tokens/{name}"] = float(n)
    if tokens_per_s is not None:
        out["throughput/tokens_per_s"] = float(tokens_per_s)
    return out
