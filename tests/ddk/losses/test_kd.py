"""Public ``kd_loss``: agreement with the oracle on every runnable backend, and bad input."""

from __future__ import annotations

import pytest
import torch

import ddk
from ddk import KDLoss, kd_loss
from ddk_kernels.dispatch import available_backends
from ddk_kernels.reference import kd_loss_reference
from kd_cases import DIVERGENCE_CASES, realistic_logits

CPU_BACKENDS = [name for name, reason in available_backends("cpu").items() if not reason]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES)
def test_kd_loss_matches_oracle_with_domains(backend: str, divergence: str, beta: float) -> None:
    zs, zt, labels = realistic_logits(23, 57, seed=1, teacher_extra_cols=3)
    domain_ids = torch.randint(0, 4, (23,), generator=torch.Generator().manual_seed(2))
    domain_ids[domain_ids == 3] = 2  # domain 3 stays empty
    zs.requires_grad_(True)
    out = kd_loss(
        zs, zt, labels, domain_ids=domain_ids, num_domains=4, gamma=0.7, temperature=2.0,
        divergence=divergence, beta=beta, backend=backend,
    )
    zs64 = zs.detach().double().requires_grad_(True)
    ref = kd_loss_reference(
        zs64, zt.double(), labels, domain_ids=domain_ids, num_domains=4, gamma=0.7,
        temperature=2.0, divergence=divergence, beta=beta,
    )
    (3.0 * out.loss).backward()
    (3.0 * ref.loss).backward()
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.domain_ce_sum.double(), ref.domain_ce_sum, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.domain_kd_sum.double(), ref.domain_kd_sum, rtol=1e-4, atol=1e-4)
    assert out.domain_tokens.tolist() == ref.domain_tokens.tolist()
    assert out.domain_tokens[3] == 0 and float(out.domain_ce_sum[3]) == 0.0
    torch.testing.assert_close(zs.grad.double(), zs64.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kd_loss_normalizer_two_halves_equal_whole(backend: str) -> None:
    zs, zt, labels = realistic_logits(16, 33, seed=3)
    whole = kd_loss(zs, zt, labels, backend=backend)
    total = whole.num_tokens
    a = kd_loss(zs[:8], zt[:8], labels[:8], normalizer=total, backend=backend)
    b = kd_loss(zs[8:], zt[8:], labels[8:], normalizer=total, backend=backend)
    torch.testing.assert_close(a.loss + b.loss, whole.loss, rtol=1e-5, atol=1e-6)


def test_kd_loss_module_wrapper_matches_function() -> None:
    zs, zt, labels = realistic_logits(9, 13, seed=4)
    dom = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 1])
    mod = KDLoss(num_domains=2, gamma=0.4, divergence="jsd", beta=0.25)
    got = mod(zs, zt, labels, dom)
    want = kd_loss(zs, zt, labels, domain_ids=dom, num_domains=2, gamma=0.4, divergence="jsd", beta=0.25)
    torch.testing.assert_close(got.loss, want.loss)
    assert "jsd" in repr(mod)


def test_kd_loss_public_names_exported() -> None:
    assert ddk.KDLossOutput is type(kd_loss(*realistic_logits(2, 3)))
    for name in ("DomainPartitioner", "DiscrepancyEstimator", "FactorSmoother", "MixtureSampler",
                 "DDKController", "kd_loss", "KDLossOutput"):
        assert hasattr(ddk, name), name


def _inputs():  # type: ignore[no-untyped-def]
    return realistic_logits(4, 6, seed=5)


