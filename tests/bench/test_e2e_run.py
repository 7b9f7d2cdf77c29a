"""``bench/e2e/run.py`` on a tiny offline corpus: three starts, three variants, two seeds; the report
holds the test-split gaps with confidence intervals, the paired differences and the default rule,
and reuses finished runs."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
from recipe_cases import own_models

pytest.importorskip("transformers")

_PATH = Path(__file__).resolve().parents[2] / "bench" / "e2e" / "run.py"
_spec = importlib.util.spec_from_file_location("e2e_run", _PATH)
assert _spec is not None and _spec.loader is not None
e2e = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = e2e
_spec.loader.exec_module(e2e)


def test_bootstrap_ci_brackets_the_mean_and_matches_a_direct_resampling() -> None:
    xs = [0.3, -0.1, 0.25, 0.05, 0.4]
    lo, hi = e2e.bootstrap_ci(xs, resamples=4000, seed=3)
    assert lo < statistics.mean(xs) < hi
    rng = np.random.default_rng(3)
    means = np.array(xs)[rng.integers(0, 5, size=(4000, 5))].mean(axis=1)
    assert (lo, hi) == (np.percentile(means, 2.5), np.percentile(means, 97.5))
    assert e2e.bootstrap_ci([1.5]) == (1.5, 1.5)


@pytest.mark.slow  # 25 s: make test-all
def test_e2e_matrix_writes_the_report_and_reuses_finished_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, corpus = own_models(tmp_path)
    tiny = dict(
        data_dir=str(tmp_path / "cache"), domains=[], user_jsonl=[str(corpus)], offline=True, max_chars=20000,
        validation_fraction=0.25, test_fraction=0.25, vocab_size=320, seq_len=16, val_samples=4, eval_batch_size=4,
        teacher_hidden=32, teacher_layers=1, teacher_heads=2, teacher_intermediate=64, teacher_steps=8,
        teacher_batch_size=4, student_hidden=16, student_layers=1, student_heads=2, student_intermediate=32,
        student_pretrain_steps=6, scarce_domains=["math"], steps=4, batch_size=4, warmup_steps=2, interval=2,
        log_every=2, checkpoint_every=4, device="cpu", progress=False,
    )  # fmt: skip
    monkeypatch.setitem(e2e.STARTS, "extreme", {**e2e.STARTS["extreme"], "scarce_domains": ("math",)})
    (tmp_path / "tiny.yaml").write_text(json.dumps(tiny))  # JSON is YAML
    argv = ["--starts", "uniform", "skewed", "extreme", "--methods", "kd", "ddk", "ddk-gain"]
    argv += ["--seeds", "0", "1", "--cache-ks", "4", "--cache-seeds", "0", "1"]
    argv += ["--bootstrap", "500", "--config", str(tmp_path / "tiny.yaml"), "--runs", str(tmp_path / "runs")]
    argv += ["--report", str(tmp_path / "r" / "results.md")]
    assert e2e.main(argv) == 0
    text = (tmp_path / "r" / "results.md").read_text()
    for needle in (
        "## Which variant is the default",
        "## Start `uniform`",
        "## Start `extreme`",
        "| ddk-gain - kd | mean gap |",
        "| ddk-gain - ddk | worst gap |",
        "| (start) |",
        "teacher CE (test)",
        "Eq. 1 puts",
        "e2e_skewed_domain_gaps.png",
        "## Distilling from a teacher cache",
    ):
        assert needle in text, needle  # fmt: skip
    for png in ("e2e_uniform_weights.png", "e2e_extreme_gap_curves.png"):
        assert (tmp_path / "r" / "figures" / png).is_file()
    # every run reports its test split, and the test gaps are not the validation gaps
    run = json.loads((tmp_path / "runs" / "extreme" / "ddk-gain-s1" / "summary.json").read_text())
    assert len(run["test"]["gap"]) == 3 and run["test"]["gap"] != run["gap"]
    cfg = json.loads((tmp_path / "runs" / "extreme" / "ddk-gain-s1" / "config.json").read_text())
    assert (cfg["method"], cfg["ddk_signal"], cfg["scarce_domains"], cfg["scarce_share"]) == (
        "ddk",
        "gain",
        ["math"],
        0.02,
    )
    # the default rule is computed from the same paired differences
    rule = e2e.default_rule({"u": {"kd": [run | {"seed": 0}], "ddk": [run | {"seed": 0}]}}, 100)
    assert rule["ddk"]["u"]["mean_gap"]["mean"] == 0.0
    # finished runs are reused: nothing is distilled the second time
    monkeypatch.setattr(e2e, "distill", lambda cfg: pytest.fail(f"re-ran {cfg.run_dir}"))
    assert e2e.main(argv) == 0
