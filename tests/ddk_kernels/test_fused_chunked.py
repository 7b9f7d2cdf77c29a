"""Chunked fused lm_head + KD loss (``ddk_kernels.fused_chunked``) against the float64 oracle.

The oracle materialises the logits and differentiates ``kd_loss_reference`` with autograd
(``fused_cases.naive_loss`` on float64 inputs). Explicit ``FusedPlan`` s force several token
chunks and, for ``recompute``, several vocabulary tiles on these tiny shapes.
"""

from __future__ import annotations

import pytest
import torch

from ddk_kernels import fused_chunked
from ddk_kernels.fused_chunked import FusedPlan, fused_linear_kd, plan_fused
from ddk_kernels.types import KDConfig
from fused_cases import make_case, naive_loss
from kd_cases import DIVERGENCE_CASES, assert_close_error_relative, max_err



PLANS = {
    "token_chunks": FusedPlan("token_chunks", 5, 10**9),  # vocab tile clipped to V below
    "recompute": FusedPlan("recompute", 7, 16),
    "gemm": FusedPlan("gemm", 6, 10**9),
}


def _plan(name: str, vocab: int) -> FusedPlan:
    p = PLANS[name]
    return FusedPlan(p.strategy, p.token_chunk, min(vocab, p.vocab_tile))


def _fused(case, plan, grad_output=1.0, **opts):  # type: ignore[no-untyped-def]
    """Run the chunked backend on ``case``; returns ``(loss, ce, kd, (dh, dW, db))``."""
    h = case.h.detach().clone().requires_grad_()
    w = case.w.detach().clone().requires_grad_()
    b = None if case.b is None else case.b.detach().clone().requires_grad_()
    v = w.shape[0]
    kw = case.teacher_kwargs()
    if "teacher_weight" in kw:
        kw["teacher_weight"] = kw["teacher_weight"][:v]
    cfg = KDConfig(
        temperature=opts.pop("temperature", 1.0), divergence=opts.pop("divergence", "forward_kl"),
        beta=opts.pop("beta", 0.5),
    )
    loss, ce, kd = fused_linear_kd(h, w, case.labels, cfg, student_bias=b, plan=plan, **kw, **opts)
    (loss * grad_output).backward()
    return loss, ce, kd, (h.grad, w.grad, None if b is None else b.grad)


def _assert_matches(fused, ref, ref_grads, tol: float = 1e-10) -> None:  # type: ignore[no-untyped-def]
    loss, ce, kd, grads = fused
    assert max_err(loss, ref.loss) <= tol * (1 + float(ref.loss.abs()))
    assert max_err(ce.sum(), ref.ce_sum) <= tol * (1 + float(ref.ce_sum.abs()))
    assert max_err(kd.sum(), ref.kd_sum) <= tol * (1 + float(ref.kd_sum.abs()))
    for name, g, r in zip(("d hidden", "d weight", "d bias"), grads, ref_grads):
        if r is None:
            assert g is None
            continue
        assert g is not None and g.dtype == r.dtype
        assert max_err(g, r) <= tol * (1 + float(r.abs().max())), name


@pytest.mark.parametrize("strategy", sorted(PLANS))
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES)
def test_fused_chunked_matches_oracle_float64(strategy: str, temperature: float, divergence: str, beta: float) -> None:
    case = make_case(23, 16, 24, 97, 103, seed=3, bias=True)  # Ht != Hs, teacher vocab larger, odd V
    opts = dict(gamma=0.3, temperature=temperature, divergence=divergence, beta=beta)
    ref, ref_grads = naive_loss(case, grad_output=1.7, t2_scale=temperature != 1.0, **opts)
    fused = _fused(
        case, _plan(strategy, 97), grad_output=1.7, kd_scale=temperature**2 if temperature != 1.0 else 1.0, **opts
    )
    _assert_matches(fused, ref, ref_grads)


@pytest.mark.parametrize("strategy", sorted(PLANS))
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("jsd", 0.3)])
def test_fused_chunked_matches_oracle_teacher_logits(strategy: str, divergence: str, beta: float) -> None:
    case = make_case(19, 11, 13, 61, 64, seed=4, teacher_as_logits=True)
    ref, ref_grads = naive_loss(case, divergence=divergence, beta=beta, temperature=2.0)
    _assert_matches(_fused(case, _plan(strategy, 61), divergence=divergence, beta=beta, temperature=2.0), ref, ref_grads)


