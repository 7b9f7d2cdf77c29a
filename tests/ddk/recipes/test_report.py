"""Tests of ddk/recipes/report.py: a run folder's plots (gaps from step 0, the loss curve) and
``ddk compare`` of finished runs (the table, the differences against the first, the test split, the plot)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from recipe_cases import needs_hf
from recipe_cases import run_cfg as _cfg

pytest.importorskip("matplotlib")

from ddk.recipes.report import compare_runs, compare_summaries, gap_records, read_summary

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _summary(gap: list[float], test: list[float] | None = None, **kw: Any) -> dict[str, Any]:
    s: dict[str, Any] = {
        "method": "ddk",
        "seed": 0,
        "domains": ["code", "math", "prose"],
        "teacher_ce": [2.0, 3.0, 4.0],
        "student_ce": [2.0 + g for g in gap],
        "gap": gap,
        "mean_gap": sum(gap) / len(gap),
        "worst_gap": max(gap),
        "mean_ratio": 1.1,
        "teacher_identity": {"kind": "model", "name": "t"},
        "validation_identity": {"checksum": "0123456789abcdef", "sequences": [4, 4, 4]},
    }
    if test is not None:
        s["test"] = {"gap": test, "mean_gap": sum(test) / len(test), "worst_gap": max(test)}
        s["test"].update(student_ce=[1.0, 1.0, 1.0], teacher_ce=[1.0, 1.0, 1.0])
    s.update(kw)
    return s


def _run(root: Path, name: str, summary: dict[str, Any]) -> Path:
    (root / name).mkdir(parents=True)
    (root / name / "summary.json").write_text(json.dumps(summary))
    return root / name


def test_compare_summaries_differences_against_the_first_and_the_test_split(tmp_path: Path) -> None:
    kd = _summary([0.5, 0.25, 0.125], test=[0.5, 0.5, 0.5], method="kd")
    ddk = _summary([0.25, 0.375, 0.0], test=[0.25, 0.75, 0.5])
    comp = compare_summaries({"kd": kd, "ddk": ddk}, tmp_path / "cmp.png", title="t")
    assert comp.labels == ("kd", "ddk") and comp.domains == ("code", "math", "prose")
    kd_mean_diff = ddk["mean_gap"] - kd["mean_gap"]
    assert comp.difference == {"ddk": {"gap": [-0.25, 0.125, -0.125], "mean_gap": kd_mean_diff, "worst_gap": -0.125}}
    assert comp.test_difference == {"ddk": {"gap": [-0.25, 0.25, 0.0], "mean_gap": 0.0, "worst_gap": 0.25}}
    lines = comp.text.splitlines()
    assert lines[2].split() == ["kd", "0.5000", "0.2500", "0.1250", "0.2917", "0.5000", "1.1000"]
    assert [ln.split() for ln in lines if ln.startswith("ddk - kd")] == [
        ["ddk", "-", "kd", "-0.2500", "0.1250", "-0.1250", "-0.0833", "-0.1250"],
        ["ddk", "-", "kd", "-0.2500", "0.2500", "0.0000", "0.0000", "0.2500"],  # the test split
    ]
    assert any(ln.startswith("test split") for ln in lines) and "note:" not in comp.text
    assert comp.plot == tmp_path / "cmp.png" and comp.plot.read_bytes()[:8] == PNG_MAGIC
    # one run: its table alone; no plot asked, none written
    one = compare_summaries({"kd": kd})
    assert one.difference == {} and one.plot is None and " - " not in one.text


def test_compare_summaries_notes_another_teacher_and_a_partial_test_split() -> None:
    a = _summary([0.1, 0.2, 0.3], test=[0.1, 0.1, 0.1])
    b = _summary([0.1, 0.2, 0.3], teacher_identity={"kind": "model", "name": "other"})
    comp = compare_summaries({"a": a, "b": b})
    assert comp.test_difference is None
    assert "note: ['b'] had another teacher than 'a'" in comp.text
    assert "note: only ['a'] have test gaps" in comp.text


def test_compare_summaries_shows_each_runs_student_ce_and_the_teacher_ce_per_run_or_once() -> None:
    a = _summary([0.1, 0.2, 0.3], teacher_ce=[2.0, 3.0, 4.0])
    b = _summary([0.5, 0.5, 0.5], teacher_ce=[1.0, 1.5, 2.0], student_ce=[1.5, 2.0, 2.5])
    lines = compare_summaries({"small": a, "large": b}).text.splitlines()
    assert lines[0].split()[0] == "run"  # the column lists run folders
    rows = {
        ln[:18].strip(): ln[18:].split()
        for ln in lines
        if ln[:18].strip().endswith(("small", "large")) and "CE" in ln[:18]
    }
    assert rows == {  # every run's own CE, not the first's teacher next to the last's student
        "teacher CE small": ["2.0000", "3.0000", "4.0000"],
        "teacher CE large": ["1.0000", "1.5000", "2.0000"],
        "student CE small": ["2.1000", "2.2000", "2.3000"],
        "student CE large": ["1.5000", "2.0000", "2.5000"],
    }
    assert "the same for every run" not in "\n".join(lines)
    # the same teacher CE in every run: one row, said so; still each run's student CE
    same = compare_summaries({"kd": _summary([0.1, 0.2, 0.3]), "ddk": _summary([0.0, 0.1, 0.2])}).text
    assert [ln.split()[:2] for ln in same.splitlines() if ln.startswith(("teacher CE", "student CE"))] == [
        ["teacher", "CE"],
        ["student", "CE"],
        ["student", "CE"],
    ]
    assert "(teacher CE: the same for every run.)" in same and "student CE ddk" in same
    # one run (ddk distill's table): its teacher and student CE, headed by the method
    one = compare_summaries({"kd": a}, column="method").text.splitlines()
    assert one[0].split()[0] == "method" and [ln[:18].strip() for ln in one[3:]] == ["teacher CE", "student CE"]


def test_compare_summaries_warns_of_other_validation_sets() -> None:
    v1, v2 = {"checksum": "aa", "sequences": [4, 4, 4]}, {"checksum": "bb", "sequences": [4, 4, 4]}
    a, b, c = (_summary([0.1, 0.2, 0.3], validation_identity=v) for v in (v1, v2, v1))
    text = compare_summaries({"a": a, "b": b, "c": c}).text
    assert "warning: ['b'] were measured on other validation sets than 'a'" in text
    assert "validation sets than" not in compare_summaries({"a": a, "c": c}).text
    older = {k: v for k, v in _summary([0.1, 0.2, 0.3]).items() if k != "validation_identity"}
    old = compare_summaries({"a": a, "old": older}).text
    assert "note: ['old'] have no validation_identity in summary.json" in old


def test_compare_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"compare: runs must name at least one run; got none\."):
        compare_summaries({})
    other = _summary([0.1, 0.2], domains=["code", "web"], student_ce=[1, 1], teacher_ce=[1, 1])
    with pytest.raises(
        ValueError,
        match=r"compare: every run must have the domains of the first, 'a' \(\['code', 'math', 'prose'\]\); "
        r"got \['code', 'web'\] in 'b'\.",
    ):
        compare_summaries({"a": _summary([0.1, 0.2, 0.3]), "b": other})
    with pytest.raises(ValueError, match=r"compare: each run must be a finished ddk distill run .* Finish it first"):
        read_summary(tmp_path)
    with pytest.raises(ValueError, match=r"compare: each run must be a run folder of ddk distill; got '.*nope'"):
        read_summary(tmp_path / "nope")
    bad = _run(tmp_path, "bad", {"domains": ["a"], "gap": ["x"]})
    with pytest.raises(ValueError, match=r"summary.json must be the summary.json written by ddk distill; got one with"):
        read_summary(bad)
    (tmp_path / "bad" / "summary.json").write_text("{")
    with pytest.raises(ValueError, match=r"got an unreadable file \(JSONDecodeError"):
        read_summary(bad)
    a = _run(tmp_path, "a", _summary([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match=r"compare: runs must be distinct folders"):
        compare_runs([a, a])


def test_compare_runs_names_the_runs_by_folder_and_by_path_when_names_repeat(tmp_path: Path) -> None:
    a = _run(tmp_path / "x", "run", _summary([0.1, 0.2, 0.3]))
    b = _run(tmp_path / "y", "run", _summary([0.0, 0.2, 0.3]))
    c = _run(tmp_path, "kd-s0", _summary([0.0, 0.0, 0.0]))
    assert compare_runs([a, c], None).labels == ("run", "kd-s0")
    assert compare_runs([a, b], None).labels == (str(a), str(b))


@needs_hf
def test_run_plots_gaps_from_step_0_and_the_loss_curve_and_ddk_compare(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from hf_models import write_jsonl

    from ddk.recipes.cli import main
    from ddk.recipes.distill import distill

    test_file = write_jsonl(tmp_path / "test.jsonl", docs_per_domain=8, seed=123)
    runs = {m: _cfg(tmp_path, m, method=m, test_data=(str(test_file),)) for m in ("kd", "ddk")}
    summaries = {m: distill(cfg) for m, cfg in runs.items()}
    out = Path(runs["ddk"].out)
    assert {Path(p).name for p in summaries["ddk"]["plots"]} == {"weights.png", "gaps.png", "loss.png"}
    for name in ("weights.png", "gaps.png", "loss.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    recs = gap_records(out)
    init = json.loads((out / "controller.jsonl").read_text().splitlines()[0])
    assert [r["step"] for r in recs] == [0, 3, 6]  # the gap at the start, then every interval
    assert recs[0]["student_ce"] == init["student_ce"] and recs[0]["teacher_ce"] == init["teacher_ce"]
    assert recs[-1]["student_ce"] == summaries["ddk"]["student_ce"]
    capsys.readouterr()

    png = tmp_path / "cmp" / "kd-vs-ddk.png"
    assert main(["compare", str(runs["kd"].out), str(runs["ddk"].out), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    comp = compare_summaries(summaries)
    assert comp.text in printed and f"plot: {png}" in printed and png.read_bytes()[:8] == PNG_MAGIC
    assert "ddk - kd" in printed and "test split" in printed
    # the same records and options: the same validation sets, and the same teacher CE once
    assert summaries["kd"]["validation_identity"] == summaries["ddk"]["validation_identity"]
    assert "warning" not in printed and "(teacher CE: the same for every run.)" in printed
    kd, ddk = summaries["kd"], summaries["ddk"]
    assert comp.difference["ddk"]["gap"] == [a - b for a, b in zip(ddk["gap"], kd["gap"])]
    assert comp.test_difference is not None
    assert comp.test_difference["ddk"]["mean_gap"] == ddk["test"]["mean_gap"] - kd["test"]["mean_gap"]
    # a run still going (no summary.json) is named, with what to do
    (out / "summary.json").unlink()
    assert main(["compare", str(runs["kd"].out), str(out), "--no-plot"]) == 2
    assert "ddk compare: error: compare: each run must be a finished ddk distill run" in capsys.readouterr().err
