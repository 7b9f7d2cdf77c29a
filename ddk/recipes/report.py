"""Reporting of distillation runs: the per-domain gap table, the run folder's plots, and the
comparison of finished runs (``ddk compare``, ``make demo``)."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ddk._io import loads_json, printable, read_json

__all__ = [
    "Comparison",
    "compare_runs",
    "compare_summaries",
    "format_table",
    "gap_records",
    "plots",
    "read_summary",
]


def plots(out: Path, method: str) -> list[str]:
    """The plots of a run folder: ``weights.png`` (domain weights over steps), ``gaps.png``
    (validation CE gap per domain, from step 0: the controller's ``init`` record, then every
    interval of ``metrics.jsonl``) and ``loss.png`` (the CE and KD terms of ``metrics.jsonl``)."""
    try:
        from ddk.recipes.plotting import plot_gaps, plot_losses, plot_weights
    except ImportError:  # pragma: no cover
        return []
    paths = []
    try:
        paths.append(
            str(plot_weights(out / "controller.jsonl", out / "weights.png", title=f"{method}: domain weights"))
        )
        metrics = _lines(out / "metrics.jsonl")
        recs = gap_records(out, metrics)
        if recs:
            paths.append(str(plot_gaps(recs, out / "gaps.png", title=f"{method}: validation CE gap to the teacher")))
        if any(isinstance(r.get("loss"), (int, float)) for r in metrics):
            paths.append(str(plot_losses(metrics, out / "loss.png", title=f"{method}: training loss")))
    except ImportError as e:  # pragma: no cover - matplotlib missing
        print(f"plots skipped: {e}", file=sys.stderr)
    return paths


def _lines(path: Path) -> list[dict[str, Any]]:
    return [loads_json(line, where=str(path)) for line in path.read_text().splitlines() if line.strip()]


def gap_records(out: Path, metrics: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The per-domain validation CE of a run folder over its steps, what ``gaps.png`` draws: the
    controller's ``init`` record (step 0, before any update; in ``controller.jsonl``), then each
    ``metrics.jsonl`` record with ``student_ce`` (every interval and the last step), each with the
    ``domain_names`` of ``summary.json``."""
    names = read_json(out / "summary.json")["domains"]
    metrics = _lines(out / "metrics.jsonl") if metrics is None else metrics
    start = [r for r in _lines(out / "controller.jsonl") if r.get("event") == "init" and "student_ce" in r][:1]
    recs = [*start, *(r for r in metrics if "student_ce" in r and (not start or r["step"] > start[0]["step"]))]
    return [{**r, "domain_names": names} for r in recs]


def _widths(names: Sequence[str], labels: Sequence[str]) -> tuple[int, int]:
    """(label column, domain column) widths of the tables."""
    return max(18, max(len(x) for x in labels) + 2), max(10, max(len(n) for n in names) + 2)


def _same_ce(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9) for x, y in zip(a, b))


def format_table(
    summaries: list[dict[str, Any]], labels: Sequence[str] | None = None, *, column: str = "method"
) -> str:
    """Per-domain CE gap (student - teacher, nats/token) per run, with mean, worst and mean ppl ratio,
    then the CE the gaps come from: each run's student CE, and the teacher CE once when every run
    has the same (noted), else per run.

    ``labels`` name the rows (default: each run's method, and its seed when there are several runs);
    ``column`` heads the labels' column (``ddk compare``: ``run``, its rows being run folders).
    """
    gaps, ce, _, _ = _table(summaries, labels, column)
    return "\n".join(gaps + ce)