@pytest.mark.parametrize("strategy", sorted(PLANS))
def test_fused_chunked_single_token_odd_shapes(strategy: str) -> None:
    case = make_case(1, 3, 5, 7, 9, seed=5, bias=True, masked_fraction=0.0)
    ref, ref_grads = naive_loss(case, divergence="reverse_kl", temperature=0.5)
    _assert_matches(_fused(case, _plan(strategy, 7), divergence="reverse_kl", temperature=0.5), ref, ref_grads)


@pytest.mark.parametrize("strategy", sorted(PLANS))
def test_fused_chunked_fully_masked_gives_zero(strategy: str) -> None:
    case = make_case(9, 8, 8, 33, seed=6, bias=True, masked_fraction=1.0)
    loss, ce, kd, grads = _fused(case, _plan(strategy, 33), divergence="jsd")
    assert float(loss) == 0.0 and float(ce.abs().sum()) == 0.0 and float(kd.abs().sum()) == 0.0
    for g in grads:
        assert g is not None and torch.isfinite(g).all() and float(g.abs().max()) == 0.0


def test_fused_chunked_normalizer_tensor_and_gamma() -> None:
    case = make_case(21, 8, 12, 45, seed=7)
    norm = torch.tensor(37.0, dtype=torch.float64)
    ref, ref_grads = naive_loss(case, gamma=1.3, normalizer=norm, divergence="jsd", beta=0.7)
    fused = _fused(case, _plan("recompute", 45), gamma=1.3, normalizer=norm, divergence="jsd", beta=0.7)
    _assert_matches(fused, ref, ref_grads)


@pytest.mark.parametrize("strategy", sorted(PLANS))
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5)])
def test_fused_chunked_float32_error_relative(strategy: str, divergence: str, beta: float) -> None:
    case64 = make_case(33, 24, 40, 301, 310, seed=8, bias=True)
    case = case64.to(torch.float32)
    opts = dict(divergence=divergence, beta=beta, temperature=2.0)
    ref, ref_grads = naive_loss(case.to(torch.float64), **opts)
    naive, naive_grads = naive_loss(case, **opts)
    loss, _, _, grads = _fused(case, _plan(strategy, 301), **opts)
    assert_close_error_relative(loss, ref.loss, naive.loss, k=2, atol=1e-6, rtol=1e-6, what="loss")
    for name, g, r, nv in zip(("dh", "dW", "db"), grads, ref_grads, naive_grads):
        assert g.dtype == torch.float32
        assert_close_error_relative(g, r, nv, k=3, atol=1e-7, what=name)


@pytest.mark.parametrize("strategy", sorted(PLANS))
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5)])
def test_fused_chunked_bfloat16_error_relative(strategy: str, divergence: str, beta: float) -> None:
    """bf16 inputs: the fused path keeps float32 logits, the naive path rounds them to bf16."""
    case = make_case(33, 24, 40, 301, 310, seed=9, bias=True).to(torch.bfloat16)
    opts = dict(divergence=divergence, beta=beta, temperature=1.0)
    ref, ref_grads = naive_loss(case.to(torch.float64), **opts)  # oracle of the bf16-rounded inputs
    naive, naive_grads = naive_loss(case, **opts)
    loss, _, _, grads = _fused(case, _plan(strategy, 301), **opts)
    assert loss.dtype == torch.float32
    assert_close_error_relative(loss, ref.loss, naive.loss, k=2, atol=1e-5, what="loss")
    for name, g, r, nv in zip(("dh", "dW", "db"), grads, ref_grads, naive_grads):
        assert g.dtype == torch.bfloat16
        # atol: one bf16 rounding of the largest gradient entry
        assert_close_error_relative(g, r, nv, k=3, atol=float(r.abs().max()) * 2**-8, what=name)


def test_fused_chunked_second_backward_raises() -> None:
    case = make_case(5, 4, 4, 9, seed=10)
    h = case.h.clone().requires_grad_()
    loss, _, _ = fused_linear_kd(h, case.w, case.labels, KDConfig(), teacher_hidden=case.th, teacher_weight=case.tw)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward must run once per forward"):
        loss.backward()


