"""The loss formula (``ddk_kernels/reduce.py``), which every backend's epilogue and the oracle use."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ddk_kernels.reduce import (
    combine,
    denominator,
    domain_sums,
    gradient_weights,
    kd_output,
    reduce_kd_rows,
)
from ddk_kernels.types import KDConfig, KDLossParams


def _rows(n: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(n, generator=g) > 0.3
    ce = torch.rand(n, generator=g, dtype=torch.float64) * valid
    kd = torch.rand(n, generator=g, dtype=torch.float64) * valid
    dom = torch.randint(0, 3, (n,), generator=g)
    return ce, kd, valid, dom


def test_domain_sums_match_one_hot_matmul_and_leave_empty_domains_zero() -> None:
    ce, kd, valid, dom = _rows()
    d_ce, d_kd, d_tok = domain_sums(ce, kd, valid, dom, 4)
    onehot = F.one_hot(dom, 4).double() * valid[:, None]
    torch.testing.assert_close(d_ce, onehot.T @ ce)
    torch.testing.assert_close(d_kd, onehot.T @ kd)
    assert d_tok.dtype == torch.long and d_tok.tolist() == onehot.sum(0).long().tolist()
    assert d_tok[3] == 0 and d_ce[3] == 0
    none = domain_sums(ce, kd, valid, None, 1)
    assert none[2].tolist() == [int(valid.sum())] and float(none[0][0]) == pytest.approx(float(ce.sum()))


def test_denominator_default_tensor_and_number() -> None:
    params = KDLossParams()
    assert float(denominator(params, torch.tensor(0), torch.float32)) == 1.0  # an all-ignored batch gives 0, not NaN
    assert float(denominator(params, torch.tensor(7), torch.float32)) == 7.0
    exact = denominator(KDLossParams(normalizer=0.1), torch.tensor(7), torch.float64)
    assert exact.dtype == torch.float64 and float(exact) == 0.1  # a number is not rounded to float32 first
    t = torch.tensor(37.0, requires_grad=True)
    d = denominator(KDLossParams(normalizer=t), torch.tensor(7), torch.float64)
    assert float(d) == 37.0 and not d.requires_grad


def test_combine_and_gradient_weights_are_the_loss_and_its_derivatives() -> None:
    params = KDLossParams(KDConfig(temperature=2.0), gamma=0.3, t2_scale=True)
    ce_sum = torch.tensor(5.0, requires_grad=True)
    kd_sum = torch.tensor(2.0, requires_grad=True)
    norm = torch.tensor(4.0)
    loss = combine(ce_sum, kd_sum, norm, params)
    assert float(loss.detach()) == pytest.approx((5.0 + 0.3 * 4.0 * 2.0) / 4.0)
    loss.backward()
    w_ce, w_kd = gradient_weights(norm, params)
    assert float(ce_sum.grad) == pytest.approx(float(w_ce)) and float(kd_sum.grad) == pytest.approx(float(w_kd))


def test_reduce_kd_rows_is_kd_output_of_combine() -> None:
    ce, kd, valid, dom = _rows(seed=1)
    ce.requires_grad_(True)
    params = KDLossParams(gamma=0.7, normalizer=10.0)
    out = reduce_kd_rows(ce, kd, valid, dom, 3, params)
    assert float(out.loss.detach()) == pytest.approx(float((ce.detach().sum() + 0.7 * kd.sum()) / 10.0))
    assert out.loss.requires_grad and not out.ce_sum.requires_grad and not out.domain_ce_sum.requires_grad
    assert int(out.num_tokens) == int(valid.sum())
    again = kd_output(out.loss, ce, kd, valid, dom, 3)
    for field in ("ce_sum", "kd_sum", "num_tokens", "domain_ce_sum", "domain_kd_sum", "domain_tokens"):
        assert torch.equal(getattr(out, field), getattr(again, field)), field