def _table(
    summaries: list[dict[str, Any]], labels: Sequence[str] | None, column: str, more: Sequence[str] = ()
) -> tuple[list[str], list[str], int, int]:
    """``format_table``'s lines (the head and gap rows; the CE rows and their note) and its (label,
    domain) column widths, wide enough for the labels ``more`` too."""
    names = [printable(n) for n in summaries[0]["domains"]]  # control characters escaped
    if labels is None:
        labels = [s["method"] + (f" s{s['seed']}" if len(summaries) > 1 and "seed" in s else "") for s in summaries]
    labels = [printable(x) for x in labels]

    def ref(s: dict[str, Any]) -> str:
        # a run without a teacher (cpt) measures its gaps against its own student's CE at the start
        return "start CE" if "teacher_identity" in s and s["teacher_identity"] is None else "teacher CE"

    ce_rows: list[tuple[str, list[float]]] = []
    note = ""
    if len(summaries) == 1:
        ce_rows = [(ref(summaries[0]), summaries[0]["teacher_ce"]), ("student CE", summaries[0]["student_ce"])]
    else:
        refs = {ref(s) for s in summaries}
        if len(refs) == 1 and all(_same_ce(s["teacher_ce"], summaries[0]["teacher_ce"]) for s in summaries):
            ce_rows.append((refs.pop(), summaries[0]["teacher_ce"]))
            note = f"({ce_rows[0][0]}: the same for every run.)"
        else:
            ce_rows += [(f"{ref(s)} {label}", s["teacher_ce"]) for label, s in zip(labels, summaries)]
        ce_rows += [(f"student CE {label}", s["student_ce"]) for label, s in zip(labels, summaries)]
    lw, w = _widths(names, [column, *labels, *(x for x, _ in ce_rows), *(printable(x) for x in more)])
    head = (
        f"{column:<{lw}}" + "".join(f"{n[: w - 1]:>{w}}" for n in names) + f"{'mean':>9}{'worst':>9}{'ppl-ratio':>11}"
    )
    rows = [head, "-" * len(head)]
    for label, s in zip(labels, summaries):
        rows.append(
            f"{label:<{lw}}"
            + "".join(f"{g:>{w}.4f}" for g in s["gap"])
            + f"{s['mean_gap']:>9.4f}{s['worst_gap']:>9.4f}{s['mean_ratio']:>11.4f}"
        )
    ce_lines = [f"{x:<{lw}}" + "".join(f"{c:>{w}.4f}" for c in ce) for x, ce in ce_rows]
    return rows, ce_lines + ([note] if note else []), lw, w


# ---------------------------------------------------------------------------- comparison of runs
_SUMMARY_LISTS = ("gap", "student_ce", "teacher_ce")
_SUMMARY_NUMBERS = ("mean_gap", "worst_gap", "mean_ratio")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_summary(s: Any, where: str, fn: str) -> dict[str, Any]:
    """``s`` if it is a ``summary.json`` of ``ddk distill`` (domains, per-domain lists, mean, worst), else an error."""
    bad = "it is not a mapping" if not isinstance(s, dict) else ""
    if not bad:
        names = s.get("domains")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            bad = "no list of domain names under 'domains'"
        elif any(
            not isinstance(s.get(k), list) or len(s[k]) != len(names) or not all(map(_is_number, s[k]))
            for k in _SUMMARY_LISTS
        ):
            bad = f"no list of {len(names)} finite numbers under each of {list(_SUMMARY_LISTS)}"
        elif not all(_is_number(s.get(k)) for k in _SUMMARY_NUMBERS):
            bad = f"no finite number under each of {list(_SUMMARY_NUMBERS)}"
    if bad:
        raise ValueError(f"{fn}: {where} must be the summary.json written by ddk distill; got one with {bad}.")
    return s


def read_summary(run: str | os.PathLike[str], fn: str = "compare") -> dict[str, Any]:
    """The ``summary.json`` of a finished run folder (size- and depth-capped, its fields checked).

    Raises:
        ValueError: ``run`` is not a folder with a readable ``summary.json`` (a run still going or
            stopped has none: the message says to finish it).
    """
    path = Path(run) / "summary.json"
    if not Path(run).is_dir():
        raise ValueError(f"{fn}: each run must be a run folder of ddk distill; got {str(run)!r}, not a folder.")
    if not path.is_file():
        raise ValueError(
            f"{fn}: each run must be a finished ddk distill run (its summary.json is written at the end); got "
            f"{str(run)!r} without one. Finish it first: rerun its `ddk distill` command, which resumes."
        )
    try:
        s = read_json(path, fn=fn)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"{fn}: {path} must be the summary.json written by ddk distill; got an unreadable file "
            f"({type(exc).__name__}: {exc})."
        ) from None
    return _check_summary(s, str(path), fn)


