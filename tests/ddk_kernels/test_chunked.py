"""The chunked (pure torch) backend against the float64 oracle (error-relative, tests/kd_cases.py)."""

from __future__ import annotations

import itertools

import pytest
import torch

from ddk_kernels import chunked
from ddk_kernels.reference import kd_row_losses_reference
from ddk_kernels.types import KDConfig
from kd_cases import DIVERGENCE_CASES, assert_close_error_relative, oracle_grad, oracle_rows, realistic_logits

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
EPS = {torch.float64: 2.0**-52, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-24, torch.float16: 2.0**-24}


def _upstream(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g, dtype=torch.float64) * 2 - 0.5, torch.rand(n, generator=g, dtype=torch.float64) * 3


def _naive_low(zs, zt, labels, cfg, gce, gkd):  # type: ignore[no-untyped-def]
    """The oracle run in the input's own precision (float32 for float32): values and gradient."""
    z = zs.detach().clone().requires_grad_(True)
    ce, kd = kd_row_losses_reference(z, zt, labels, cfg, compute_dtype=None if zs.dtype == torch.float64 else zs.dtype)
    (ce * gce.to(ce.dtype) + kd * gkd.to(ce.dtype)).sum().backward()
    return ce.detach(), kd.detach(), z.grad


def _tolerances(zs, cfg, gce, gkd):  # type: ignore[no-untyped-def]
    """atol of values and gradients: the float32 rounding of ``|lse|``-sized numbers.

    The statistics are float64 and split into hi + lo in backward, so this bound (``ulp(|lse|)``
    relative error in ``q``, times the upstream scale) is loose for them; it still bounds the
    rounding of ``s = zS/T`` and of the float32 sums (tests/ddk_kernels/test_stats_precision.py
    pins the tighter behaviour).
    """
    eps = EPS[zs.dtype]
    lse = float(zs.double().abs().max()) / cfg.temperature + 12.0
    g = float(gce.abs().max()) + float(gkd.abs().max()) / cfg.temperature
    return 16 * eps * lse, 32 * eps * lse * g


def check_backend(row_losses, zs, zt_wide, labels, cfg, seed=1):  # type: ignore[no-untyped-def]
    """Run ``row_losses`` on a column slice of ``zt_wide`` and check ce, kd, grad (k=2 / k=3)."""
    n, v = zs.shape
    zt = zt_wide[:, :v]
    gce, gkd = _upstream(n, seed)
    z = zs.clone().requires_grad_(True)
    ce, kd = row_losses(z, zt, labels, cfg)
    acc = torch.float64 if zs.dtype == torch.float64 else torch.float32
    assert ce.dtype == acc and kd.dtype == acc and ce.shape == (n,) and kd.shape == (n,)
    (ce * gce.to(acc) + kd * gkd.to(acc)).sum().backward()
    assert z.grad is not None and z.grad.dtype == zs.dtype
    oce, okd = oracle_rows(zs, zt, labels, cfg)
    og = oracle_grad(zs, zt, labels, gce, gkd, cfg)
    nce, nkd, ng = _naive_low(zs, zt, labels, cfg, gce, gkd)
    atol_v, atol_g = _tolerances(zs, cfg, gce, gkd)
    assert_close_error_relative(ce.detach(), oce, nce, k=2, atol=atol_v, what="ce")
    assert_close_error_relative(kd.detach(), okd, nkd, k=2, atol=atol_v, what="kd")
    assert_close_error_relative(z.grad, og, ng, k=3, atol=atol_g, what="grad")
    ignored = labels == cfg.ignore_index
    assert bool((ce.detach()[ignored] == 0).all()) and bool((kd.detach()[ignored] == 0).all())
    assert bool((z.grad[ignored] == 0).all())


@pytest.mark.parametrize(
    ("case", "temperature", "dtype"), list(itertools.product(DIVERGENCE_CASES, (0.5, 1.0, 2.0), DTYPES))
)
def test_chunked_matches_oracle(case, temperature, dtype) -> None:  # type: ignore[no-untyped-def]
    divergence, beta = case
    cfg = KDConfig(temperature=temperature, divergence=divergence, beta=beta)
    std = 10.0 if dtype == torch.float16 else 15.0
    zs, zt, labels = realistic_logits(19, 1271, dtype=dtype, teacher_extra_cols=9, std=std)
    check_backend(chunked.row_losses, zs, zt, labels, cfg)


