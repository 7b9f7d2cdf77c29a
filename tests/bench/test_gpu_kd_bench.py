"""Pure helpers of bench/gpu/kd_bench.py (the GPU benchmark itself cannot run without CUDA).

Not in tests/bench/gpu/: tests/conftest.py skips every item whose keywords hold "gpu", and a
folder name is one of them.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "bench" / "gpu" / "kd_bench.py"
_spec = importlib.util.spec_from_file_location("kd_bench_gpu", _PATH)
assert _spec is not None and _spec.loader is not None
kd_bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = kd_bench  # dataclasses look their module up while the class is built
_spec.loader.exec_module(kd_bench)


def test_bandwidth_floor_seconds_matches_anchor():
    # N=8192, V=151936, bf16: read both logits and write the gradient, 7.5 GB, 2.5 ms at ~3 TB/s.
    assert kd_bench.bandwidth_floor_seconds(8192, 151936, 2, 1.0) == 7_467_958_272  # bytes at 1 B/s
    assert kd_bench.bandwidth_floor_seconds(8192, 151936, 2, 1.0, passes=5) == 12_446_597_120
    floor = kd_bench.bandwidth_floor_seconds(8192, 151936, 2, 3.0e12)
    assert floor == pytest.approx(7_467_958_272 / 3.0e12)
    assert 2.4e-3 < floor < 2.6e-3


def test_copy_rate_counts_read_and_write():
    assert kd_bench.copy_rate_bytes_per_s(2**30, 1e-3) == pytest.approx(2 * 2**30 / 1e-3)
    with pytest.raises(ValueError, match="seconds must be > 0"):
        kd_bench.copy_rate_bytes_per_s(1, 0.0)
    with pytest.raises(ValueError, match="rate_bytes_per_s must be > 0"):
        kd_bench.bandwidth_floor_seconds(1, 1, 2, 0.0)


def test_format_table_ratios_to_naive_and_floor():
    rows = [
        kd_bench.TimingRow("reference", 100.0, 30000.0, 5),
        kd_bench.TimingRow("chunked", None, note="unavailable: x"),
        kd_bench.TimingRow("triton", 5.0, 2600.0, 10),
    ]
    table = kd_bench.format_table(rows, floor_ms=2.5)
    lines = table.splitlines()
    assert lines[0].split()[:5] == ["backend", "fwd+bwd", "ms", "peak", "MiB"]
    triton = next(line for line in lines if line.startswith("triton")).split()
    assert triton[1:5] == ["5.00", "2600", "0.050", "2.00"]
    assert "unavailable: x" in table and lines[-1].startswith("floor")


def test_error_relative_ok_rule():
    assert kd_bench.error_relative_ok(3e-5, 1e-5, k=2, atol=2e-5)
    assert not kd_bench.error_relative_ok(5e-5, 1e-5, k=2, atol=2e-5)
    assert not kd_bench.error_relative_ok(float("nan"), 1.0, k=2, atol=1.0)


# ---- fused lm_head + KD part ------------------------------------------------------------------

import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

_TINY = (
    kd_bench.FusedCase(24, 32, 48, 300, 307, torch.bfloat16, True, "forward_kl", 0.5, 1.0),
    kd_bench.FusedCase(19, 40, 40, 257, 257, torch.float32, False, "jsd", 0.3, 2.0),
)


def test_fused_flops_and_floor_match_anchor():
    # N=8192, Hs=Ht=2048, V=151936: 2*N*V*(Ht+3*Hs) = 20.4 TFLOP, 25.5 ms at 800 TFLOP/s.
    flops = kd_bench.fused_flops(8192, 151936, 2048, 2048)
    assert flops == 2 * 8192 * 151936 * (2048 + 3 * 2048) == 20_392_504_721_408
    assert kd_bench.fused_flops(3, 5, 7, 11) == 2 * 3 * 5 * (11 + 21)
    floor = kd_bench.flop_floor_seconds(flops, 800e12)
    assert floor == pytest.approx(flops / 800e12)
    assert 25.4e-3 < floor < 25.6e-3
    with pytest.raises(ValueError, match="rate_flop_per_s must be > 0"):
        kd_bench.flop_floor_seconds(1.0, 0.0)
    with pytest.raises(ValueError, match="sizes must be >= 0"):
        kd_bench.fused_flops(-1, 1, 1, 1)


def test_matmul_rate_counts_two_flops_per_multiply_add():
    assert kd_bench.matmul_rate_flop_per_s(8192, 8192, 8192, 1.375e-3) == pytest.approx(2 * 8192**3 / 1.375e-3)
    assert 790e12 < kd_bench.matmul_rate_flop_per_s(8192, 8192, 8192, 1.375e-3) < 810e12
    with pytest.raises(ValueError, match="seconds must be > 0"):
        kd_bench.matmul_rate_flop_per_s(1, 1, 1, 0.0)


def test_projection_skip_and_reps():
    assert kd_bench.projected_step_seconds(0.5, 1024, 8192) == pytest.approx(4.0)
    assert kd_bench.projected_step_seconds(0.5, 8192, 1024) == pytest.approx(0.5)  # never scaled down
    with pytest.raises(ValueError, match="probe_n must be > 0"):
        kd_bench.projected_step_seconds(1.0, 0, 8)
    assert kd_bench.fused_skip_reason(4.0, max_step_s=25.0, remaining_s=100.0) == ""
    assert "max-step" in kd_bench.fused_skip_reason(30.0, max_step_s=25.0, remaining_s=1000.0)
    assert "left of --fused-budget-s" in kd_bench.fused_skip_reason(10.0, max_step_s=25.0, remaining_s=15.0)
    assert kd_bench.reps_within(0.1, reps=3, budget_s=10.0) == 3
    assert kd_bench.reps_within(4.0, reps=3, budget_s=10.0) == 2
    assert kd_bench.reps_within(30.0, reps=3, budget_s=10.0) == 1
    assert kd_bench.reps_within(1.0, reps=3, budget_s=-5.0) == 1


def test_liger_beta_maps_divergences():
    assert kd_bench.liger_beta("forward_kl", 0.5) == 0.0
    assert kd_bench.liger_beta("reverse_kl", 0.5) == 1.0
    assert kd_bench.liger_beta("jsd", 0.3) == 0.3
    with pytest.raises(ValueError, match="divergence must be"):
        kd_bench.liger_beta("tvd", 0.5)


def test_compare_to_oracle_rule():
    scale = {"loss": 10.0, "dh": 1.0}
    ok, detail = kd_bench.compare_to_oracle({"loss": 3e-3, "dh": 1e-5}, {"loss": 1e-3, "dh": 1e-5}, scale)
    assert ok and "FAIL" not in detail and detail.startswith("loss 3.00e-03/naive 1.00e-03")
    # 3x naive + 2e-5 * scale: dh may be 3e-5 + 2e-5 = 5e-5, not 6e-5
    ok, detail = kd_bench.compare_to_oracle({"loss": 0.0, "dh": 6e-5}, {"loss": 0.0, "dh": 1e-5}, scale)
    assert not ok and detail.endswith("dh 6.00e-05/naive 1.00e-05 FAIL")
    ok, _ = kd_bench.compare_to_oracle({"loss": 1e-4}, None, {"loss": 10.0})  # float64: atol alone
    assert ok
    ok, _ = kd_bench.compare_to_oracle({"loss": float("nan")}, {"loss": 1.0}, {"loss": 1.0})
    assert not ok


def test_format_fused_table_ratios_to_naive_and_floor():
    rows = [
        kd_bench.FusedTimingRow("naive", None, note="OOM"),
        kd_bench.FusedTimingRow("chunked", 200.0, 900.0, 3),
        kd_bench.FusedTimingRow("triton", 50.0, 1900.0, 3),
        kd_bench.FusedTimingRow("liger", None, note="not installed (x)"),
    ]
    table = kd_bench.format_fused_table(rows, floor_ms=25.0, matmul_tflops=800.0)
    lines = table.splitlines()
    assert lines[0].split()[:5] == ["variant", "fwd+bwd", "ms", "peak", "MiB"]
    triton = next(line for line in lines if line.startswith("triton")).split()
    assert triton[1:5] == ["50.00", "1900", "-", "2.00"]  # no naive time: no x naive
    assert next(line for line in lines if line.startswith("naive")).endswith("OOM")
    assert "not installed (x)" in table and lines[-1].startswith("floor") and "800 TFLOP/s" in lines[-1]
    rows[0] = kd_bench.FusedTimingRow("naive", 400.0, 30000.0, 1)
    triton = next(line for line in kd_bench.format_fused_table(rows, None).splitlines() if line.startswith("triton"))
    assert triton.split()[1:5] == ["50.00", "1900", "0.125", "-"]


def test_check_fused_on_cpu_passes_and_flags_unavailable():
    report = kd_bench.Report()
    kd_bench.check_fused(report, _TINY, ("chunked", "no_such_backend"), device="cpu")
    rows = report.fused_checks
    assert [r.backend for r in rows] == ["no_such_backend", "chunked", "chunked"]
    assert not rows[0].ok and rows[0].detail.startswith("unavailable")
    assert all(r.ok for r in rows[1:]), [r.detail for r in rows]
    assert "db" in rows[1].detail and "db" not in rows[2].detail  # bias only in the first case
    assert "/naive" in rows[1].detail


def test_check_fused_strategy_variants_on_cpu():
    """``chunked:<strategy>[@rows]`` names pick the strategy (and a workspace of that many rows)."""
    report = kd_bench.Report()
    kd_bench.check_fused(report, _TINY, ("chunked:gemm@5", "chunked:token_chunks", "chunked:recompute"), device="cpu")
    rows = report.fused_checks
    assert len(rows) == 3 * len(_TINY)
    assert all(r.ok for r in rows), [r.detail for r in rows]


def test_check_fused_catches_a_wrong_gradient(monkeypatch):
    real = kd_bench.make_fused_step

    def broken(name, opts):  # type: ignore[no-untyped-def]
        step, why = real(name, opts)
        if name != "chunked":
            return step, why

        def bad(x):  # type: ignore[no-untyped-def]
            loss, grads = step(x)
            return loss, (grads[0] * 1.01,) + grads[1:]

        return bad, why

    monkeypatch.setattr(kd_bench, "make_fused_step", broken)
    report = kd_bench.Report()
    kd_bench.check_fused(report, _TINY[1:], ("chunked",), device="cpu")
    (row,) = report.fused_checks
    assert not row.ok and "dh" in row.detail and "FAIL" in row.detail


def test_liger_step_same_loss_as_naive_and_reports_missing(monkeypatch):
    pytest.importorskip("liger_kernel")
    x = kd_bench.fused_inputs(40, 32, 48, 300, 307, torch.float32, False, 0.2, seed=0, device="cpu")
    for opts in (
        dict(gamma=0.2, temperature=1.0, divergence="forward_kl", beta=0.5),
        dict(gamma=0.3, temperature=2.0, divergence="jsd", beta=0.3),
    ):
        naive, _ = kd_bench.make_fused_step("naive", opts)
        liger, why = kd_bench.make_fused_step("liger_eager", opts)
        assert liger is not None, why
        (nl, ng), (ll, lg) = naive(x), liger(x)
        assert float(ll) == pytest.approx(float(nl), rel=1e-5)
        for a, b in zip(ng, lg):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    monkeypatch.setitem(sys.modules, "liger_kernel.chunked_loss", None)  # import now fails
    step, why = kd_bench.make_fused_step(
        "liger", {"gamma": 0.2, "temperature": 1.0, "divergence": "forward_kl", "beta": 0.5}
    )
    assert step is None and why.startswith("not installed")


class _FakeEvent:
    def __init__(self, enable_timing: bool = False) -> None:
        self.t = 0.0

    def record(self) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, other: _FakeEvent) -> float:
        return (other.t - self.t) * 1e3


@pytest.fixture
def fake_cuda(monkeypatch):  # type: ignore[no-untyped-def]
    """The torch.cuda calls of the fused part replaced by stand-ins; inputs and checks on CPU."""
    for name, value in {
        "is_available": lambda: True,
        "get_device_name": lambda *a: "fake",
        "synchronize": lambda *a: None,
        "empty_cache": lambda: None,
        "reset_peak_memory_stats": lambda *a: None,
        "memory_allocated": lambda *a: 0,
        "max_memory_allocated": lambda *a: 3 * 2**20,
        "Event": _FakeEvent,
    }.items():
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(kd_bench.dispatch, "available_backends", lambda dev: {"fake": True})
    real_inputs, real_check = kd_bench.fused_inputs, kd_bench.check_fused
    monkeypatch.setattr(kd_bench, "fused_inputs", lambda *a, **k: real_inputs(*a, **{**k, "device": "cpu"}))
    monkeypatch.setattr(kd_bench, "check_fused", lambda report: real_check(report, _TINY[:1], ("chunked",), "cpu"))
    monkeypatch.setattr(kd_bench, "measure_matmul_rate", lambda: 1e12)


_TINY_ARGS = [
    "--fused-only",
    "--fused-n",
    "64",
    "--fused-hs",
    "32",
    "--fused-ht",
    "48",
    "--fused-v",
    "300",
    "--fused-teacher-v",
    "307",
    "--fused-probe-n",
    "16",
    "--fused-reps",
    "2",
]


def test_main_fused_only_flow_on_cpu_with_fake_cuda(fake_cuda, tmp_path, capsys):
    """The whole --fused-only flow (checks, probe, timings, JSON, tables, exit code) on CPU, with
    the torch.cuda calls it makes replaced by stand-ins and tiny shapes."""
    out = tmp_path / "r.json"
    rc = kd_bench.main(_TINY_ARGS + ["--fused-variants", "naive,chunked,nope", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    data = json.loads(out.read_text())
    assert data["checks"] == [] and data["timings"] == []
    assert [c["ok"] for c in data["fused_checks"]] == [True]
    rows = {r["backend"]: r for r in data["fused_timings"]}
    assert list(rows) == ["naive", "chunked", "nope"]
    for name in ("naive", "chunked"):
        assert rows[name]["ms"] > 0 and rows[name]["reps"] == 2 and rows[name]["probe_ms"] > 0, rows[name]
        assert rows[name]["peak_mib"] == pytest.approx(3.0)
    assert rows["chunked"]["loss"] == pytest.approx(rows["naive"]["loss"], rel=1e-3)
    assert rows["nope"]["note"].startswith("unknown variant")
    assert data["fused_shape"]["flops"] == kd_bench.fused_flops(64, 300, 32, 48)
    assert data["fused_floor_ms"] == pytest.approx(kd_bench.fused_flops(64, 300, 32, 48) / 1e12 * 1e3)
    table = text[text.index("== fused lm_head + KD forward+backward") :]
    assert "chunked" in table and table.rstrip().splitlines()[-1].startswith("floor")


def test_time_fused_variant_skips_and_reports_oom(monkeypatch):
    for name, value in {
        "synchronize": lambda *a: None,
        "empty_cache": lambda: None,
        "reset_peak_memory_stats": lambda *a: None,
        "memory_allocated": lambda *a: 0,
        "max_memory_allocated": lambda *a: 5 * 2**20,
        "Event": _FakeEvent,
    }.items():
        monkeypatch.setattr(torch.cuda, name, value)
    x = kd_bench.fused_inputs(64, 8, 8, 50, 50, torch.float32, False, 0.0, seed=0, device="cpu")

    def slow(xx):  # type: ignore[no-untyped-def]
        time.sleep(0.02)
        return torch.zeros(()), ()

    row = kd_bench.time_fused_variant(
        "slow", slow, x, probe_n=8, reps=3, loop_s=10.0, max_step_s=0.05, deadline=time.perf_counter() + 100
    )
    assert row.ms is None and row.probe_ms and row.note.startswith("skipped: projected")

    def oom(xx):  # type: ignore[no-untyped-def]
        if xx["h"].shape[0] == 64:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.64 GiB")
        return torch.zeros(()), ()

    row = kd_bench.time_fused_variant(
        "naive", oom, x, probe_n=8, reps=3, loop_s=10.0, max_step_s=10.0, deadline=time.perf_counter() + 100
    )
    assert row.ms is None and row.peak_mib is None and row.note.startswith("OOM (>= 5 MiB")


def test_main_fused_budget_spent_skips_variants(fake_cuda, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = kd_bench.main(_TINY_ARGS + ["--fused-variants", "naive,chunked", "--fused-budget-s", "0", "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["fused_timings"]
    assert [r["note"] for r in rows] == ["skipped: --fused-budget-s 0 spent"] * 2
    assert all(r["ms"] is None for r in rows)
    assert "skipped: --fused-budget-s 0 spent" in capsys.readouterr().out
