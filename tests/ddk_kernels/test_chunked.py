"""What is specific to the chunked (pure torch) backend; its oracle suite is tests/ddk_kernels/test_kd_rows.py."""

from __future__ import annotations

import pytest
import torch
from kd_cases import (
    DIVERGENCE_CASES,
    assert_close_error_relative,
    naive_low,
    oracle_grad,
    oracle_rows,
    realistic_logits,
    tolerances,
    upstream,
)

from ddk_kernels import chunked
from ddk_kernels.types import KDConfig


@pytest.mark.parametrize("case", DIVERGENCE_CASES)
@pytest.mark.parametrize("block", [50, 1000])
def test_chunked_vocab_tiles_match_oracle(case: tuple[str, float], block: int) -> None:
    """Small blocks force vocabulary tiling (tiles merged exactly); the launchers still match the oracle."""
    cfg = KDConfig(temperature=0.5, divergence=case[0], beta=case[1])
    zs, zt, labels = realistic_logits(9, 1271, seed=5)
    gce, gkd = upstream(9)
    ce, kd, st = chunked.kd_chunked_forward(zs, zt, labels, cfg, block_elems=block)
    grad = chunked.kd_chunked_backward(zs, zt, labels, st, gce, gkd, cfg, block_elems=block)
    oce, okd = oracle_rows(zs, zt, labels, cfg)
    og = oracle_grad(zs, zt, labels, gce, gkd, cfg)
    nce, nkd, ng = naive_low(zs, zt, labels, cfg, gce, gkd)
    atol_v, atol_g = tolerances(zs, cfg, gce, gkd)
    assert_close_error_relative(ce, oce, nce, k=2, atol=atol_v, what="ce")
    assert_close_error_relative(kd, okd, nkd, k=2, atol=atol_v, what="kd")
    assert_close_error_relative(grad, og, ng, k=3, atol=atol_g, what="grad")


@pytest.mark.parametrize("case", DIVERGENCE_CASES)
def test_chunked_row_losses_block_elems_passes_through_autograd(case: tuple[str, float]) -> None:
    """``row_losses(..., block_elems)`` tiles the backward like the forward (same gradient as one tile)."""
    cfg = KDConfig(temperature=2.0, divergence=case[0], beta=case[1])
    zs, zt, labels = realistic_logits(5, 300, seed=6, dtype=torch.float64)
    grads = []
    for block in (None, 64):
        z = zs.clone().requires_grad_(True)
        ce, kd = chunked.row_losses(z, zt, labels, cfg, block)
        (ce.sum() + 0.3 * kd.sum()).backward()
        grads.append(z.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-13)


def test_chunked_runs_on_the_meta_device_without_host_syncs() -> None:
    """``is_available`` says the chunked backend runs wherever torch does: on meta tensors (no data,
    so any ``.item()`` or data-dependent branch would raise) forward and backward still produce
    the right shapes and dtypes."""
    assert chunked.is_available("meta") == (True, "")
    zs = torch.empty(6, 5000, device="meta", dtype=torch.bfloat16, requires_grad=True)
    zt = torch.empty(6, 5003, device="meta", dtype=torch.bfloat16)[:, :5000]
    labels = torch.empty(6, device="meta", dtype=torch.long)
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        ce, kd = chunked.row_losses(zs, zt, labels, KDConfig(temperature=2.0, divergence=divergence), 1 << 12)
        assert ce.shape == kd.shape == (6,) and ce.dtype == kd.dtype == torch.float32
        (grad,) = torch.autograd.grad(ce.sum() + kd.sum(), zs)
        assert grad.shape == (6, 5000) and grad.dtype == torch.bfloat16 and grad.device.type == "meta"


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("masked", ["student", "teacher", "both"])
def test_chunked_kd_of_minus_inf_logits_is_the_references(divergence, masked):
    from ddk import kd_loss
    from ddk_kernels.chunked import kd_chunked_forward
    from ddk_kernels.types import KDConfig

    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(5, 37, generator=g) * 10, torch.randn(5, 37, generator=g) * 10
    if masked in ("student", "both"):
        zs[0, 5] = zs[2, 7] = float("-inf")
    if masked in ("teacher", "both"):
        zt[0, 5] = zt[1, 9] = float("-inf")
    y = torch.tensor([1, 2, 3, 4, 0])
    for temperature in (1.0, 2.0):
        ref = kd_loss(zs.double(), zt.double(), y, divergence=divergence, temperature=temperature, backend="reference")
        x = zs.clone().requires_grad_()
        out = kd_loss(x, zt, y, divergence=divergence, temperature=temperature, backend="chunked")
        cfg = KDConfig(temperature=temperature, divergence=divergence)
        tiled = kd_chunked_forward(zs, zt, y, cfg, block_elems=8)[1].sum()  # vocabulary tiles of 2 columns
        for got in (out.kd_sum, tiled):
            if torch.isinf(ref.kd_sum):  # KL(a || b) is infinite where b = 0 < a: the same inf, never NaN
                assert got == ref.kd_sum
            else:
                assert torch.isclose(got.double(), ref.kd_sum, rtol=1e-5), (got, ref.kd_sum)
        if torch.isfinite(out.loss):
            out.loss.backward()
            assert torch.isfinite(x.grad).all()
