"""The one autograd body of the per-row KD losses, shared by the chunked, cpp and Triton backends.

Each backend has a launcher pair on plain tensors::

    forward(student, teacher, labels, config, *opts) -> (ce (N,), kd (N,), stats (N, 4))
    backward(student, teacher, labels, stats, grad_ce, grad_kd, config, *opts) -> d student (N, V)

and ``row_loss_function`` turns it into an ``torch.autograd.Function`` with a unique, backend-named
class (CONVENTIONS.md 1). The Function saves the inputs (no copies) and ``stats``; only
``student`` is differentiated. ``opts`` are extra non-tensor launcher options (e.g. tile sizes).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ddk_kernels.types import KDConfig

__all__ = ["apply_fused", "fused_loss_function", "row_loss_function"]


def row_loss_function(
    name: str,
    forward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    backward: Callable[..., torch.Tensor],
) -> type[torch.autograd.Function]:
    """An autograd Function ``name``: ``apply(student, teacher, labels, config, *opts) -> (ce, kd)``."""

    def fwd(ctx: Any, student, teacher, labels, config, *opts):  # type: ignore[no-untyped-def]
        ce, kd, stats = forward(student, teacher, labels, config, *opts)
        ctx.save_for_backward(student, teacher, labels, stats)
        ctx.config = config
        ctx.opts = opts
        return ce, kd

    def bwd(ctx: Any, grad_ce: torch.Tensor, grad_kd: torch.Tensor):  # type: ignore[no-untyped-def]
        nones = (None,) * (3 + len(ctx.opts))
        if not ctx.needs_input_grad[0]:
            return (None,) + nones
        student, teacher, labels, stats = ctx.saved_tensors
        # autograd materialises an unused output's gradient as zeros, so both are tensors here
        grad = backward(student, teacher, labels, stats, grad_ce, grad_kd, ctx.config, *ctx.opts)
        return (grad,) + nones

    doc = f"Autograd of the per-row KD losses with ``{forward.__module__}.{forward.__name__}`` / ``{backward.__name__}``."
    return type(name, (torch.autograd.Function,), {
        "__doc__": doc, "__module__": forward.__module__,
        "forward": staticmethod(fwd), "backward": staticmethod(bwd),
    })


def fused_epilogue(
    ce_rows: torch.Tensor,
    kd_rows: torch.Tensor,
    norm: torch.Tensor,
    gamma: float,
    kd_scale: float,
    grads: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
    like: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Common end of every fused launcher: the scalar loss and gradients cast to their inputs' dtypes.

    Args:
        ce_rows, kd_rows: ``(N,)`` per-row CE and divergence (accumulation dtype).
        norm: 0-dim denominator of the loss.
        gamma, kd_scale: weight and extra factor (``T**2`` or 1) of the divergence.
        grads: ``(d hidden, d weight, d bias)``, each None when not needed.
        like: ``(student_hidden, student_weight, student_bias)`` whose dtypes the gradients take.

    Returns:
        ``(loss, ce_rows, kd_rows, d hidden, d weight, d bias)``: the launcher contract.
    """
    loss = (ce_rows.sum() + (float(gamma) * float(kd_scale)) * kd_rows.sum()) / norm
    cast = tuple(
        None if g is None or ref is None else (g if g.dtype == ref.dtype else g.to(ref.dtype))
        for g, ref in zip(grads, like)
    )
    return (loss, ce_rows, kd_rows) + cast  # type: ignore[return-value]


def fused_loss_function(name: str, launcher: Callable[..., tuple]) -> type[torch.autograd.Function]:  # type: ignore[type-arg]
    """An autograd Function ``name`` around a fused ``lm_head`` + KD launcher.

    ``apply(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
    teacher_logits, labels, config, gamma, kd_scale, normalizer, opts) -> (loss, ce (N,), kd (N,))``
    calls ``launcher(student_hidden, student_weight, labels, config, teacher_...=, student_bias=,
    gamma=, kd_scale=, normalizer=, need_grads=, **opts)``, which returns
    ``(loss, ce, kd, d_hidden, d_weight, d_bias)``. The gradients are computed in the forward pass
    (the loss is a scalar); the backward scales them by ``grad_output`` in place, so one backward
    per forward. Only ``loss`` is differentiable; the teacher never is.
    """

    def fwd(  # type: ignore[no-untyped-def]
        ctx: Any, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_logits,
        labels, config, gamma, kd_scale, normalizer, opts,
    ):
        need = tuple(bool(x) for x in ctx.needs_input_grad[:3])
        loss, ce, kd, dh, dw, db = launcher(
            student_hidden, student_weight, labels, config,
            teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, teacher_logits=teacher_logits,
            student_bias=student_bias, gamma=gamma, kd_scale=kd_scale, normalizer=normalizer,
            need_grads=need, **opts,
        )
        ctx.grads = [dh, dw, db]
        ctx.mark_non_differentiable(ce, kd)
        return loss, ce, kd

    def bwd(ctx: Any, grad_loss: torch.Tensor, _grad_ce: torch.Tensor, _grad_kd: torch.Tensor):  # type: ignore[no-untyped-def]
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
        return (grads[0], grads[1], grads[2]) + (None,) * 9

    doc = f"Autograd of the fused lm_head + KD loss with ``{launcher.__module__}.{launcher.__name__}``."
    return type(name, (torch.autograd.Function,), {
        "__doc__": doc, "__module__": launcher.__module__,
        "forward": staticmethod(fwd), "backward": staticmethod(bwd),
    })


def apply_fused(
    function: type[torch.autograd.Function],
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    labels: torch.Tensor,
    config: KDConfig,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    gamma: float = 0.2,
    kd_scale: float = 1.0,
    normalizer: float | torch.Tensor | None = None,
    **opts: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backend contract of the fused op: ``(loss (differentiable 0-dim), ce (N,), kd (N,))``.

    Detaches the teacher tensors and calls ``function.apply``; ``opts`` go to the launcher.
    """

    def detached(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach()

    return function.apply(  # type: ignore[no-any-return]
        student_hidden, student_weight, student_bias, detached(teacher_hidden), detached(teacher_weight),
        detached(teacher_logits), labels, config, float(gamma), float(kd_scale), normalizer, opts,
    )
