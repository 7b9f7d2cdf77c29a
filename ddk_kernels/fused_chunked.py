"""Fused ``lm_head`` + KD loss in pure torch, tiled over tokens and vocabulary ("chunked" backend).

The op ladder: ``fused_linear_kd_forward`` (launcher on plain tensors; it also
produces the gradients) -> ``FusedLinearKDChunkedFunction`` (autograd) -> ``fused_linear_kd``
(the backend contract, resolved by ``ddk_kernels.dispatch`` for ``ddk.fused_linear_kd_loss``).

The launcher drops ignored tokens (one host sync, ``nonzero``), plans the tiling
(``ddk_kernels.fused_plan``) and runs one strategy: token_chunks / recompute
(``ddk_kernels.fused_rows``) or gemm (``ddk_kernels.fused_gemm``). The loss is a scalar, so the
per-token weights ``w_ce = 1 / normalizer`` and ``w_kd = gamma * s / normalizer``
(``ddk_kernels.reduce``) are known in the forward pass: the gradients are computed there and the
backward only scales them by ``grad_output``.

Examples:
    >>> import torch
    >>> from ddk_kernels.types import KDLossParams, TeacherInputs
    >>> h, w = torch.randn(6, 4, requires_grad=True), torch.randn(10, 4)
    >>> teacher = TeacherInputs(logits=torch.randn(6, 12))
    >>> loss, ce, kd = fused_linear_kd(h, w, torch.tensor([1, 2, -100, 3, 4, 5]), teacher, KDLossParams())
    >>> loss.backward()
    >>> tuple(h.grad.shape), float(ce[2]), float(h.grad[2].abs().sum())
    ((6, 4), 0.0, 0.0)
"""

from __future__ import annotations

from typing import Any

import torch

from ddk_kernels.fused_gemm import run_gemm_chunks
from ddk_kernels.fused_plan import FusedOptions, plan_fused
from ddk_kernels.fused_rows import FusedBatch, FusedBuffers, run_token_chunks
from ddk_kernels.reduce import combine, denominator, gradient_weights
from ddk_kernels.types import KDLossParams, TeacherInputs, acc_dtype

__all__ = ["FusedLinearKDChunkedFunction", "fused_linear_kd", "fused_linear_kd_forward", "is_available"]

Grads = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


def is_available(device: torch.device | str) -> tuple[bool, str]:
    """The chunked fused path is plain torch: it runs on every device."""
    return True, ""


