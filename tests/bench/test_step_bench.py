"""``bench/gpu/step_bench.py`` on the CPU with the tiny preset: every variant runs, the variants'
first-step losses agree (they are the same loss), and the check can fail."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

_PATH = Path(__file__).resolve().parents[2] / "bench" / "gpu" / "step_bench.py"
_spec = importlib.util.spec_from_file_location("step_bench", _PATH)
assert _spec is not None and _spec.loader is not None
step_bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = step_bench
_spec.loader.exec_module(step_bench)

ARGS = ["--preset", "tiny", "--device", "cpu", "--seq", "16", "--batch", "2", "--steps", "2", "--interval", "1"]


def test_step_bench_tiny_runs_every_variant_and_the_losses_agree(tmp_path: Path) -> None:
    out = tmp_path / "step.json"
    assert step_bench.main([*ARGS, "--out", str(out)]) == 0
    import json

    res = json.loads(out.read_text())
    for name in ("models", "logits", "kd", "ddk"):
        assert res[name]["median_s"] > 0 and res[name]["tokens_per_s"] > 0 and res[name]["peak_mib"] > 0
    assert res["first_loss_rel_spread"] <= 1e-4
    assert res["ddk"]["estimate_s"] > 0 and res["kd"]["estimate_s"] == 0  # the estimator runs in ddk only
    assert "ddk_overhead" in res and "ddk_overhead_k1000" in res
    assert "| ddk | 2 |" in step_bench.format_table(res)


def test_step_bench_loss_check_sees_a_different_loss() -> None:
    bench = step_bench.Bench(step_bench.parse(ARGS))
    kd_step, _ = step_bench.make_variant(bench, "kd", 2)
    kd = kd_step(1)
    bench.args.gamma = 20.0  # another loss: the comparison of first losses must see it
    logits_step, _ = step_bench.make_variant(bench, "logits", 2)
    assert abs(logits_step(1) - kd) / kd > 1e-3