def test_fused_chunked_without_grad_skips_gradient_sweep() -> None:
    """Under no_grad only sweep 1 runs: one student tile per vocabulary tile and chunk."""
    case = make_case(10, 4, 4, 40, seed=11, masked_fraction=0.0)
    seen: list[tuple[int, int]] = []
    fused_chunked._TILE_OBSERVER = seen.append
    try:
        with torch.no_grad():
            loss, _, _ = fused_linear_kd(
                case.h, case.w, case.labels, KDConfig(), teacher_logits=case.th @ case.tw.T,
                plan=FusedPlan("recompute", 5, 16),
            )
    finally:
        fused_chunked._TILE_OBSERVER = None
    assert not loss.requires_grad
    assert len(seen) == 2 * 3  # 2 chunks x 3 tiles (16 + 16 + 8), sweep 1 only


def test_plan_fused_heuristic() -> None:
    # large budget: the whole (chunk, V) slice fits -> token_chunks, logits computed once
    p = plan_fused(4096, 32000, strategy="auto", workspace_bytes=256 << 20)
    assert p.strategy == "token_chunks" and p.vocab_tile == 32000 and 32 <= p.token_chunk < 4096
    assert p.token_chunk * 32000 * 4 * 8 <= 256 << 20
    # small budget, large vocabulary -> recompute with tiles
    p = plan_fused(4096, 128256, strategy="auto", workspace_bytes=32 << 20)
    assert p.strategy == "recompute" and p.vocab_tile == 2048
    assert p.token_chunk * p.vocab_tile * 4 * 8 <= 32 << 20
    # few tokens: token_chunks holds them all
    assert plan_fused(50, 128256, workspace_bytes=256 << 20) == FusedPlan("token_chunks", 50, 128256)
    # explicit strategies are honoured
    assert plan_fused(4096, 32000, strategy="recompute", workspace_bytes=256 << 20).strategy == "recompute"
    assert plan_fused(4096, 32000, strategy="token_chunks", workspace_bytes=1).token_chunk == 1
    with pytest.raises(ValueError, match="strategy must be one of"):
        plan_fused(4, 4, strategy="fast")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_gemm_large_normalizer_keeps_low_precision_gradients(dtype: torch.dtype) -> None:
    """The gemm strategy's (r, V) logits gradient is in the input dtype: with 1/normalizer folded
    in, float16 entries of ~q/65536 would be subnormal (9% error in d hidden). The row backward
    gets O(1) weights and 1/normalizer is applied to the float32 results."""
    case = make_case(48, 24, 40, 301, 310, seed=13, masked_fraction=0.0, std=4.0).to(dtype)
    rel = {}
    for norm in (1.0, 65536.0):  # relative precision must not depend on the normalizer
        _, ref_grads = naive_loss(case.to(torch.float64), normalizer=norm)
        _, _, _, grads = _fused(case, FusedPlan("gemm", 16, 301), normalizer=norm)
        rel[norm] = [max_err(g, r) / float(r.abs().max()) for g, r in zip(grads[:2], ref_grads[:2])]
    for name, small, large in zip(("dh", "dW"), rel[1.0], rel[65536.0]):
        assert large <= 1.5 * small + 1e-4, f"{name}: relative error {large:.2e} at 1/65536 against {small:.2e} at 1"


def test_fused_gemm_teacher_hidden_and_weight_of_other_dtypes() -> None:
    """Teacher hidden states and lm_head weight may differ in dtype (as in the other strategies)."""
    case = make_case(20, 8, 12, 45, seed=14)
    kw = dict(teacher_hidden=case.th.float(), teacher_weight=case.tw.to(torch.bfloat16))
    h, w = case.h.float(), case.w.float()
    cfg = KDConfig()
    gemm, _, _ = fused_linear_kd(h, w, case.labels, cfg, plan=FusedPlan("gemm", 7, 45), **kw)
    tc, _, _ = fused_linear_kd(h, w, case.labels, cfg, plan=FusedPlan("token_chunks", 7, 45), **kw)
    assert torch.allclose(gemm, tc, rtol=1e-3)
