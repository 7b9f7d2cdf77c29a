"""What is specific to the compiled backend (ops ddk::kd_fwd / ddk::kd_bwd, CPU kernels): the ops'
schema, checks (csrc/kd_checks.h), fake kernels and statistics. Its oracle suite is
tests/ddk_kernels/test_kd_rows.py.

Skips when ddk_kernels._C is not built, except under CI=true where a missing extension fails.
"""

from __future__ import annotations

import os

import pytest
import torch
from kd_cases import DIVERGENCE_CASES, realistic_logits

from ddk_kernels import chunked, cpp
from ddk_kernels.types import KDConfig

_OK, _REASON = cpp.is_available("cpu")
needs_ext = pytest.mark.skipif(not _OK, reason=_REASON)


def test_cpp_extension_built_in_ci() -> None:
    """In CI (CI=true) the extension must have been built by `make setup`."""
    if os.environ.get("CI", "").lower() != "true":
        pytest.skip("only enforced with CI=true")
    assert _OK, _REASON


def test_cpp_is_available_reports_reason() -> None:
    ok, reason = cpp.is_available("cpu")
    assert ok == bool(_OK) and (ok or reason)
    ok_meta, reason_meta = cpp.is_available("meta")
    assert not ok_meta and reason_meta


@needs_ext
@pytest.mark.parametrize("case", DIVERGENCE_CASES)
def test_cpp_stats_agree_with_chunked(case: tuple[str, float]) -> None:
    """Both keep ``[lse(zS/T), lse(zT/T), lse(zS), extra]``; the op zeroes ignored rows' statistics."""
    cfg = KDConfig(temperature=0.5, divergence=case[0], beta=case[1])
    zs, zt, labels = realistic_logits(16, 2500, seed=4)
    ce1, kd1, st1 = cpp.kd_forward(zs, zt[:, :2500], labels, cfg)
    ce2, kd2, st2 = chunked.kd_chunked_forward(zs, zt[:, :2500], labels, cfg)
    valid = labels != cfg.ignore_index
    assert torch.allclose(ce1, ce2, rtol=1e-5, atol=1e-4) and torch.allclose(kd1, kd2, rtol=1e-5, atol=1e-4)
    assert torch.allclose(st1[valid], st2[valid], rtol=1e-5, atol=1e-4)
    assert float(st1[~valid].abs().sum()) == 0.0


@needs_ext
@pytest.mark.parametrize(("code", "beta", "temperature"), [(0, 0.5, 1.0), (1, 0.5, 2.0), (2, 0.3, 0.5)])
def test_cpp_opcheck(code: int, beta: float, temperature: float) -> None:
    zs, zt, labels = realistic_logits(5, 37, seed=12, teacher_extra_cols=4)
    zt = zt[:, :37]
    ce, kd, stats = torch.ops.ddk.kd_fwd(zs, zt, labels, temperature, code, beta, -100)
    torch.library.opcheck(torch.ops.ddk.kd_fwd.default, (zs, zt, labels, temperature, code, beta, -100))
    gce, gkd = torch.rand(5), torch.rand(5)
    torch.library.opcheck(
        torch.ops.ddk.kd_bwd.default, (zs, zt, labels, stats, gce, gkd, temperature, code, beta, -100)
    )


@needs_ext
def test_cpp_torch_compile_traces_the_ops() -> None:
    """The fake kernels let torch.compile (no C++ codegen: aot_eager) trace through the backend."""
    cfg = KDConfig(divergence="jsd", beta=0.25)
    zs, zt, labels = realistic_logits(6, 50, seed=13)

    def loss(z):  # type: ignore[no-untyped-def]
        ce, kd = cpp.row_losses(z, zt[:, :50], labels, cfg)
        return ce.sum() + 0.2 * kd.sum()

    z1 = zs.clone().requires_grad_(True)
    z2 = zs.clone().requires_grad_(True)
    loss(z1).backward()
    torch.compile(loss, backend="aot_eager", fullgraph=True)(z2).backward()
    assert torch.allclose(z1.grad, z2.grad)


@needs_ext
def test_cpp_op_rejects_bad_inputs() -> None:
    zs, zt, labels = realistic_logits(3, 10, masked_fraction=0.0)
    zt = zt[:, :10]
    with pytest.raises(
        RuntimeError, match=r"divergence must be 0 \(forward KL\), 1 \(reverse KL\) or 2 \(JSD\); got 5"
    ):
        torch.ops.ddk.kd_fwd(zs, zt, labels, 1.0, 5, 0.5, -100)
    with pytest.raises(RuntimeError, match=r"beta must be in \[0, 1\]; got 1.5"):
        torch.ops.ddk.kd_fwd(zs, zt, labels, 1.0, 2, 1.5, -100)
    with pytest.raises(RuntimeError, match="temperature must be a finite number > 0; got 0"):
        torch.ops.ddk.kd_fwd(zs, zt, labels, 0.0, 0, 0.5, -100)
    with pytest.raises(RuntimeError, match=r"teacher must be \(N, Vt\) with Vt >= V = 10"):
        torch.ops.ddk.kd_fwd(zs, zt[:, :9], labels, 1.0, 0, 0.5, -100)
    with pytest.raises(RuntimeError, match="labels must be int64 or int32; got Float"):
        torch.ops.ddk.kd_fwd(zs, zt, labels.float(), 1.0, 0, 0.5, -100)
    with pytest.raises(RuntimeError, match=r"stats must be \(N, 4\)"):
        torch.ops.ddk.kd_bwd(zs, zt, labels, torch.zeros(3, 3), torch.ones(3), torch.ones(3), 1.0, 0, 0.5, -100)
    bad = labels.clone()
    bad[1] = 10
    with pytest.raises(RuntimeError, match="is outside"):
        torch.ops.ddk.kd_fwd(zs, zt, bad, 1.0, 0, 0.5, -100)


@needs_ext
def test_cpp_op_accepts_what_the_python_boundary_accepts() -> None:
    """The same rules as ``ddk.kd_loss`` (and the CUDA binding): a wider teacher of another dtype,
    int32 labels, and JSD with beta 0 / 1 (run as forward / reverse KL exactly)."""
    zs, zt, labels = realistic_logits(4, 30, seed=15, teacher_extra_cols=6, masked_fraction=0.0)
    want = torch.ops.ddk.kd_fwd(zs, zt[:, :30].contiguous(), labels, 2.0, 0, 0.5, -100)
    got = torch.ops.ddk.kd_fwd(zs, zt.double(), labels.int(), 2.0, 0, 0.5, -100)  # Vt = 36 > V, float64
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for beta, code in ((0.0, 0), (1.0, 1)):
        jsd = torch.ops.ddk.kd_fwd(zs, zt, labels, 2.0, 2, beta, -100)
        kl = torch.ops.ddk.kd_fwd(zs, zt, labels, 2.0, code, beta, -100)
        for a, b in zip(jsd, kl):
            assert torch.equal(a, b)
