"""The compiled backend of the KD loss: ops ``torch.ops.ddk.kd_fwd`` / ``kd_bwd`` from ``ddk_kernels._C``.

The extension is loaded lazily on first use; when it is missing (not built, no compiler) the
backend reports itself unavailable with the reason instead of failing at import. CPU kernels are
in ``csrc/kd_loss_cpu.cpp``; the CUDA kernels of the same ops, where built, in ``csrc/cuda/``.

Op ladder: ``kd_forward`` / ``kd_backward`` (plain tensors) -> ``KDLossCppFunction`` (autograd) ->
``row_losses`` (the backend contract of ``ddk_kernels.dispatch``, ``ROW_KERNELS``). The ops check
their inputs with the rules of the Python boundary (``csrc/kd_checks.h``).
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from ddk_kernels.autograd import backward_rows, forward_rows
from ddk_kernels.types import KDConfig, RowKernels, acc_dtype

__all__ = [
    "ROW_KERNELS",
    "KDLossCppFunction",
    "is_available",
    "kd_backward",
    "kd_forward",
    "load_extension",
    "row_losses",
]

_state: dict[str, Any] = {"loaded": None, "reason": ""}


def load_extension() -> tuple[bool, str]:
    """Import ``ddk_kernels._C`` once (registering the ops and their fake kernels).

    Returns:
        ``(True, "")`` if the ops are registered, else ``(False, reason)``.
    """
    if _state["loaded"] is None:
        try:
            importlib.import_module("ddk_kernels._C")
        except Exception as exc:
            _state["loaded"] = False
            _state["reason"] = (
                f"the compiled extension ddk_kernels._C is not importable ({exc}); "
                "build it with `make setup` (pip install --no-build-isolation -e .)"
            )
        else:
            _register_fakes()
            _state["loaded"] = True
    return bool(_state["loaded"]), str(_state["reason"])


def _register_fakes() -> None:
    """Shape/dtype-only (meta) kernels so torch.compile and FakeTensor trace the ops."""

    def kd_fwd_fake(
        student: torch.Tensor,
        teacher: torch.Tensor,
        labels: torch.Tensor,
        temperature: float,
        divergence: int,
        beta: float,
        ignore_index: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = student.shape[0]
        acc = acc_dtype(student.dtype)
        return (
            student.new_empty((n,), dtype=acc),
            student.new_empty((n,), dtype=acc),
            student.new_empty((n, 4), dtype=torch.float64),
        )

    def kd_bwd_fake(
        student: torch.Tensor,
        teacher: torch.Tensor,
        labels: torch.Tensor,
        stats: torch.Tensor,
        grad_ce: torch.Tensor,
        grad_kd: torch.Tensor,
        temperature: float,
        divergence: int,
        beta: float,
        ignore_index: int,
    ) -> torch.Tensor:
        return torch.empty(student.shape, dtype=student.dtype, device=student.device)

    for name, fn in (("ddk::kd_fwd", kd_fwd_fake), ("ddk::kd_bwd", kd_bwd_fake)):
        try:
            torch.library.register_fake(name, fn)
        except RuntimeError as exc:  # already registered (module reloaded): keep the first one
            if "already" not in str(exc):
                raise


def is_available(device: torch.device | str) -> tuple[bool, str]:
    """Whether the compiled ops run on ``device``: ``(ok, reason_if_not)``.

    CPU needs the extension; CUDA also needs it to have been built with the CUDA kernels.
    """
    device = torch.device(device)
    ok, reason = load_extension()
    if not ok:
        return False, reason
    if device.type == "cpu":
        return True, ""
    if device.type == "cuda":
        if torch._C._dispatch_has_kernel_for_dispatch_key("ddk::kd_fwd", "CUDA"):
            return True, ""
        return False, "ddk_kernels._C was built without CUDA kernels (torch without CUDA or no nvcc at build time)"
    return False, f"no compiled kernels for device type {device.type!r}"


def kd_forward(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, config: KDConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ce (N,), kd (N,), stats (N, 4))``: ce and kd float32 (float64 for float64 inputs), stats
    float64 (``[lse(zS/T), lse(zT/T), lse(zS), extra]``); no autograd."""
    return torch.ops.ddk.kd_fwd(
        student, teacher, labels, float(config.temperature), config.code, float(config.beta), int(config.ignore_index)
    )


def kd_backward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    stats: torch.Tensor,
    grad_ce: torch.Tensor,
    grad_kd: torch.Tensor,
    config: KDConfig,
) -> torch.Tensor:
    """``(N, V)`` gradient w.r.t. ``student`` in its dtype, of ``sum(grad_ce * ce + grad_kd * kd)``."""
    return torch.ops.ddk.kd_bwd(
        student,
        teacher,
        labels,
        stats,
        grad_ce,
        grad_kd,
        float(config.temperature),
        config.code,
        float(config.beta),
        int(config.ignore_index),
    )


class KDLossCppFunction(torch.autograd.Function):
    """Autograd of the compiled row losses: ``apply(student, teacher, labels, config) -> (ce, kd)``;
    saves only the inputs (no copies) and ``stats``."""

    @staticmethod
    def forward(
        ctx: Any, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, config: KDConfig
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return forward_rows(ctx, kd_forward, student, teacher, labels, config)

    @staticmethod
    def backward(ctx: Any, grad_ce: torch.Tensor, grad_kd: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return backward_rows(ctx, kd_backward, grad_ce, grad_kd)


def row_losses(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, config: KDConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(ce (N,), kd (N,))`` of the compiled backend (see ``ddk_kernels.dispatch``).

    Args:
        student_logits: ``(N, V)`` float32/bfloat16/float16/float64, last dim contiguous.
        teacher_logits: ``(N, V)``, may be a column slice of a wider tensor; cast to the student's
            dtype if it differs (a copy), never differentiated.
        labels: ``(N,)`` int64; ``config.ignore_index`` rows give 0.
        config: temperature, divergence (``effective_divergence`` picks the op code), beta.

    Returns:
        ``(ce, kd)`` float32 (float64 for float64 inputs), differentiable w.r.t. ``student_logits``.
    """
    ok, reason = load_extension()
    if not ok:
        raise RuntimeError(f"cpp backend: {reason}")
    teacher = teacher_logits.detach()
    if teacher.dtype != student_logits.dtype:
        teacher = teacher.to(student_logits.dtype)
    if labels.dtype != torch.long:
        labels = labels.long()
    return KDLossCppFunction.apply(student_logits, teacher, labels, config)


#: the compiled backend of the per-row op (``backend="cpp"``).
ROW_KERNELS = RowKernels(row_losses, kd_forward, kd_backward)
