"""The op ``fused_linear_kd`` on every backend and strategy that runs here, against the float64 oracle.

One suite, parametrized by ``impl`` over the entries of ``dispatch.TABLE["fused_linear_kd"]``
(``reference`` materialises the logits; ``chunked`` runs with explicit plans of each strategy,
which force several token chunks and, for ``recompute``, several vocabulary tiles on these tiny
shapes). The oracle materialises the logits and differentiates ``kd_loss_reference`` with autograd
(``fused_cases.naive_loss`` on float64 inputs).
"""

from __future__ import annotations

import pytest
import torch
from fused_cases import FusedCase, make_case, naive_loss
from kd_cases import (
    DIVERGENCE_CASES,
    assert_close_error_relative,
    max_err,
    runnable_backends,
)

from ddk_kernels import dispatch
from ddk_kernels.fused_plan import FusedOptions, FusedPlan
from ddk_kernels.types import KDConfig, KDLossParams, TeacherInputs

PLANS = {
    "chunked:token_chunks": FusedPlan("token_chunks", 5, 10**9),  # vocab tile clipped to V
    "chunked:recompute": FusedPlan("recompute", 7, 16),
    "chunked:gemm": FusedPlan("gemm", 6, 10**9),
}
IMPLS = ["reference"] + [name for name in PLANS if name.split(":")[0] in runnable_backends("fused_linear_kd", "cpu")]


def run(impl: str, case: FusedCase, grad_output: float = 1.0, **opts):  # type: ignore[no-untyped-def]
    """``impl`` on ``case`` through the dispatch table; returns ``(loss, ce, kd, (dh, dW, db))``."""
    backend = impl.split(":")[0]
    h = case.h.detach().clone().requires_grad_()
    w = case.w.detach().clone().requires_grad_()
    b = None if case.b is None else case.b.detach().clone().requires_grad_()
    v = w.shape[0]
    if case.tl is not None:
        teacher = TeacherInputs(logits=case.tl)
    else:
        teacher = TeacherInputs(case.th, case.tw[:v], bias=case.tb, softcap=case.tcap)  # type: ignore[index]
    cfg = KDConfig(
        temperature=opts.pop("temperature", 1.0),
        divergence=opts.pop("divergence", "forward_kl"),
        beta=opts.pop("beta", 0.5),
    )
    params = KDLossParams(
        cfg, gamma=opts.pop("gamma", 0.2), t2_scale=opts.pop("t2_scale", False), normalizer=opts.pop("normalizer", None)
    )
    assert not opts, opts
    plan = PLANS.get(impl)
    options = FusedOptions(
        plan=None if plan is None else FusedPlan(plan.strategy, plan.token_chunk, min(v, plan.vocab_tile))
    )
    fn = dispatch.resolve("fused_linear_kd", backend, "cpu")
    loss, ce, kd = fn(h, w, case.labels, teacher, params, student_bias=b, options=options, student_softcap=case.scap)
    (loss * grad_output).backward()
    return loss, ce, kd, (h.grad, w.grad, None if b is None else b.grad)


def assert_matches(fused, ref, ref_grads, tol: float = 1e-10) -> None:  # type: ignore[no-untyped-def]
    loss, ce, kd, grads = fused
    ref = type(ref)(**{k: v.detach() for k, v in vars(ref).items()})
    assert max_err(loss, ref.loss) <= tol * (1 + float(ref.loss.abs()))
    assert max_err(ce.sum(), ref.ce_sum) <= tol * (1 + float(ref.ce_sum.abs()))
    assert max_err(kd.sum(), ref.kd_sum) <= tol * (1 + float(ref.kd_sum.abs()))
    assert not ce.requires_grad and not kd.requires_grad
    for name, g, r in zip(("d hidden", "d weight", "d bias"), grads, ref_grads):
        if r is None:
            assert g is None
            continue
        assert g is not None and g.dtype == r.dtype
        assert max_err(g, r) <= tol * (1 + float(r.abs().max())), name


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES)
def test_fused_linear_kd_matches_oracle_float64(impl: str, temperature: float, divergence: str, beta: float) -> None:
    case = make_case(23, 16, 24, 97, 103, seed=3, bias=True)  # Ht != Hs, teacher vocab larger, odd V
    opts = dict(gamma=0.3, temperature=temperature, divergence=divergence, beta=beta, t2_scale=temperature != 1.0)
    ref, ref_grads = naive_loss(case, grad_output=1.7, **opts)
    assert_matches(run(impl, case, grad_output=1.7, **opts), ref, ref_grads)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES)
