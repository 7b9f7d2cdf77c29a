"""The one place that chooses a backend (``ddk_kernels/dispatch.py``): the table, the auto order,
the ``DDK_BACKEND`` rule and the error path, for both ops."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch

from ddk_kernels import dispatch
from ddk_kernels.types import KDConfig, RowKernels


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DDK_BACKEND", raising=False)


def test_dispatch_table_entries_load_and_probe() -> None:
    """Every entry names a probe with ``is_available`` and an implementation of the op's kind;
    every backend is in the CUDA auto order, and all but Triton (its CPU interpreter is for tests)
    in the CPU one."""
    for op, entries in dispatch.TABLE.items():
        assert op in dispatch.OPS
        for name, entry in entries.items():
            probe = importlib.import_module(entry.probe)
            ok, reason = probe.is_available("cpu")
            assert isinstance(ok, bool) and isinstance(reason, str) and (ok or reason), (op, name)
            if ok:
                impl = entry.load()
                assert isinstance(impl, RowKernels) if op == "kd_rows" else callable(impl), (op, name)
            assert name in dispatch.AUTO_ORDER["cuda"] and (name in dispatch.AUTO_ORDER["cpu"]) == (name != "triton")
    assert set(dispatch.BACKENDS) == {"reference", "chunked", "cpp", "triton"}
    assert "triton" not in dispatch.TABLE["fused_linear_kd"]


def test_dispatch_row_kernels_have_explicit_backend_named_functions() -> None:
    """Each backend's autograd Function is a ``class KDLoss<Backend>Function`` of its own module."""
    names = {}
    for name in ("chunked", "cpp", "triton"):
        if dispatch.available_backends("cpu")[name]:
            continue
        rows = dispatch.resolve("kd_rows", name, "cpu")
        module = inspect.getmodule(rows.row_losses)
        functions = [
            c
            for _, c in inspect.getmembers(module, inspect.isclass)
            if issubclass(c, torch.autograd.Function) and c.__module__ == module.__name__
        ]
        assert [c.__name__ for c in functions] == [f"KDLoss{name.capitalize()}Function"], name
        names[name] = functions[0]
    assert "chunked" in names


@pytest.mark.parametrize(
    ("device", "op", "want"), [("cpu", "fused_linear_kd", "chunked"), ("meta", "kd_rows", "chunked")]
)
def test_dispatch_auto_follows_the_device_order(device: str, op: dispatch.Op, want: str) -> None:
    assert dispatch.resolve_backend("auto", device, op) == want


def test_dispatch_auto_on_cpu_is_the_first_runnable_of_the_order() -> None:
    reasons = dispatch.available_backends("cpu")
    want = next(n for n in dispatch.AUTO_ORDER["cpu"] if n in reasons and not reasons[n])
    assert dispatch.resolve_backend("auto", "cpu") == want


