"""The ``gemm`` strategy of the fused path (``ddk_kernels/fused_gemm.py``); its oracle suite is
tests/ddk_kernels/test_fused_linear_kd.py (``impl="chunked:gemm"``)."""

from __future__ import annotations

import pytest
import torch
from fused_cases import make_case, naive_loss
from kd_cases import max_err

from ddk_kernels.fused_chunked import fused_linear_kd
from ddk_kernels.fused_plan import FusedOptions, FusedPlan
from ddk_kernels.types import KDLossParams, TeacherInputs


def _gemm(case, rows: int, **params):  # type: ignore[no-untyped-def]
    h = case.h.detach().clone().requires_grad_()
    w = case.w.detach().clone().requires_grad_()
    loss, _, _ = fused_linear_kd(
        h,
        w,
        case.labels,
        TeacherInputs(case.th, case.tw),
        KDLossParams(**params),
        options=FusedOptions(plan=FusedPlan("gemm", rows, w.shape[0])),
    )
    loss.backward()
    return loss, (h.grad, w.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_gemm_large_normalizer_keeps_low_precision_gradients(dtype: torch.dtype) -> None:
    """The gemm strategy's (r, V) logits gradient is in the input dtype: with 1/normalizer folded
    in, float16 entries of ~q/65536 would be subnormal (9% error in d hidden). The row backward
    gets O(1) weights and 1/normalizer is applied to the float32 results."""
    case = make_case(48, 24, 40, 301, 310, seed=13, masked_fraction=0.0, std=4.0).to(dtype)
    rel = {}
    for norm in (1.0, 65536.0):  # relative precision must not depend on the normalizer
        _, ref_grads = naive_loss(case.to(torch.float64), normalizer=norm)
        _, grads = _gemm(case, 16, normalizer=norm)
        rel[norm] = [max_err(g, r) / float(r.abs().max()) for g, r in zip(grads, ref_grads[:2])]
    for name, small, large in zip(("dh", "dW"), rel[1.0], rel[65536.0]):
        assert large <= 1.5 * small + 1e-4, f"{name}: relative error {large:.2e} at 1/65536 against {small:.2e} at 1"


def test_fused_gemm_teacher_hidden_and_weight_of_other_dtypes() -> None:
    """Teacher hidden states and lm_head weight may differ in dtype (as in the other strategies)."""
    case = make_case(20, 8, 12, 45, seed=14)
    teacher = TeacherInputs(case.th.float(), case.tw.to(torch.bfloat16))
    h, w = case.h.float(), case.w.float()
    gemm, _, _ = fused_linear_kd(
        h, w, case.labels, teacher, KDLossParams(), options=FusedOptions(plan=FusedPlan("gemm", 7, 45))
    )
    tc, _, _ = fused_linear_kd(
        h, w, case.labels, teacher, KDLossParams(), options=FusedOptions(plan=FusedPlan("token_chunks", 7, 45))
    )
    assert torch.allclose(gemm, tc, rtol=1e-3)


def test_fused_gemm_needs_hidden_and_weight_of_one_dtype() -> None:
    case = make_case(4, 3, 3, 5, seed=15)
    with pytest.raises(
        TypeError, match=r"student_weight must have the dtype of student_hidden \(torch.float32\) for strategy='gemm'"
    ):
        fused_linear_kd(
            case.h.float(),
            case.w,
            case.labels,
            TeacherInputs(case.th, case.tw),
            KDLossParams(),
            options=FusedOptions(plan=FusedPlan("gemm", 2, 5)),
        )
