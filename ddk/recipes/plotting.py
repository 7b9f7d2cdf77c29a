"""Plots of a run: domain weights and student-teacher gaps over training (a ``DDKController`` log),
the training loss terms (``metrics.jsonl``) and per-domain bars side by side.

matplotlib is imported lazily (``pip install ddk[plot]``) and drawn with the Agg canvas, so no
display and no pyplot global state are needed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ddk._io import loads_json

_GAP_QUANTITIES = ("gap", "ratio", "student_ce")
_LEGEND_MAX = 40  # domains named in a legend; beyond, the figure says how many


def load_records(log_path_or_records: str | os.PathLike[str] | Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Read controller records from a JSON-lines log, or pass records through.

    Args:
        log_path_or_records: path of a ``DDKController`` log, or its ``records``.

    Returns:
        The records (dicts), in file order.
    """
    fn = "load_records"
    if isinstance(log_path_or_records, (str, os.PathLike)):
        path = Path(log_path_or_records)
        if not path.is_file():
            raise ValueError(f"{fn}: log_path_or_records must be an existing JSON-lines file; got {str(path)!r}.")
        with path.open(encoding="utf-8") as f:
            records = [loads_json(line, where=str(path), fn=fn) for line in f if line.strip()]
    else:
        records = [dict(r) for r in log_path_or_records]
    if not records:
        raise ValueError(f"{fn}: log_path_or_records must hold at least one record; got none.")
    for r in records:
        missing = [k for k in ("step", "domain_names", "weights") if k not in r]
        if missing:
            raise ValueError(
                f"{fn}: every record must have keys step, domain_names, weights; got a record missing {missing}."
            )
    return records


def _figure(title: str, xlabel: str, ylabel: str) -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("ddk.recipes.plotting needs matplotlib: pip install 'ddk[plot]'.") from e
    fig = Figure(figsize=(8, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig: Any, ax: Any, out_png: str | os.PathLike[str]) -> Path:
    """Write ``fig`` to ``out_png`` atomically; with ``ax``, a legend of its lines beside it first."""
    if ax is not None:
        lines = len(ax.get_legend_handles_labels()[1])
        if lines <= _LEGEND_MAX:
            ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small")
        else:  # a legend of thousands of domains is unreadable, and matplotlib lays it out for minutes
            ax.text(1.01, 0.5, f"{lines} domains\n(no legend)", transform=ax.transAxes, va="center", fontsize="small")
    fig.tight_layout()
    import io

    from ddk._io import atomic_write_bytes

    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=120, format=out.suffix.lstrip(".").lower() or "png")
    return atomic_write_bytes(out, buf.getvalue())  # atomic; a link at out is an error, never written through


def plot_weights(
    log_path_or_records: str | os.PathLike[str] | Iterable[Mapping[str, Any]],
    out_png: str | os.PathLike[str],
    *,
    title: str = "DDK domain weights",
) -> Path:
    """Plot each domain's sampling weight against the optimizer step (a step line per domain).

    Args:
        log_path_or_records: a ``DDKController`` JSON-lines log or its ``records``.
        out_png: output image path (parent folders are created).
        title: figure title.

    Returns:
        The path written.
    """
    records = load_records(log_path_or_records)
    names = records[-1]["domain_names"]
    steps = [r["step"] for r in records]
    fig, ax = _figure(title, "optimizer step", "sampling weight")
    for i, name in enumerate(names):
        ax.step(steps, [r["weights"][i] for r in records], where="post", label=name, marker="o", markersize=3)
    ax.set_ylim(bottom=0)
    return _save(fig, ax, out_png)


def plot_gaps(
    log_path_or_records: str | os.PathLike[str] | Iterable[Mapping[str, Any]],
    out_png: str | os.PathLike[str],
    *,
    quantity: str = "gap",
    title: str | None = None,
) -> Path:
    """Plot the per-domain student-teacher discrepancy against the optimizer step.

    Args:
        log_path_or_records: a ``DDKController`` JSON-lines log or its ``records``.
        out_png: output image path (parent folders are created).
        quantity: ``"gap"`` (``student_ce - teacher_ce``, nats/token), ``"ratio"``
            (``ppl_S / ppl_T``) or ``"student_ce"``.
        title: figure title (default from ``quantity``).

    Returns:
        The path written.
    """
    if quantity not in _GAP_QUANTITIES:
        raise ValueError(f"plot_gaps: quantity must be one of {_GAP_QUANTITIES}; got {quantity!r}.")
    records = load_records(log_path_or_records)
    for r in records:
        if "student_ce" not in r or "teacher_ce" not in r:
            raise ValueError(
                "plot_gaps: every record must have keys student_ce, teacher_ce; got a record without them."
            )
    names = records[-1]["domain_names"]
    steps = [r["step"] for r in records]
    labels = {"gap": "CE_S - CE_T (nats/token)", "ratio": "ppl_S / ppl_T", "student_ce": "student CE (nats/token)"}
    fig, ax = _figure(title or f"DDK per-domain {quantity}", "optimizer step", labels[quantity])
    for i, name in enumerate(names):
        s = [r["student_ce"][i] for r in records]
        t = [r["teacher_ce"][i] for r in records]
        if quantity == "gap":
            ys = [a - b for a, b in zip(s, t)]
        elif quantity == "ratio":
            ys = [math.exp(a - b) for a, b in zip(s, t)]
        else:
            ys = s
        ax.plot(steps, ys, label=name, marker="o", markersize=3)
    return _save(fig, ax, out_png)


