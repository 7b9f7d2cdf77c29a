"""Triton fused lm_head + KD loss (``ddk_kernels/triton/fused_linear_kd.py``) against the oracle.

Without CUDA the kernels run under Triton's interpreter on CPU tensors (slow: tiny shapes only);
with CUDA the same tests compile for the GPU.
"""

from __future__ import annotations

import os

import torch

# Set before anything imports the kernels (Triton reads it when @triton.jit decorates them).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from ddk.losses.fused import fused_linear_kd_loss  # noqa: E402
from ddk_kernels.triton.fused_linear_kd import fused_linear_kd  # noqa: E402
from ddk_kernels.types import KDConfig  # noqa: E402
from fused_cases import make_case, naive_loss  # noqa: E402
from kd_cases import DIVERGENCE_CASES, assert_close_error_relative  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _run(case, grad_output=1.0, **opts):  # type: ignore[no-untyped-def]
    def dev(t):  # type: ignore[no-untyped-def]
        return None if t is None else t.detach().to(DEVICE)

    h = dev(case.h).requires_grad_()
    w = dev(case.w).requires_grad_()
    b = None if case.b is None else dev(case.b).requires_grad_()
    kw = {k: dev(v) for k, v in case.teacher_kwargs().items()}
    cfg = KDConfig(
        temperature=opts.pop("temperature", 1.0), divergence=opts.pop("divergence", "forward_kl"),
        beta=opts.pop("beta", 0.5),
    )
    loss, ce, kd = fused_linear_kd(h, w, dev(case.labels), cfg, student_bias=b, **kw, **opts)
    (loss * grad_output).backward()
    return loss.cpu(), [None if g is None else g.cpu() for g in (h.grad, w.grad, None if b is None else b.grad)]


def _check(case, low, grad_output=1.0, k_atol=1e-6, **opts):  # type: ignore[no-untyped-def]
    """float32/bf16 ``case``: error-relative against the float64 oracle of the same inputs, the
    bound set by the naive path in the same precision (``low``: bf16 atol of one rounding)."""
    ref, ref_grads = naive_loss(case.to(torch.float64), grad_output=grad_output, **opts)
    naive, naive_grads = naive_loss(case, grad_output=grad_output, **opts)
    loss, grads = _run(case, grad_output=grad_output, **opts)
    assert_close_error_relative(loss, ref.loss, naive.loss, k=2, atol=k_atol, rtol=1e-6, what="loss")
    for name, g, r, nv in zip(("dh", "dW", "db"), grads, ref_grads, naive_grads):
        if r is None:
            assert g is None
            continue
        atol = float(r.abs().max()) * (2**-8 if low else 1e-6)
        assert_close_error_relative(g, r, nv, k=3, atol=atol, what=name)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES)
def test_fused_triton_matches_oracle_float32(temperature: float, divergence: str, beta: float) -> None:
    case = make_case(23, 16, 24, 97, 103, seed=3, bias=True).to(torch.float32)
    opts = dict(gamma=0.3, temperature=temperature, divergence=divergence, beta=beta)
    _check(case, False, grad_output=1.7, **opts)


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("jsd", 0.3)])
def test_fused_triton_teacher_logits_single_token(divergence: str, beta: float) -> None:
    _check(make_case(19, 11, 13, 61, 64, seed=4, teacher_as_logits=True).to(torch.float32), False, divergence=divergence, beta=beta)
    _check(make_case(1, 3, 5, 7, 9, seed=5, bias=True, masked_fraction=0.0).to(torch.float32), False, divergence=divergence, beta=beta)


def test_fused_triton_fully_masked_gives_zero() -> None:
    loss, grads = _run(make_case(9, 8, 8, 33, seed=6, bias=True, masked_fraction=1.0).to(torch.float32))
    assert float(loss) == 0.0
    assert all(float(g.abs().max()) == 0.0 for g in grads)


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5)])
def test_fused_triton_bfloat16_error_relative(divergence: str, beta: float) -> None:
    case = make_case(33, 24, 40, 150, 157, seed=9, bias=True).to(torch.bfloat16)
    _check(case, True, k_atol=1e-5, divergence=divergence, beta=beta)


def test_fused_triton_through_public_api_and_float64_error() -> None:
    case = make_case(12, 8, 8, 29, seed=12, num_domains=2).to(torch.float32)
    h, w, labels, th, tw, dom = (t.to(DEVICE) for t in (case.h, case.w, case.labels, case.th, case.tw, case.domain_ids))
    kw = dict(teacher_hidden=th, teacher_weight=tw, domain_ids=dom, num_domains=2)
    out = fused_linear_kd_loss(h, w, labels, backend="triton", **kw)
    ref = fused_linear_kd_loss(h, w, labels, backend="chunked", **kw)
    assert torch.allclose(out.domain_ce_sum, ref.domain_ce_sum, rtol=1e-5, atol=1e-5)
    h64, w64, th64, tw64 = (t.double() for t in (h, w, th, tw))
    with pytest.raises(TypeError, match=r"^fused_linear_kd_loss: student_hidden must be float32, bfloat16 or float16 on the triton backend; got torch.float64\."):
        fused_linear_kd_loss(h64, w64, labels, teacher_hidden=th64, teacher_weight=tw64, backend="triton")