@pytest.mark.parametrize("caps", [(8.0, None), (None, 5.0), (8.0, 5.0)])
def test_fused_linear_kd_softcaps_and_teacher_bias_match_oracle_float64(
    impl: str, temperature: float, divergence: str, beta: float, caps: tuple[float | None, float | None]
) -> None:
    """Final logit softcaps (Gemma2) on either model and a teacher lm_head bias (Phi), inside the
    tiles: logits of std 15 against caps of 5 and 8 put many entries on the flat part of tanh."""
    case = make_case(23, 16, 24, 97, 103, seed=7, bias=True).with_caps(*caps, teacher_bias_seed=1)
    opts = dict(gamma=0.3, temperature=temperature, divergence=divergence, beta=beta)
    ref, ref_grads = naive_loss(case, grad_output=0.6, **opts)
    assert_matches(run(impl, case, grad_output=0.6, **opts), ref, ref_grads)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_fused_linear_kd_matches_oracle_teacher_logits(impl: str, divergence: str, beta: float) -> None:
    case = make_case(19, 11, 13, 61, 64, seed=4, teacher_as_logits=True)
    ref, ref_grads = naive_loss(case, divergence=divergence, beta=beta, temperature=2.0)
    assert_matches(run(impl, case, divergence=divergence, beta=beta, temperature=2.0), ref, ref_grads)


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_linear_kd_single_token_odd_shapes(impl: str) -> None:
    case = make_case(1, 3, 5, 7, 9, seed=5, bias=True, masked_fraction=0.0)
    ref, ref_grads = naive_loss(case, divergence="reverse_kl", temperature=0.5)
    assert_matches(run(impl, case, divergence="reverse_kl", temperature=0.5), ref, ref_grads)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_fused_linear_kd_fully_masked_gives_zero(impl: str, divergence: str) -> None:
    case = make_case(9, 8, 8, 33, seed=6, bias=True, masked_fraction=1.0)
    loss, ce, kd, grads = run(impl, case, divergence=divergence)
    assert float(loss.detach()) == 0.0 and float(ce.abs().sum()) == 0.0 and float(kd.abs().sum()) == 0.0
    for g in grads:
        assert g is not None and torch.isfinite(g).all() and float(g.abs().max()) == 0.0


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_linear_kd_normalizer_tensor_and_gamma(impl: str) -> None:
    case = make_case(21, 8, 12, 45, seed=7)
    norm = torch.tensor(37.0, dtype=torch.float64)
    opts = dict(gamma=1.3, normalizer=norm, divergence="jsd", beta=0.7)
    ref, ref_grads = naive_loss(case, **opts)
    assert_matches(run(impl, case, **opts), ref, ref_grads)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5)])
def test_fused_linear_kd_float32_error_relative(impl: str, divergence: str, beta: float) -> None:
    case = make_case(33, 24, 40, 301, 310, seed=8, bias=True).to(torch.float32)
    opts = dict(divergence=divergence, beta=beta, temperature=2.0)
    ref, ref_grads = naive_loss(case.to(torch.float64), **opts)
    naive, naive_grads = naive_loss(case, **opts)
    loss, _, _, grads = run(impl, case, **opts)
    assert_close_error_relative(loss, ref.loss, naive.loss, k=2, atol=1e-6, rtol=1e-6, what="loss")
    for name, g, r, nv in zip(("dh", "dW", "db"), grads, ref_grads, naive_grads):
        assert g.dtype == torch.float32
        assert_close_error_relative(g, r, nv, k=3, atol=1e-7, what=name)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5)])
@pytest.mark.parametrize("caps", [(None, None), (10.0, 7.0)])
def test_fused_linear_kd_bfloat16_error_relative(
    impl: str, divergence: str, beta: float, caps: tuple[float | None, float | None]
) -> None:
    """bf16 inputs: token_chunks / recompute keep float32 logits, the naive path rounds them to bf16
    (softcapped too: the naive path applies tanh to bf16 logits, as a bf16 model's forward does)."""
    case = make_case(33, 24, 40, 301, 310, seed=9, bias=True).with_caps(*caps, teacher_bias_seed=2 if caps[0] else None)
    case = case.to(torch.bfloat16)
    opts = dict(divergence=divergence, beta=beta, temperature=1.0)
    ref, ref_grads = naive_loss(case.to(torch.float64), **opts)  # oracle of the bf16-rounded inputs
    naive, naive_grads = naive_loss(case, **opts)
    loss, _, _, grads = run(impl, case, **opts)
    assert loss.dtype == torch.float32
    assert_close_error_relative(loss, ref.loss, naive.loss, k=2, atol=1e-5, what="loss")
    for name, g, r, nv in zip(("dh", "dW", "db"), grads, ref_grads, naive_grads):
        assert g.dtype == torch.bfloat16
        # atol: one bf16 rounding of the largest gradient entry
        assert_close_error_relative(g, r, nv, k=3, atol=float(r.abs().max()) * 2**-8, what=name)


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_linear_kd_never_differentiates_the_teacher(impl: str) -> None:
    case = make_case(8, 6, 7, 19, 21, seed=28)
    th = case.th.clone().requires_grad_()
    tw = case.tw.clone().requires_grad_()
    h = case.h.clone().requires_grad_()
    fn = dispatch.resolve("fused_linear_kd", impl.split(":")[0], "cpu")
    loss, _, _ = fn(h, case.w, case.labels, TeacherInputs(th, tw), KDLossParams())
    loss.backward()
    assert th.grad is None and tw.grad is None and h.grad is not None
