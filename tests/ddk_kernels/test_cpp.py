"""The compiled backend (ops ddk::kd_fwd / ddk::kd_bwd, CPU kernels) against the float64 oracle.

Skips when ddk_kernels._C is not built, except under CI=true where a missing extension fails.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from ddk_kernels import chunked, cpp
from ddk_kernels.types import KDConfig
from kd_cases import DIVERGENCE_CASES, oracle_grad, realistic_logits
from test_chunked import DTYPES, _upstream, check_backend

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
@pytest.mark.parametrize(
    ("case", "temperature", "dtype"), list(itertools.product(DIVERGENCE_CASES, (0.5, 1.0, 2.0), DTYPES))
)
def test_cpp_matches_oracle(case, temperature, dtype) -> None:  # type: ignore[no-untyped-def]
    divergence, beta = case
    cfg = KDConfig(temperature=temperature, divergence=divergence, beta=beta)
    std = 10.0 if dtype == torch.float16 else 15.0
    # V > the kernel's 2048-element block, so the online rescaling across blocks is exercised
    zs, zt, labels = realistic_logits(19, 4099, dtype=dtype, teacher_extra_cols=9, std=std)
    check_backend(cpp.row_losses, zs, zt, labels, cfg)


@needs_ext
@pytest.mark.parametrize(("n", "v"), [(5, 1), (6, 7), (1, 1271), (3, 32000)])
@pytest.mark.parametrize("case", DIVERGENCE_CASES)
def test_cpp_odd_shapes(n, v, case) -> None:  # type: ignore[no-untyped-def]
    cfg = KDConfig(temperature=2.0, divergence=case[0], beta=case[1])
    zs, zt, labels = realistic_logits(n, v, seed=3, teacher_extra_cols=3, masked_fraction=0.0)
    check_backend(cpp.row_losses, zs, zt, labels, cfg)


@needs_ext
def test_cpp_max_in_late_block() -> None:
    """The row max sits in the last vocabulary block: running sums must be rescaled exactly."""
    cfg = KDConfig(divergence="forward_kl")
    zs, zt, labels = realistic_logits(4, 6000, seed=9, masked_fraction=0.0)
    zs[:, -3] += 300.0
    zt[:, -2] += 250.0
    check_backend(cpp.row_losses, zs, zt, labels, cfg)
    check_backend(cpp.row_losses, zs, zt, labels, KDConfig(divergence="reverse_kl", temperature=0.5))


@needs_ext
@pytest.mark.parametrize("case", DIVERGENCE_CASES)
def test_cpp_agrees_with_chunked(case) -> None:  # type: ignore[no-untyped-def]
    cfg = KDConfig(temperature=0.5, divergence=case[0], beta=case[1])
    zs, zt, labels = realistic_logits(16, 2500, seed=4)
    ce1, kd1, st1 = cpp.kd_forward(zs, zt[:, :2500], labels, cfg)
    ce2, kd2, st2 = chunked.kd_chunked_forward(zs, zt[:, :2500], labels, cfg)
    valid = labels != cfg.ignore_index
    assert torch.allclose(ce1, ce2, rtol=1e-5, atol=1e-4) and torch.allclose(kd1, kd2, rtol=1e-5, atol=1e-4)
    assert torch.allclose(st1[valid], st2[valid], rtol=1e-5, atol=1e-4)
    assert float(st1[~valid].abs().sum()) == 0.0


@needs_ext
def test_cpp_fully_masked_rows_give_zeros() -> None:
    cfg = KDConfig(divergence="jsd", beta=0.3, ignore_index=-1)
    zs, zt, labels = realistic_logits(7, 301, ignore_index=-1, masked_fraction=1.0)
    z = zs.clone().requires_grad_(True)
    ce, kd = cpp.row_losses(z, zt[:, :301], labels, cfg)
    (ce.sum() * 3 + kd.sum()).backward()
    assert float(ce.detach().abs().sum()) == 0.0 and float(kd.detach().abs().sum()) == 0.0
    assert float(z.grad.abs().sum()) == 0.0


@needs_ext
@pytest.mark.parametrize("case", DIVERGENCE_CASES)
def test_cpp_non_default_ignore_index(case) -> None:  # type: ignore[no-untyped-def]
    cfg = KDConfig(temperature=1.0, divergence=case[0], beta=case[1], ignore_index=3)
    zs, zt, labels = realistic_logits(12, 97, seed=7, ignore_index=3, masked_fraction=0.4)
    check_backend(cpp.row_losses, zs, zt, labels, cfg)


@needs_ext
def test_cpp_teacher_column_slice_is_not_copied() -> None:
    """A column slice of a wider teacher runs in place (row stride > V) and matches a copy."""
    zs, zt, labels = realistic_logits(6, 500, seed=8, teacher_extra_cols=37)
    view = zt[:, :500]
    assert view.stride(0) == 537 and not view.is_contiguous()
    a = cpp.kd_forward(zs, view, labels, KDConfig())
    b = cpp.kd_forward(zs, view.contiguous(), labels, KDConfig())
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@needs_ext
@pytest.mark.parametrize("case", DIVERGENCE_CASES)
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_cpp_gradcheck_float64(case, temperature) -> None:  # type: ignore[no-untyped-def]
    cfg = KDConfig(temperature=temperature, divergence=case[0], beta=case[1])
    zs, zt, labels = realistic_logits(4, 6, seed=11, std=2.0, dtype=torch.float64, masked_fraction=0.3)
    z = zs.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: cpp.KDLossCppFunction.apply(x, zt[:, :6], labels, cfg), (z,), eps=1e-6, atol=1e-7
    )


@needs_ext
@pytest.mark.parametrize(("code", "beta", "temperature"), [(0, 0.5, 1.0), (1, 0.5, 2.0), (2, 0.3, 0.5)])
def test_cpp_opcheck(code, beta, temperature) -> None:  # type: ignore[no-untyped-def]
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
    with pytest.raises(RuntimeError, match="divergence must be 0"):
        torch.ops.ddk.kd_fwd(zs, zt[:, :10], labels, 1.0, 5, 0.5, -100)
    with pytest.raises(RuntimeError, match="JSD needs 0 < beta < 1"):
        torch.ops.ddk.kd_fwd(zs, zt[:, :10], labels, 1.0, 2, 1.0, -100)
    with pytest.raises(RuntimeError, match="teacher must have the student's shape"):
        torch.ops.ddk.kd_fwd(zs, zt[:, :9], labels, 1.0, 0, 0.5, -100)
    bad = labels.clone()
    bad[1] = 10
    with pytest.raises(RuntimeError, match="is outside"):
        torch.ops.ddk.kd_fwd(zs, zt[:, :10], bad, 1.0, 0, 0.5, -100)


@needs_ext
def test_cpp_zero_upstream_gradient_rows() -> None:
    """Rows with g_ce = g_kd = 0 are skipped (zero gradient), others unaffected."""
    cfg = KDConfig(divergence="reverse_kl")
    zs, zt, labels = realistic_logits(6, 40, seed=14, dtype=torch.float64, masked_fraction=0.0)
    gce, gkd = _upstream(6)
    gce[2] = 0.0
    gkd[2] = 0.0
    _, _, stats = cpp.kd_forward(zs, zt[:, :40], labels, cfg)
    g = cpp.kd_backward(zs, zt[:, :40], labels, stats, gce, gkd, cfg)
    og = oracle_grad(zs, zt, labels, gce, gkd, cfg)
    assert float((g - og).abs().max()) < 1e-12
