"""The tiling plan of the fused path (``ddk_kernels/fused_plan.py``)."""

from __future__ import annotations

import pytest

from ddk_kernels import fused_plan
from ddk_kernels.fused_plan import FusedOptions, FusedPlan, plan_fused


def test_plan_fused_heuristic() -> None:
    # large budget: the whole (chunk, V) slice fits -> token_chunks, logits computed once
    p = plan_fused(4096, 32000, strategy="auto", workspace_bytes=256 << 20)
    assert p.strategy == "token_chunks" and p.vocab_tile == 32000 and 32 <= p.token_chunk < 4096
    assert p.token_chunk * 32000 * 4 * 8 <= 256 << 20
    # small budget, large vocabulary -> recompute with tiles
    p = plan_fused(4096, 128256, strategy="auto", workspace_bytes=32 << 20)
    assert p.strategy == "recompute" and p.vocab_tile == 2048
    assert p.token_chunk * p.vocab_tile * 4 * 8 <= 32 << 20
    # few tokens: token_chunks holds them all
    assert plan_fused(50, 128256, workspace_bytes=256 << 20) == FusedPlan("token_chunks", 50, 128256)
    # explicit strategies are honoured
    assert plan_fused(4096, 32000, strategy="recompute", workspace_bytes=256 << 20).strategy == "recompute"
    assert plan_fused(4096, 32000, strategy="token_chunks", workspace_bytes=1).token_chunk == 1
    with pytest.raises(ValueError, match="strategy must be one of"):
        plan_fused(4, 4, strategy="fast")


def test_plan_fused_gemm_rows_and_auto_on_cuda() -> None:
    p = plan_fused(10000, 1000, strategy="gemm", workspace_bytes=3 * 1000 * 2 * 200, input_bytes=2)
    assert p == FusedPlan("gemm", 192, 1000)  # 200 rows fit, aligned down to a multiple of 64
    assert plan_fused(10, 1000, strategy="gemm", workspace_bytes=1).token_chunk == 1
    assert plan_fused(100, 1000, device="cuda", gemm_ok=True, workspace_bytes=1 << 30).strategy == "gemm"
    assert plan_fused(100, 1000, device="cuda", gemm_ok=False, workspace_bytes=1 << 30).strategy == "token_chunks"
    assert plan_fused(100, 1000, device="cpu", gemm_ok=True, workspace_bytes=1 << 30).strategy == "token_chunks"


def test_plan_fused_tiny_budget_narrows_tiles() -> None:
    p = plan_fused(4096, 32000, strategy="recompute", workspace_bytes=8 * 4 * 16 * 32)
    assert p.strategy == "recompute" and p.vocab_tile == 32 and p.token_chunk == 16


def test_workspace_bytes_clamped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused_plan, "available_memory_bytes", lambda device: 1 << 40)
    assert fused_plan.default_workspace_bytes("cpu") == 256 << 20
    assert fused_plan.gemm_workspace_bytes("cpu") == 1 << 30
    monkeypatch.setattr(fused_plan, "available_memory_bytes", lambda device: 1 << 20)
    assert fused_plan.default_workspace_bytes("cpu") == 32 << 20
    assert fused_plan.gemm_workspace_bytes("cpu") == 64 << 20
    monkeypatch.setattr(fused_plan, "available_memory_bytes", lambda device: None)
    assert fused_plan.default_workspace_bytes("cpu") == 256 << 20
    monkeypatch.setattr(fused_plan, "default_workspace_bytes", lambda device: 1 << 20)
    assert plan_fused(4096, 32000).strategy == "recompute"  # plan_fused reads the budget through the module


def test_available_memory_bytes_on_cpu_and_unknown_devices() -> None:
    avail = fused_plan.available_memory_bytes("cpu")
    assert avail is None or avail > 0
    assert fused_plan.available_memory_bytes("meta") is None


def test_fused_options_defaults() -> None:
    o = FusedOptions()
    assert o.strategy == "auto" and o.workspace_bytes is None and o.plan is None and o.tile_observer is None
