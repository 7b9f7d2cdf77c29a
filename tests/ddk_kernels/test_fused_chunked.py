"""What is specific to the chunked fused launcher and its autograd Function
(``ddk_kernels/fused_chunked.py``); its oracle suite is tests/ddk_kernels/test_fused_linear_kd.py."""

from __future__ import annotations

import pytest
import torch
from fused_cases import make_case

from ddk_kernels.fused_chunked import (
    FusedLinearKDChunkedFunction,
    fused_linear_kd,
    fused_linear_kd_forward,
)
from ddk_kernels.fused_plan import FusedOptions, FusedPlan
from ddk_kernels.types import KDLossParams, TeacherInputs


def _teacher(case) -> TeacherInputs:  # type: ignore[no-untyped-def]
    return TeacherInputs(logits=case.tl) if case.tl is not None else TeacherInputs(case.th, case.tw)


def test_fused_chunked_second_backward_raises() -> None:
    case = make_case(5, 4, 4, 9, seed=10)
    h = case.h.clone().requires_grad_()
    loss, _, _ = fused_linear_kd(h, case.w, case.labels, _teacher(case), KDLossParams())
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward must run once per forward"):
        loss.backward()


def test_fused_chunked_without_grad_skips_gradient_sweep() -> None:
    """Under no_grad only sweep 1 runs: one student tile per vocabulary tile and chunk."""
    case = make_case(10, 4, 4, 40, seed=11, masked_fraction=0.0)
    seen: list[tuple[int, int]] = []
    options = FusedOptions(plan=FusedPlan("recompute", 5, 16), tile_observer=seen.append)
    with torch.no_grad():
        loss, _, _ = fused_linear_kd(
            case.h, case.w, case.labels, TeacherInputs(logits=case.th @ case.tw.T), KDLossParams(), options=options
        )
    assert not loss.requires_grad
    assert seen == [(5, 16), (5, 16), (5, 8)] * 2  # 2 chunks x 3 tiles (16 + 16 + 8), sweep 1 only


@pytest.mark.parametrize(("strategy", "sweeps"), [("recompute", 2), ("token_chunks", 1), ("gemm", 1)])
def test_fused_chunked_tiles_follow_the_plan(strategy: str, sweeps: int) -> None:
    """The tile observer sees every logits tile: never more than ``token_chunk x vocab_tile``,
    ignored tokens dropped first, and a recompute sweep per gradient pass."""
    case = make_case(30, 6, 6, 50, seed=12, masked_fraction=0.3)
    nv = int((case.labels != -100).sum())
    seen: list[tuple[int, int]] = []
    plan = FusedPlan(strategy, 8, 20 if strategy == "recompute" else 50)
    h = case.h.clone().requires_grad_()
    loss, _, _ = fused_linear_kd(
        h,
        case.w,
        case.labels,
        _teacher(case),
        KDLossParams(),
        options=FusedOptions(plan=plan, tile_observer=seen.append),
    )
    loss.backward()
    assert max(r for r, _ in seen) <= 8 and max(c for _, c in seen) == plan.vocab_tile
    assert sum(r * c for r, c in seen) == sweeps * nv * 50


def test_fused_chunked_launcher_computes_only_the_requested_gradients() -> None:
    case = make_case(12, 5, 5, 21, seed=13, bias=True)
    loss, ce, kd, (dh, dw, db) = fused_linear_kd_forward(
        case.h, case.w, case.b, case.labels, _teacher(case), KDLossParams(), need_grads=(False, True, False)
    )
    assert dh is None and db is None and dw is not None and dw.shape == case.w.shape
    assert loss.dim() == 0 and ce.shape == kd.shape == (12,)
    _, _, _, grads = fused_linear_kd_forward(case.h, case.w, None, case.labels, _teacher(case), KDLossParams())
    assert grads[2] is None  # no bias, no bias gradient


def test_fused_chunked_function_is_an_explicit_class() -> None:
    assert issubclass(FusedLinearKDChunkedFunction, torch.autograd.Function)
    assert FusedLinearKDChunkedFunction.__module__ == "ddk_kernels.fused_chunked"