@pytest.mark.parametrize(("n", "v"), [(5, 1), (6, 7), (1, 1271), (3, 32000)])
@pytest.mark.parametrize("case", DIVERGENCE_CASES)
def test_chunked_odd_shapes(n, v, case) -> None:  # type: ignore[no-untyped-def]
    cfg = KDConfig(temperature=2.0, divergence=case[0], beta=case[1])
    zs, zt, labels = realistic_logits(n, v, seed=3, teacher_extra_cols=3, masked_fraction=0.0)
    check_backend(chunked.row_losses, zs, zt, labels, cfg)


@pytest.mark.parametrize("case", DIVERGENCE_CASES)
@pytest.mark.parametrize("block", [50, 1000])
def test_chunked_vocab_tiles_match_single_tile(case, block) -> None:  # type: ignore[no-untyped-def]
    """Small blocks force vocabulary tiling; results match the oracle and the one-tile path."""
    cfg = KDConfig(temperature=0.5, divergence=case[0], beta=case[1])
    zs, zt, labels = realistic_logits(9, 1271, seed=5)
    gce, gkd = _upstream(9)
    ce, kd, st = chunked.kd_chunked_forward(zs, zt, labels, cfg, block_elems=block)
    grad = chunked.kd_chunked_backward(zs, zt, labels, st, gce, gkd, cfg, block_elems=block)
    oce, okd = oracle_rows(zs, zt, labels, cfg)
    og = oracle_grad(zs, zt, labels, gce, gkd, cfg)
    nce, nkd, ng = _naive_low(zs, zt, labels, cfg, gce, gkd)
    atol_v, atol_g = _tolerances(zs, cfg, gce, gkd)
    assert_close_error_relative(ce, oce, nce, k=2, atol=atol_v, what="ce")
    assert_close_error_relative(kd, okd, nkd, k=2, atol=atol_v, what="kd")
    assert_close_error_relative(grad, og, ng, k=3, atol=atol_g, what="grad")


def test_chunked_fully_masked_rows_give_zeros() -> None:
    cfg = KDConfig(divergence="jsd", beta=0.3, ignore_index=-1)
    zs, zt, labels = realistic_logits(7, 301, ignore_index=-1, masked_fraction=1.0)
    assert bool((labels == -1).all())
    z = zs.clone().requires_grad_(True)
    ce, kd = chunked.row_losses(z, zt, labels, cfg)
    (ce.sum() * 3 + kd.sum()).backward()
    assert float(ce.detach().abs().sum()) == 0.0 and float(kd.detach().abs().sum()) == 0.0
    assert float(z.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("case", DIVERGENCE_CASES)
def test_chunked_non_default_ignore_index(case) -> None:  # type: ignore[no-untyped-def]
    cfg = KDConfig(temperature=1.0, divergence=case[0], beta=case[1], ignore_index=3)
    zs, zt, labels = realistic_logits(12, 97, seed=7, ignore_index=3, masked_fraction=0.4)
    check_backend(chunked.row_losses, zs, zt, labels, cfg)


@pytest.mark.parametrize("case", DIVERGENCE_CASES)
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_chunked_gradcheck_float64(case, temperature) -> None:  # type: ignore[no-untyped-def]
    cfg = KDConfig(temperature=temperature, divergence=case[0], beta=case[1])
    zs, zt, labels = realistic_logits(4, 6, seed=11, std=2.0, dtype=torch.float64, masked_fraction=0.3)
    z = zs.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: chunked.KDLossChunkedFunction.apply(x, zt[:, :6], labels, cfg), (z,), eps=1e-6, atol=1e-7
    )


def test_chunked_one_output_unused() -> None:
    """Backward with only the divergence used (grad_ce None inside the Function)."""
    cfg = KDConfig(divergence="reverse_kl")
    zs, zt, labels = realistic_logits(5, 33, seed=2, dtype=torch.float64)
    z = zs.clone().requires_grad_(True)
    _, kd = chunked.row_losses(z, zt[:, :33], labels, cfg)
    kd.sum().backward()
    og = oracle_grad(zs, zt, labels, torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64), cfg)
    assert float((z.grad - og).abs().max()) < 1e-10


def test_chunked_is_available_everywhere() -> None:
    assert chunked.is_available("cpu") == (True, "")