@dataclass(frozen=True)
class Comparison:
    """The per-domain gaps of several runs side by side (``compare_summaries``).

    Attributes:
        labels: the runs' names, in order; the first is the reference.
        domains: the domains, in the runs' order.
        text: the table as printed: the gaps (validation), a ``<run> - <first>`` row per other
            run, and the same for the test split when every run has ``summary.json`` ``test``.
        difference: ``{label: {"gap": [per domain], "mean_gap", "worst_gap"}}``, each run after
            the first minus the first (negative: closer to the teacher), on the validation sets.
        test_difference: the same on the test sets, or None when not every run has them.
        plot: the bar plot written (final validation gaps side by side), or None.
    """

    labels: tuple[str, ...]
    domains: tuple[str, ...]
    text: str
    difference: dict[str, dict[str, Any]]
    test_difference: dict[str, dict[str, Any]] | None
    plot: Path | None


def _differences(parts: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> dict[str, dict[str, Any]]:
    ref = parts[0]
    return {
        label: {
            "gap": [a - b for a, b in zip(p["gap"], ref["gap"])],
            "mean_gap": p["mean_gap"] - ref["mean_gap"],
            "worst_gap": p["worst_gap"] - ref["worst_gap"],
        }
        for label, p in zip(labels[1:], parts[1:])
    }


def _difference_rows(diff: dict[str, dict[str, Any]], first: str, lw: int, w: int) -> list[str]:
    return [
        f"{printable(f'{label} - {first}'):<{lw}}"
        + "".join(f"{g:>{w}.4f}" for g in d["gap"])
        + f"{d['mean_gap']:>9.4f}{d['worst_gap']:>9.4f}"
        for label, d in diff.items()
    ]


def _validation_notes(runs: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> list[str]:
    """A warning naming the runs measured on other validation sets than the first (``summary.json``'s
    ``validation_identity``: a checksum of the validation token ids), and a note naming the runs
    whose summary has none (written by an older ddk), which are not checked."""
    ids = [s.get("validation_identity") for s in runs]
    unknown = [x for x, v in zip(labels, ids) if not isinstance(v, dict)]
    known = [(x, v) for x, v in zip(labels, ids) if isinstance(v, dict)]
    lines = []
    if known:
        ref_label, ref = known[0]
        other = [x for x, v in known[1:] if v.get("checksum") != ref.get("checksum")]
        if other:
            lines.append(
                f"warning: {other} were measured on other validation sets than {ref_label!r} (other records, "
                "split, --val-samples, --seq-len or tokenizer; summary.json 'validation_identity'): their CE and "
                "gaps do not compare with its."
            )
    if unknown and len(runs) > 1:
        lines.append(
            f"note: {unknown} have no validation_identity in summary.json (an older ddk): whether every run was "
            "measured on the same validation sets is not checked."
        )
    return lines


def compare_summaries(
    summaries: Mapping[str, Mapping[str, Any]],
    out_png: str | os.PathLike[str] | None = None,
    *,
    title: str = "Per-domain gap to the teacher after distillation",
    column: str = "run",
    fn: str = "compare",
) -> Comparison:
    """The per-domain gap table of finished runs, their differences against the first, and the bar plot.

    Args:
        summaries: ``{label: summary.json content}``, in order; the first is the reference.
        out_png: where to write the bars of the final validation gaps side by side (None: no plot).
        title: the plot's title.
        column: the heading of the labels' column (``run``: run folders; the demo's are methods).
        fn: the name errors start with.

    Returns:
        The ``Comparison`` (its ``text`` is what ``ddk compare`` prints).

    Raises:
        ValueError: no run, a summary without its fields, or runs with other domains than the first's.
    """
    labels = list(summaries)
    if not labels:
        raise ValueError(f"{fn}: runs must name at least one run; got none.")
    runs = [_check_summary(dict(summaries[k]), f"the summary of {k!r}", fn) for k in labels]
    names = list(runs[0]["domains"])
    for label, s in zip(labels[1:], runs[1:]):
        if list(s["domains"]) != names:
            raise ValueError(
                f"{fn}: every run must have the domains of the first, {labels[0]!r} ({names}); got "
                f"{list(s['domains'])} in {label!r}. Only runs on the same domains compare."
            )
    diff = _differences(runs, labels)
    gap_rows, ce_rows, lw, w = _table(runs, labels, column, [f"{x} - {labels[0]}" for x in labels])
    text = [*gap_rows, *_difference_rows(diff, labels[0], lw, w), *ce_rows]
    if len(runs) > 1:
        text.append(
            f"(gap = student CE - teacher CE on each domain's validation set, nats/token; '<run> - {labels[0]}' < 0: "
            f"the run ends closer to the teacher than {labels[0]} on that domain.)"
        )
    others = [x for x, s in zip(labels[1:], runs[1:]) if s.get("teacher_identity") != runs[0].get("teacher_identity")]
    if others:
        text.append(f"note: {others} had another teacher than {labels[0]!r}; each gap is against its own teacher.")
    text += _validation_notes(runs, labels)
    test_diff = None
    tests = [s.get("test") for s in runs]
    if all(isinstance(t, dict) for t in tests):
        tparts = [
            _check_summary({"domains": names, "mean_ratio": 0.0, **dict(t or {})}, f"the test of {x!r}", fn)
            for x, t in zip(labels, tests)
        ]
        test_diff = _differences(tparts, labels)
        head = (
            f"{'test split':<{lw}}"
            + "".join(f"{printable(n)[: w - 1]:>{w}}" for n in names)
            + f"{'mean':>9}{'worst':>9}"
        )
        text += ["", head, "-" * len(head)]
        text += [
            f"{printable(x):<{lw}}"
            + "".join(f"{g:>{w}.4f}" for g in t["gap"])
            + f"{t['mean_gap']:>9.4f}{t['worst_gap']:>9.4f}"
            for x, t in zip(labels, tparts)
        ]
        text += _difference_rows(test_diff, labels[0], lw, w)
        text.append("(the test split: held-out records no run read; summary.json 'test')")
    elif any(isinstance(t, dict) for t in tests):
        have = [x for x, t in zip(labels, tests) if isinstance(t, dict)]
        text.append(f"note: only {have} have test gaps (summary.json 'test'); the test split is not compared.")
    plot = None
    if out_png is not None:
        from ddk.recipes.plotting import plot_domain_bars

        plot = plot_domain_bars({x: s["gap"] for x, s in zip(labels, runs)}, names, out_png, title=title)
    return Comparison(tuple(labels), tuple(names), "\n".join(text), diff, test_diff, plot)


def compare_runs(
    runs: Sequence[str | os.PathLike[str]], out_png: str | os.PathLike[str] | None = "compare.png"
) -> Comparison:
    """``ddk compare RUN [RUN ...]``: ``compare_summaries`` of the runs' ``summary.json``, each run
    named by its folder's name (by the path given when two names are the same)."""
    if not runs:
        raise ValueError("compare: runs must name at least one run folder; got none.")
    names = [Path(r).resolve().name or str(r) for r in runs]
    labels = names if len(set(names)) == len(names) else [str(r) for r in runs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"compare: runs must be distinct folders; got {[str(r) for r in runs]}.")
    summaries = {label: read_summary(r) for label, r in zip(labels, runs)}
    return compare_summaries(summaries, out_png)