BAD_CASES = [
    (lambda zs, zt, y: kd_loss(zs[0], zt, y), ValueError, r"kd_loss: student_logits must be a 2-D float tensor"),
    (lambda zs, zt, y: kd_loss(zs.long(), zt, y), ValueError, r"student_logits must be a 2-D float tensor .* dtype torch.int64"),
    (lambda zs, zt, y: kd_loss(zs.tolist(), zt, y), TypeError, r"kd_loss: student_logits must be a torch.Tensor; got list"),
    (lambda zs, zt, y: kd_loss(zs, zt[:3], y), ValueError, r"teacher_logits must have N=4 rows"),
    (lambda zs, zt, y: kd_loss(zs, zt[:, :5], y), ValueError, r"at least the student's V=6 columns .* got 5"),
    (lambda zs, zt, y: kd_loss(zs, zt, y[:3]), ValueError, r"labels must be a 1-D tensor of length N=4"),
    (lambda zs, zt, y: kd_loss(zs, zt, y.float()), TypeError, r"labels must be int64 or int32; got torch.float32"),
    (lambda zs, zt, y: kd_loss(zs, zt, torch.tensor([0, 1, 6, 2])), ValueError, r"labels must be in \[0, 6\) or equal ignore_index=-100; got 6"),
    (lambda zs, zt, y: kd_loss(zs, zt, y, domain_ids=torch.tensor([0, 1, 2, 0]), num_domains=2), ValueError, r"domain_ids must be in \[0, 2\); got 2"),
    (lambda zs, zt, y: kd_loss(zs, zt, y, domain_ids=torch.tensor([0, 1, -1, 0]), num_domains=2), ValueError, r"domain_ids must be in \[0, 2\); got -1"),
    (lambda zs, zt, y: kd_loss(zs, zt, y, domain_ids=torch.tensor([0, 1]), num_domains=2), ValueError, r"domain_ids must be a 1-D tensor of length N=4; got \(2,\)"),
    (lambda zs, zt, y: kd_loss(zs, zt, y, domain_ids=torch.zeros(4), num_domains=2), TypeError, r"domain_ids must be int64 or int32"),
    (lambda zs, zt, y: kd_loss(zs, zt, y, domain_ids=torch.zeros(4, dtype=torch.long)), ValueError, r"num_domains must be given with domain_ids"),
    (lambda zs, zt, y: kd_loss(zs, zt, y, num_domains=3), ValueError, r"num_domains=3 needs domain_ids"),
    (lambda zs, zt, y: kd_loss(zs, zt, y, domain_ids=torch.zeros(4, dtype=torch.long), num_domains=0), ValueError, r"num_domains must be an int >= 1; got 0"),
    (lambda zs, zt, y: kd_loss(zs, zt, y, divergence="kl"), ValueError, r"divergence must be one of \('forward_kl', 'reverse_kl', 'jsd'\); got 'kl'"),
    (lambda zs, zt, y: kd_loss(zs, zt, y, gamma=-1.0), ValueError, r"gamma must be a finite number >= 0; got -1.0"),
    (lambda zs, zt, y: kd_loss(zs, zt, y, temperature=0.0), ValueError, r"temperature must be a finite number > 0; got 0.0"),
    (lambda zs, zt, y: kd_loss(zs, zt, y, beta=1.5), ValueError, r"beta must be in \[0, 1\]; got 1.5"),
    (lambda zs, zt, y: kd_loss(zs, zt, y, normalizer=0), ValueError, r"normalizer must be > 0"),
    (lambda zs, zt, y: kd_loss(zs, zt, y, backend="cuda-magic"), ValueError, r"backend must be one of"),
]


@pytest.mark.parametrize("call,exc,match", BAD_CASES)
def test_kd_loss_rejects_bad_input(call, exc, match) -> None:  # type: ignore[no-untyped-def]
    zs, zt, y = _inputs()
    with pytest.raises(exc, match=match):
        call(zs, zt, y)


def test_kd_loss_unavailable_backend_names_available_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reasons = available_backends("cpu")
    unavailable = [n for n, r in reasons.items() if r]
    if not unavailable:
        pytest.skip("every backend runs here")
    zs, zt, y = _inputs()
    with pytest.raises(RuntimeError, match=rf"backend '{unavailable[0]}' cannot run on cpu: .* Available there: \["):
        kd_loss(zs, zt, y, backend=unavailable[0])


def test_kd_loss_ddk_backend_env_steers_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    from ddk_kernels.dispatch import resolve_backend

    monkeypatch.setenv("DDK_BACKEND", "reference")
    assert resolve_backend("auto", "cpu") == "reference"
    monkeypatch.setenv("DDK_BACKEND", "nope")
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("auto", "cpu")
