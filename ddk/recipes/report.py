"""Reporting of distillation runs: the per-domain gap table and the run folder's plots."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ddk._io import loads_json, read_json

__all__ = ["format_table", "plots"]


def plots(out: Path, method: str) -> list[str]:
    """``weights.png`` (domain weights over steps) and ``gaps.png`` (validation CE gap per domain) of a run folder."""
    try:
        from ddk.recipes.plotting import plot_gaps, plot_weights
    except ImportError:  # pragma: no cover
        return []
    paths = []
    try:
        paths.append(
            str(plot_weights(out / "controller.jsonl", out / "weights.png", title=f"{method}: domain weights"))
        )
        recs = [loads_json(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "student_ce" in line]
        names = read_json(out / "summary.json")["domains"]
        if recs:
            for r in recs:
                r["domain_names"] = names
            paths.append(str(plot_gaps(recs, out / "gaps.png", title=f"{method}: validation CE gap to the teacher")))
    except ImportError as e:  # pragma: no cover - matplotlib missing
        print(f"plots skipped: {e}", file=sys.stderr)
    return paths


def format_table(summaries: list[dict[str, Any]]) -> str:
    """Per-domain CE gap (student - teacher, nats/token) per run, with mean, worst and mean ppl ratio."""
    from ddk._io import printable

    names = [printable(n) for n in summaries[0]["domains"]]  # control characters escaped
    w = max(10, max(len(n) for n in names) + 2)
    head = (
        f"{'method':<18}" + "".join(f"{n[: w - 1]:>{w}}" for n in names) + f"{'mean':>9}{'worst':>9}{'ppl-ratio':>11}"
    )
    rows = [head, "-" * len(head)]
    for s in summaries:
        label = s["method"] + (f" s{s['seed']}" if len(summaries) > 1 and "seed" in s else "")
        rows.append(
            f"{label:<18}"
            + "".join(f"{g:>{w}.4f}" for g in s["gap"])
            + f"{s['mean_gap']:>9.4f}{s['worst_gap']:>9.4f}{s['mean_ratio']:>11.4f}"
        )
    # a run without a teacher (cpt) measures its gaps against its own student's CE at the start
    no_teacher = "teacher_identity" in summaries[0] and summaries[0]["teacher_identity"] is None
    ref = "start CE" if no_teacher else "teacher CE"
    rows.append(f"{ref:<18}" + "".join(f"{c:>{w}.4f}" for c in summaries[0]["teacher_ce"]))
    rows.append(f"{'student CE':<18}" + "".join(f"{c:>{w}.4f}" for c in summaries[-1]["student_ce"]))
    return "\n".join(rows)