def test_dispatch_fused_gemm_gets_the_row_kernels_kd_loss_gets(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused gemm strategy takes its row kernels from ``resolve("kd_rows", "auto", device)``."""
    from ddk_kernels import fused_gemm

    seen: list[tuple[str, str]] = []
    real = dispatch.resolve

    def spy(op, backend, device):  # type: ignore[no-untyped-def]
        seen.append((op, backend))
        return real(op, backend, device)

    monkeypatch.setattr(fused_gemm.dispatch, "resolve", spy)
    monkeypatch.setenv("DDK_BACKEND", "reference")
    from ddk_kernels.fused_chunked import fused_linear_kd
    from ddk_kernels.fused_plan import FusedOptions, FusedPlan
    from ddk_kernels.types import KDLossParams, TeacherInputs

    h, w = torch.randn(5, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, -100])
    teacher = TeacherInputs(logits=torch.randn(5, 7, dtype=torch.float64))
    gemm, _, _ = fused_linear_kd(
        h, w, labels, teacher, KDLossParams(), options=FusedOptions(plan=FusedPlan("gemm", 2, 7))
    )
    monkeypatch.delenv("DDK_BACKEND")
    tc, _, _ = fused_linear_kd(
        h, w, labels, teacher, KDLossParams(), options=FusedOptions(plan=FusedPlan("gemm", 2, 7))
    )
    assert seen == [("kd_rows", "auto"), ("kd_rows", "auto")]
    torch.testing.assert_close(gemm, tc, rtol=1e-10, atol=1e-12)  # the oracle's launchers, then cpp/chunked


def test_dispatch_ddk_backend_steers_auto_for_the_ops_that_have_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DDK_BACKEND", "reference")
    assert dispatch.resolve_backend("auto", "cpu") == "reference"
    assert dispatch.resolve_backend("auto", "cpu", "fused_linear_kd") == "reference"
    assert dispatch.resolve_backend("chunked", "cpu") == "chunked"  # an explicit backend wins
    monkeypatch.setenv("DDK_BACKEND", "cpp")  # no fused cpp implementation: that op keeps its order
    assert dispatch.resolve_backend("auto", "cpu", "fused_linear_kd") == "chunked"
    monkeypatch.setenv("DDK_BACKEND", "auto")
    assert dispatch.resolve_backend("auto", "cpu", "fused_linear_kd") == "chunked"
    monkeypatch.setenv("DDK_BACKEND", "nope")
    with pytest.raises(
        ValueError,
        match=r"^kd_loss: backend must be one of \('auto', 'reference', 'chunked', 'cpp', 'triton'\); got 'nope' \(from DDK_BACKEND\)\.$",
    ):
        dispatch.resolve_backend("auto", "cpu")


def test_dispatch_ddk_backend_that_cannot_run_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DDK_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(
        RuntimeError, match=r"^kd_loss: backend 'triton' cannot run on cpu: on CPU only under TRITON_INTERPRET=1"
    ):
        dispatch.resolve("kd_rows", "auto", "cpu")


def test_dispatch_error_messages() -> None:
    with pytest.raises(
        ValueError,
        match=r"^fused_linear_kd_loss: backend must be one of \('auto', 'reference', 'chunked'\); got 'triton' \(a backend of kd_loss only\)\.$",
    ):
        dispatch.resolve("fused_linear_kd", "triton", "cpu")
    with pytest.raises(
        ValueError,
        match=r"^fused_linear_kd_loss: backend must be one of \('auto', 'reference', 'chunked'\); got 'cpp' \(a backend of kd_loss only\)\.$",
    ):
        dispatch.resolve_backend("cpp", "cpu", "fused_linear_kd")
    with pytest.raises(
        ValueError,
        match=r"^kd_loss: backend must be one of \('auto', 'reference', 'chunked', 'cpp', 'triton'\); got 'cuda'\.$",
    ):
        dispatch.resolve("kd_rows", "cuda", "cpu")
    with pytest.raises(
        RuntimeError,
        match=r"^kd_loss: backend 'cpp' cannot run on meta: .*Available there: \['reference', 'chunked'\]; use backend='auto' to pick the fastest\.$",
    ):
        dispatch.resolve("kd_rows", "cpp", "meta")


def test_dispatch_resolve_returns_working_implementations() -> None:
    rows = dispatch.resolve("kd_rows", "reference", "cpu")
    ce, kd = rows.row_losses(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1]), KDConfig())
    assert torch.allclose(ce, torch.full((2,), 1.0986), atol=1e-4) and float(kd.abs().max()) == 0.0
    from ddk_kernels.reference import fused_linear_kd_reference

    assert dispatch.resolve("fused_linear_kd", "reference", "cpu") is fused_linear_kd_reference


def test_dispatch_backend_report_prints_the_table() -> None:
    text = dispatch.backend_report("cpu")
    lines = text.splitlines()
    assert lines[0] == f"kd_rows (kd_loss) on cpu: auto -> {dispatch.resolve_backend('auto', 'cpu')}"
    assert "fused_linear_kd (fused_linear_kd_loss) on cpu: auto -> chunked" in lines
    assert sum(line.startswith("  ") for line in lines) == sum(len(e) for e in dispatch.TABLE.values())
    assert "  reference  available" in lines
