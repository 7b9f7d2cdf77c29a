"""The op ``kd_rows`` on every backend that runs here, against the float64 oracle.

One suite, parametrized by ``impl`` over the runnable entries of ``dispatch.TABLE["kd_rows"]``
(reference, chunked, cpp where the extension is built, Triton under its interpreter on CPU or
compiled on a GPU); what is specific to one backend (tile options, the compiled op's schema,
Triton's kernels) is in that backend's test module. Rule: tests/kd_cases.py.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from kd_cases import (
    DEVICE,
    DIVERGENCE_CASES,
    DTYPES,
    check_row_losses,
    oracle_grad,
    realistic_logits,
    runnable_backends,
    upstream,
)

from ddk_kernels import dispatch
from ddk_kernels.types import KDConfig, RowKernels

IMPLS = runnable_backends("kd_rows")

# The interpreter warns about the inf/nan produced (and discarded by tl.where) on masked columns.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def kernels(impl: str) -> RowKernels:
    return dispatch.resolve("kd_rows", impl, DEVICE)


def test_kd_rows_every_cpu_backend_runs_here() -> None:
    """reference and chunked run everywhere; a missing backend here must have a reason."""
    reasons = dispatch.available_backends(DEVICE)
    assert {"reference", "chunked"} <= set(IMPLS)
    assert all(reasons[name] for name in dispatch.TABLE["kd_rows"] if name not in IMPLS)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    ("case", "temperature", "dtype"), list(itertools.product(DIVERGENCE_CASES, (0.5, 1.0, 2.0), DTYPES))
)
def test_kd_rows_matches_oracle(impl: str, case: tuple[str, float], temperature: float, dtype: torch.dtype) -> None:
    cfg = KDConfig(temperature=temperature, divergence=case[0], beta=case[1])
    std = 10.0 if dtype == torch.float16 else 15.0
    # V > the cpp kernel's 2048-element block and Triton's 4096-wide tile is a power of two above
    # it, so the online rescaling across blocks runs; the teacher is 9 columns wider (a view).
    zs, zt, labels = realistic_logits(11, 4099, dtype=dtype, teacher_extra_cols=9, std=std)
    check_row_losses(kernels(impl).row_losses, zs, zt, labels, cfg)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("n", "v"), [(5, 1), (6, 7), (1, 1271), (3, 32000)])
@pytest.mark.parametrize("case", DIVERGENCE_CASES)
def test_kd_rows_odd_shapes(impl: str, n: int, v: int, case: tuple[str, float]) -> None:
    cfg = KDConfig(temperature=2.0, divergence=case[0], beta=case[1])
    zs, zt, labels = realistic_logits(n, v, seed=3, teacher_extra_cols=3, masked_fraction=0.0)
    check_row_losses(kernels(impl).row_losses, zs, zt, labels, cfg)


@pytest.mark.parametrize("impl", IMPLS)
def test_kd_rows_max_in_late_block(impl: str) -> None:
    """The row max sits in the last vocabulary block: running sums must be rescaled exactly."""
    zs, zt, labels = realistic_logits(4, 6000, seed=9, masked_fraction=0.0)
    zs[:, -3] += 300.0
    zt[:, -2] += 250.0
    check_row_losses(kernels(impl).row_losses, zs, zt, labels, KDConfig(divergence="forward_kl"))
    check_row_losses(kernels(impl).row_losses, zs, zt, labels, KDConfig(divergence="reverse_kl", temperature=0.5))


@pytest.mark.parametrize("impl", IMPLS)
def test_kd_rows_fully_masked_rows_give_zeros(impl: str) -> None:
    cfg = KDConfig(divergence="jsd", beta=0.3, ignore_index=-1)
    zs, zt, labels = realistic_logits(7, 301, ignore_index=-1, masked_fraction=1.0)
    assert bool((labels == -1).all())
    z = zs.to(DEVICE).clone().requires_grad_(True)
    ce, kd = kernels(impl).row_losses(z, zt.to(DEVICE)[:, :301], labels.to(DEVICE), cfg)
    (ce.sum() * 3 + kd.sum()).backward()
    assert float(ce.detach().abs().sum()) == 0.0 and float(kd.detach().abs().sum()) == 0.0
    assert bool(torch.isfinite(z.grad).all()) and float(z.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", DIVERGENCE_CASES)
def test_kd_rows_non_default_ignore_index(impl: str, case: tuple[str, float]) -> None:
    cfg = KDConfig(temperature=1.0, divergence=case[0], beta=case[1], ignore_index=3)
    zs, zt, labels = realistic_logits(12, 97, seed=7, ignore_index=3, masked_fraction=0.4)
    check_row_losses(kernels(impl).row_losses, zs, zt, labels, cfg)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", DIVERGENCE_CASES)
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_kd_rows_gradcheck_float64(impl: str, case: tuple[str, float], temperature: float) -> None:
    cfg = KDConfig(temperature=temperature, divergence=case[0], beta=case[1])
    zs, zt, labels = realistic_logits(4, 6, seed=11, std=2.0, dtype=torch.float64, masked_fraction=0.3)
    z = zs.to(DEVICE).clone().requires_grad_(True)
    zt, labels = zt.to(DEVICE), labels.to(DEVICE)
    w = torch.tensor([0.7, -1.3, 0.4, 2.0], dtype=torch.float64, device=DEVICE)

    def fn(x: torch.Tensor) -> torch.Tensor:
        ce, kd = kernels(impl).row_losses(x, zt, labels, cfg)
        return ce * w + kd * (1.0 - w)

    assert torch.autograd.gradcheck(fn, (z,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_kd_rows_one_output_unused(impl: str) -> None:
    """Backward with only the divergence used (autograd hands a zero grad_ce to the Function)."""
    cfg = KDConfig(divergence="reverse_kl")
    zs, zt, labels = realistic_logits(5, 33, seed=2, dtype=torch.float64)
    z = zs.to(DEVICE).clone().requires_grad_(True)
    _, kd = kernels(impl).row_losses(z, zt.to(DEVICE)[:, :33], labels.to(DEVICE), cfg)
    kd.sum().backward()
    og = oracle_grad(zs, zt, labels, torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64), cfg)
    assert float((z.grad.cpu() - og).abs().max()) < 1e-10


@pytest.mark.parametrize("impl", IMPLS)
def test_kd_rows_teacher_column_slice_equals_its_copy(impl: str) -> None:
    """A column slice of a wider teacher (row stride > V) gives exactly what its copy gives."""
    zs, zt, labels = realistic_logits(6, 500, seed=8, teacher_extra_cols=37)
    view = zt.to(DEVICE)[:, :500]
    assert view.stride(0) == 537 and not view.is_contiguous()
    k = kernels(impl)
    a = k.forward(zs.to(DEVICE), view, labels.to(DEVICE), KDConfig())
    b = k.forward(zs.to(DEVICE), view.contiguous(), labels.to(DEVICE), KDConfig())
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("impl", IMPLS)
def test_kd_rows_non_contiguous_student(impl: str) -> None:
    zs, zt, labels = realistic_logits(5, 24, seed=13)
    zs_t = zs.t().contiguous().t()  # last dim not contiguous: the backend copies or reads by stride
    assert zs_t.stride(-1) != 1
    check_row_losses(kernels(impl).row_losses, zs_t, zt, labels, KDConfig(divergence="jsd", beta=0.5))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_kd_rows_launchers_agree_with_row_losses(impl: str, case: tuple[str, float]) -> None:
    """The ``forward`` / ``backward`` launchers (what the fused gemm strategy calls) give the
    values and gradient of ``row_losses`` with autograd, and zero rows where both upstream
    gradients are 0."""
    cfg = KDConfig(temperature=0.5, divergence=case[0], beta=case[1])
    zs, zt, labels = realistic_logits(6, 40, seed=14, dtype=torch.float64, masked_fraction=0.0)
    zs, zt, labels = zs.to(DEVICE), zt.to(DEVICE), labels.to(DEVICE)
    gce, gkd = (g.to(DEVICE) for g in upstream(6))
    gce[2] = 0.0
    gkd[2] = 0.0
    k = kernels(impl)
    ce, kd, stats = k.forward(zs, zt, labels, cfg)
    g = k.backward(zs, zt, labels, stats, gce, gkd, cfg)
    z = zs.clone().requires_grad_(True)
    ce2, kd2 = k.row_losses(z, zt, labels, cfg)
    (ce2 * gce + kd2 * gkd).sum().backward()
    torch.testing.assert_close(ce, ce2.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kd, kd2.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, z.grad, rtol=1e-12, atol=1e-12)
    assert float(g[2].abs().max()) == 0.0
    og = oracle_grad(zs.cpu(), zt.cpu(), labels.cpu(), gce.cpu(), gkd.cpu(), cfg)
    assert float((g.cpu() - og).abs().max()) < 1e-10
