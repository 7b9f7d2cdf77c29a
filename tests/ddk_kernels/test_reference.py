"""The oracle itself: agreement with torch's own losses and the closed-form gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from kd_cases import DIVERGENCE_CASES, realistic_logits

from ddk_kernels.reference import (
    divergence_reference,
    kd_logits_grad_reference,
    kd_loss_reference,
    kd_row_losses_reference,
)
from ddk_kernels.types import KDConfig


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_kd_loss_reference_matches_torch_losses(temperature: float, seed: int) -> None:
    zs, zt, labels = realistic_logits(13, 37, seed=seed, dtype=torch.float64)
    out = kd_loss_reference(zs, zt, labels, gamma=0.3, temperature=temperature)
    valid = labels != -100
    ce = F.cross_entropy(zs, labels, ignore_index=-100, reduction="sum")
    kl = F.kl_div(
        F.log_softmax(zs[valid] / temperature, -1),
        F.log_softmax(zt[valid] / temperature, -1),
        reduction="sum",
        log_target=True,
    )
    n = valid.sum()
    torch.testing.assert_close(out.ce_sum, ce)
    torch.testing.assert_close(out.kd_sum, kl)
    torch.testing.assert_close(out.loss, (ce + 0.3 * kl) / n)
    assert int(out.num_tokens) == int(n)


def test_divergence_reference_reverse_kl_is_swapped_kl_div() -> None:
    zs, zt, _ = realistic_logits(9, 21, seed=3, dtype=torch.float64)
    log_q, log_p = F.log_softmax(zs, -1), F.log_softmax(zt, -1)
    rkl = divergence_reference(log_q, log_p, "reverse_kl", 0.5)
    expected = F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
    torch.testing.assert_close(rkl, expected)


def test_divergence_reference_jsd_matches_definition() -> None:
    zs, zt, _ = realistic_logits(7, 19, seed=4, std=2.0, dtype=torch.float64)
    q, p = F.softmax(zs, -1), F.softmax(zt, -1)
    beta = 0.3
    m = beta * p + (1 - beta) * q
    expected = beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)
    got = divergence_reference(q.log(), p.log(), "jsd", beta)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_kd_logits_grad_reference_matches_autograd(divergence: str, beta: float, temperature: float) -> None:
    zs, zt, labels = realistic_logits(11, 29, seed=5, std=3.0, dtype=torch.float64)
    zs.requires_grad_(True)
    cfg = KDConfig(temperature=temperature, divergence=divergence, beta=beta)
    ce, kd = kd_row_losses_reference(zs, zt, labels, cfg)
    g = torch.Generator().manual_seed(0)
    gce = torch.rand(11, generator=g, dtype=torch.float64) * 3 - 1
    gkd = torch.rand(11, generator=g, dtype=torch.float64) * 3 - 1
    (auto,) = torch.autograd.grad((gce * ce + gkd * kd).sum(), zs)
    closed = kd_logits_grad_reference(zs.detach(), zt, labels, gce, gkd, cfg)
    torch.testing.assert_close(closed, auto, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES)
def test_kd_row_losses_reference_divergence_nonnegative_and_zero_on_identical(divergence: str, beta: float) -> None:
    zs, zt, labels = realistic_logits(17, 45, seed=6, dtype=torch.float64)
    cfg = KDConfig(divergence=divergence, beta=beta)
    _, kd = kd_row_losses_reference(zs, zt, labels, cfg)
    assert bool((kd >= -1e-12).all())
    _, kd_same = kd_row_losses_reference(zs, zs.clone(), labels, cfg)
    assert float(kd_same.abs().max()) < 1e-10


def test_kd_loss_reference_all_ignored_gives_zero_without_nan() -> None:
    zs, zt, _ = realistic_logits(5, 9, seed=7)
    zs.requires_grad_(True)
    labels = torch.full((5,), -100)
    out = kd_loss_reference(zs, zt, labels, num_domains=2, domain_ids=torch.tensor([0, 1, 1, 0, 1]))
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0 and int(out.num_tokens) == 0
    assert bool(torch.isfinite(zs.grad).all()) and float(zs.grad.abs().max()) == 0.0
    assert out.domain_tokens.tolist() == [0, 0]


def test_kd_loss_reference_teacher_vocab_sliced() -> None:
    zs, zt, labels = realistic_logits(6, 10, seed=8, dtype=torch.float64, teacher_extra_cols=5)
    wide = kd_loss_reference(zs, zt, labels)
    narrow = kd_loss_reference(zs, zt[:, :10].contiguous(), labels)
    torch.testing.assert_close(wide.loss, narrow.loss)


def test_kd_loss_reference_t2_scale_and_normalizer() -> None:
    zs, zt, labels = realistic_logits(8, 12, seed=9, dtype=torch.float64)
    base = kd_loss_reference(zs, zt, labels, temperature=2.0, gamma=0.5)
    scaled = kd_loss_reference(zs, zt, labels, temperature=2.0, gamma=0.5, t2_scale=True, normalizer=100.0)
    expected = (base.ce_sum + 0.5 * 4.0 * base.kd_sum) / 100.0
    torch.testing.assert_close(scaled.loss, expected)
    assert math.isclose(float(scaled.kd_sum), float(base.kd_sum))