def fused_linear_kd_forward(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    labels: torch.Tensor,
    teacher: TeacherInputs,
    params: KDLossParams,
    options: FusedOptions = FusedOptions(),
    need_grads: tuple[bool, bool, bool] = (True, True, True),
    student_softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Grads]:
    """Loss, per-row values and (optionally) gradients of the fused lm_head + KD loss.

    Args:
        student_hidden: ``(N, Hs)`` float32/bfloat16/float16/float64.
        student_weight: ``(V, Hs)`` same device.
        student_bias: ``(V,)`` or None.
        labels: ``(N,)`` int64; ``params.config.ignore_index`` rows contribute nothing.
        teacher: ``hidden (N, Ht)`` + ``weight (Vt, Ht)`` (+ ``bias (Vt,)``, ``softcap``) or
            ``logits (N, Vt)``, ``Vt >= V`` (rows / columns beyond V are never read).
        params: the loss options (row options, gamma, ``T**2`` scaling, normaliser).
        options: strategy, workspace, explicit plan, tile observer (``ddk_kernels.fused_plan``).
        need_grads: which of ``(d hidden, d weight, d bias)`` to compute.
        student_softcap: the student's final logit softcap ``c`` (``c * tanh(z / c)``) or None.

    Returns:
        ``(loss, ce, kd, (d_hidden, d_weight, d_bias))``: ``loss`` 0-dim in the compute dtype
        (float32; float64 for float64 inputs), ``ce`` and ``kd`` ``(N,)`` (0 on ignored rows),
        gradients of ``loss`` in the dtype of their inputs (``d_hidden`` is 0 on ignored rows) or
        None where not requested.
    """
    n, hs = student_hidden.shape
    vocab = student_weight.shape[0]
    dev = student_hidden.device
    cd = acc_dtype(student_hidden.dtype)
    valid = labels != params.config.ignore_index
    rows = valid.nonzero().squeeze(1)  # the one host sync: ignored tokens are dropped up front
    nv = int(rows.numel())
    norm = denominator(params, valid.sum(), cd)
    need_dh, need_dw, need_db = need_grads
    out = FusedBuffers(
        ce=torch.zeros(n, dtype=cd, device=dev),
        kd=torch.zeros(n, dtype=cd, device=dev),
        dh=torch.zeros(n, hs, dtype=cd, device=dev) if need_dh else None,
        dw=torch.zeros(vocab, hs, dtype=cd, device=dev) if need_dw else None,
        db=torch.zeros(vocab, dtype=cd, device=dev) if need_db and student_bias is not None else None,
    )
    plan = options.plan or plan_fused(
        nv,
        vocab,
        compute_bytes=torch.finfo(cd).bits // 8,
        strategy=options.strategy,
        workspace_bytes=options.workspace_bytes,
        device=dev,
        input_bytes=student_hidden.element_size(),
        gemm_ok=student_weight.dtype == student_hidden.dtype,
    )
    batch = FusedBatch(student_hidden, student_weight, student_bias, labels, rows, teacher, student_softcap)
    run = run_gemm_chunks if plan.strategy == "gemm" else run_token_chunks
    run(batch, params.config, gradient_weights(norm, params), plan, out, options.tile_observer)
    loss = combine(out.ce.sum(), out.kd.sum(), norm, params)

    def in_dtype_of(g: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
        return None if g is None or like is None else g.to(like.dtype)

    grads = (
        in_dtype_of(out.dh, student_hidden),
        in_dtype_of(out.dw, student_weight),
        in_dtype_of(out.db, student_bias),
    )
    return loss, out.ce, out.kd, grads


class FusedLinearKDChunkedFunction(torch.autograd.Function):
    """Autograd of the chunked launcher: ``apply(student_hidden, student_weight, student_bias,
    labels, teacher, params, options, student_softcap) -> (loss, ce (N,), kd (N,))``.

    The forward computes loss and gradients; the backward scales them by ``grad_output`` in
    place (so one backward per forward). Only ``loss`` is differentiable; the teacher never is.
    """

    @staticmethod
    def forward(
        ctx: Any,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        student_bias: torch.Tensor | None,
        labels: torch.Tensor,
        teacher: TeacherInputs,
        params: KDLossParams,
        options: FusedOptions,
        student_softcap: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        need = (bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]), bool(ctx.needs_input_grad[2]))
        loss, ce, kd, grads = fused_linear_kd_forward(
            student_hidden, student_weight, student_bias, labels, teacher, params, options, need, student_softcap
        )
        ctx.grads = list(grads)
        ctx.mark_non_differentiable(ce, kd)
        return loss, ce, kd

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, _grad_ce: torch.Tensor, _grad_kd: torch.Tensor) -> tuple[Any, ...]:
        grads = ctx.grads
        if grads is None:
            raise RuntimeError(
                "fused_linear_kd_loss: backward must run once per forward (the gradients were "
                "computed in the forward pass and already handed to autograd); got a second backward."
            )
        ctx.grads = None
        for g in grads:
            if g is not None:
                g.mul_(grad_loss.to(g.dtype))  # we own g: scale in place, no extra (V, H) buffer
        return grads[0], grads[1], grads[2], None, None, None, None, None


def fused_linear_kd(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    labels: torch.Tensor,
    teacher: TeacherInputs,
    params: KDLossParams,
    *,
    student_bias: torch.Tensor | None = None,
    options: FusedOptions = FusedOptions(),
    student_softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backend contract of the fused op: ``(loss (differentiable 0-dim), ce (N,), kd (N,))``.

    Inputs as :func:`fused_linear_kd_forward`, already validated; the teacher is detached.
    """
    return FusedLinearKDChunkedFunction.apply(
        student_hidden, student_weight, student_bias, labels, teacher.detached(), params, options, student_softcap
    )