def plot_domain_bars(
    values: Mapping[str, Iterable[float]],
    domain_names: Iterable[str],
    out_png: str | os.PathLike[str],
    *,
    ylabel: str = "CE_S - CE_T (nats/token)",
    title: str = "Per-domain gap to the teacher at the end of distillation",
    errors: Mapping[str, Iterable[float]] | None = None,
) -> Path:
    """Grouped bars: one group per domain, one bar per method (e.g. the final per-domain gap).

    Args:
        values: ``{method: one value per domain}``.
        domain_names: the domains, in the order of the values.
        out_png: output image path (parent folders are created).
        ylabel, title: axis label and figure title.
        errors: optional ``{method: half-width per domain}`` drawn as error bars.

    Returns:
        The path written.
    """
    names = list(domain_names)
    rows = {m: list(v) for m, v in values.items()}
    bad = [m for m, v in rows.items() if len(v) != len(names)]
    if not rows or bad:
        raise ValueError(
            f"plot_domain_bars: values must hold one value per domain ({len(names)}) for each method; got {bad or 'none'}."
        )
    fig, ax = _figure(title, "", ylabel)
    fig.set_size_inches(max(8.0, 1.1 * len(names) + 2), 4.5)
    width = 0.8 / len(rows)
    for k, (m, v) in enumerate(rows.items()):
        err = list(errors[m]) if errors is not None and m in errors else None
        ax.bar([i + k * width for i in range(len(names))], v, width, yerr=err, capsize=2 if err else 0, label=m)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=20)
    ax.grid(True, axis="y", alpha=0.3)
    ax.axhline(0.0, color="black", linewidth=0.6)
    return _save(fig, ax, out_png)


def plot_losses(
    metrics_path_or_records: str | os.PathLike[str] | Iterable[Mapping[str, Any]],
    out_png: str | os.PathLike[str],
    *,
    title: str = "DDK training loss",
) -> Path:
    """Plot the training loss terms of a run's ``metrics.jsonl`` against the optimizer step: the
    cross-entropy ``ce`` and the total ``loss`` (``ce + gamma * kd``) on the left axis, the KD term
    ``kd`` (``KL(p_T || p_S)`` per token, before ``gamma``) on the right axis, whose scale is
    usually far smaller. Skipped steps (``loss`` None) are left out.

    Args:
        metrics_path_or_records: a run's ``metrics.jsonl`` or its records (dicts with ``step``,
            ``loss``, ``ce``, ``kd``).
        out_png: output image path (parent folders are created).
        title: figure title.

    Returns:
        The path written.
    """
    fn = "plot_losses"
    if isinstance(metrics_path_or_records, (str, os.PathLike)):
        path = Path(metrics_path_or_records)
        if not path.is_file():
            raise ValueError(f"{fn}: metrics_path_or_records must be an existing JSON-lines file; got {str(path)!r}.")
        with path.open(encoding="utf-8") as f:
            records = [loads_json(line, where=str(path), fn=fn) for line in f if line.strip()]
    else:
        records = [dict(r) for r in metrics_path_or_records]
    rows = [r for r in records if all(isinstance(r.get(k), (int, float)) for k in ("step", "loss", "ce", "kd"))]
    if not rows:
        raise ValueError(f"{fn}: metrics_path_or_records must hold a record with step, loss, ce and kd; got none.")
    return _save(_loss_figure(rows, title), None, out_png)


def _loss_figure(rows: list[dict[str, Any]], title: str) -> Any:
    """``plot_losses``' figure: its legend below the axes, where it covers no curve."""
    steps = [r["step"] for r in rows]
    fig, ax = _figure(title, "optimizer step", "nats/token")
    ax.plot(steps, [r["ce"] for r in rows], label="CE (student, labels)", color="tab:blue")
    ax.plot(steps, [r["loss"] for r in rows], label="loss = CE + gamma * KD", color="tab:gray", linestyle="--")
    kd_ax = ax.twinx()
    kd_ax.plot(steps, [r["kd"] for r in rows], label="KD = KL(p_T || p_S)", color="tab:red")
    kd_ax.set_ylabel("KD term (nats/token)", color="tab:red")
    kd_ax.tick_params(axis="y", labelcolor="tab:red")
    handles, labels = ax.get_legend_handles_labels()
    kd_handles, kd_labels = kd_ax.get_legend_handles_labels()
    ax.legend(
        handles + kd_handles,
        labels + kd_labels,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.13),  # under the step axis' label
        ncol=3,
        fontsize="small",
        frameon=False,
    )
    return fig
