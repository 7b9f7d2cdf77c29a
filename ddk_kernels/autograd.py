"""The autograd body of the per-row KD losses, shared by the chunked, cpp and Triton Functions.

Each backend has a launcher pair on plain tensors::

    forward(student, teacher, labels, config, *opts) -> (ce (N,), kd (N,), stats)
    backward(student, teacher, labels, stats, grad_ce, grad_kd, config, *opts) -> d student (N, V)

and one explicit ``class KDLoss<Backend>Function(torch.autograd.Function)`` whose ``forward`` and
``backward`` call :func:`forward_rows` and :func:`backward_rows` with that pair. The Function
saves the inputs (no copies) and ``stats``; only ``student`` is differentiated. ``opts`` are the
launcher's extra non-tensor options (a tile size for tests).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ddk_kernels.types import KDConfig

__all__ = ["backward_rows", "forward_rows"]


def forward_rows(
    ctx: Any,
    forward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    config: KDConfig,
    *opts: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``forward`` of a row Function: runs the launcher and saves what ``backward_rows`` needs."""
    ce, kd, stats = forward(student, teacher, labels, config, *opts)
    ctx.save_for_backward(student, teacher, labels, stats)
    ctx.config = config
    ctx.opts = opts
    return ce, kd


def backward_rows(
    ctx: Any, backward: Callable[..., torch.Tensor], grad_ce: torch.Tensor, grad_kd: torch.Tensor
) -> tuple[torch.Tensor | None, ...]:
    """``backward`` of a row Function: the gradient w.r.t. ``student``, None for the other inputs."""
    nones = (None,) * (3 + len(ctx.opts))
    if not ctx.needs_input_grad[0]:
        return (None,) + nones
    student, teacher, labels, stats = ctx.saved_tensors
    # autograd materialises an unused output's gradient as zeros, so both are tensors here
    grad = backward(student, teacher, labels, stats, grad_ce, grad_kd, ctx.config, *ctx.opts)
    return (grad,) + nones
