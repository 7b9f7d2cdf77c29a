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
    # ANCHORS.md: N=8192, V=151936, bf16 moves 7.5 GB, 2.5 ms at ~3 TB/s.
    floor = kd_bench.bandwidth_floor_seconds(8192, 151936, 2, 3.0e12)
    assert 3 * 8192 * 151936 * 2 == 7_467_958_272
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
