"""Tests of ddk/plotting.py: weights and gap plots from controller logs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from ddk.recipes.plotting import load_records, plot_gaps, plot_weights

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _records() -> list[dict]:
    out = []
    for k, step in enumerate((0, 100, 200)):
        out.append(
            {
                "event": "init" if k == 0 else "update",
                "step": step,
                "batch": step,
                "domain_names": ["code", "web"],
                "weights": [0.5 - 0.1 * k, 0.5 + 0.1 * k],
                "ratio": [1.2, 1.1 + k],
                "student_ce": [2.0, 2.5 - 0.1 * k],
                "teacher_ce": [1.8, 2.0],
                "tokens": [10, 12],
                "time": 0.0,
            }
        )
    return out


def test_plot_weights_from_log_file(tmp_path: Path) -> None:
    log = tmp_path / "ddk.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in _records()) + "\n")
    out = plot_weights(log, tmp_path / "plots" / "weights.png")
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert load_records(log) == _records()


@pytest.mark.parametrize("quantity", ["gap", "ratio", "student_ce"])
def test_plot_gaps_from_records(tmp_path: Path, quantity: str) -> None:
    out = plot_gaps(_records(), tmp_path / f"{quantity}.png", quantity=quantity)
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_plotting_errors(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError,
        match=r"load_records: log_path_or_records must be an existing JSON-lines file; got '.*missing.jsonl'\.",
    ):
        plot_weights(tmp_path / "missing.jsonl", tmp_path / "x.png")
    with pytest.raises(
        ValueError, match=r"load_records: log_path_or_records must hold at least one record; got none\."
    ):
        plot_weights([], tmp_path / "x.png")
    with pytest.raises(
        ValueError,
        match=r"load_records: every record must have keys step, domain_names, weights; got a record missing \['weights'\]\.",
    ):
        plot_weights([{"step": 0, "domain_names": ["a"]}], tmp_path / "x.png")
    with pytest.raises(
        ValueError, match=r"plot_gaps: quantity must be one of \('gap', 'ratio', 'student_ce'\); got 'kl'\."
    ):
        plot_gaps(_records(), tmp_path / "x.png", quantity="kl")


def test_plot_losses_leaves_out_skipped_steps(tmp_path: Path) -> None:
    from ddk.recipes.plotting import plot_losses

    recs = [
        {"step": 2, "loss": 5.1, "ce": 5.0, "kd": 0.5},
        {"step": 4, "loss": None, "ce": None, "kd": None, "skipped": True},
        {"step": 6, "loss": 4.1, "ce": 4.0, "kd": 0.4, "student_ce": [4.0]},
    ]
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert plot_losses(log, tmp_path / "loss.png").read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(
        ValueError,
        match=r"plot_losses: metrics_path_or_records must hold a record with step, loss, ce and kd; got none\.",
    ):
        plot_losses(recs[1:2], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"plot_losses: metrics_path_or_records must be an existing JSON-lines file"):
        plot_losses(tmp_path / "missing.jsonl", tmp_path / "x.png")


def test_plot_losses_legend_covers_no_curve_and_fits_the_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ddk.recipes.plotting as plotting

    saved: list[object] = []
    real_save = plotting._save

    def keep(fig, ax, out_png):  # type: ignore[no-untyped-def]
        saved.append(fig)
        return real_save(fig, ax, out_png)

    monkeypatch.setattr(plotting, "_save", keep)
    # the KD curve ends at the top right, where the legend used to sit
    recs = [{"step": s, "loss": 5.0 - 0.02 * s, "ce": 4.9 - 0.02 * s, "kd": 0.06 + 0.004 * s} for s in range(10, 21)]
    plotting.plot_losses(recs, tmp_path / "loss.png")
    (fig,) = saved
    renderer = fig.canvas.get_renderer()
    (legend,) = [a.get_legend() for a in fig.axes if a.get_legend() is not None]
    box = legend.get_window_extent(renderer)
    assert not any(box.overlaps(a.get_window_extent(renderer)) for a in fig.axes)  # outside both axes
    assert fig.bbox.contains(box.x0, box.y0) and fig.bbox.contains(box.x1, box.y1)  # and not cut off
