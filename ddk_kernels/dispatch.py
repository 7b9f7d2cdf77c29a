"""The one place where a backend of the KD loss is chosen.

Every backend exposes the same per-row contract::

    row_losses(student_logits (N, V), teacher_logits (N, V), labels (N,), config: KDConfig)
        -> (ce (N,), kd (N,))

differentiable w.r.t. ``student_logits`` (float32 results for float32/bfloat16/float16 inputs,
float64 for float64), zero on ignored rows. ``teacher_logits`` may be a column slice of a wider
tensor (row stride larger than V). The reduction to ``KDLossOutput`` is shared
(``ddk_kernels.reduce``).

``backend="auto"`` picks the fastest available backend for the device; the ``DDK_BACKEND``
environment variable overrides that choice. The fused ``lm_head`` + KD loss has its own, smaller
set of backends (``FUSED_BACKENDS``), resolved by ``resolve_fused_backend``. An explicit backend that cannot run raises a
``RuntimeError`` naming the backends that can.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from ddk_kernels.types import KDConfig

RowLossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, KDConfig], "tuple[torch.Tensor, torch.Tensor]"]

BACKENDS: tuple[str, ...] = ("reference", "chunked", "cpp", "triton")
_AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("cpp", "chunked", "reference"),
    "cuda": ("triton", "cpp", "chunked", "reference"),
}


def _reference_row_losses(zs, zt, labels, config):  # type: ignore[no-untyped-def]
    from ddk_kernels.reference import kd_row_losses_reference

    return kd_row_losses_reference(zs, zt, labels, config)


def _probe(name: str, device: torch.device) -> tuple[RowLossFn | None, str]:
    """Return ``(row_losses, "")`` if backend ``name`` runs on ``device`` else ``(None, reason)``."""
    if name == "reference":
        return _reference_row_losses, ""
    try:
        if name == "chunked":
            from ddk_kernels import chunked as mod
        elif name == "cpp":
            from ddk_kernels import cpp as mod  # type: ignore[no-redef]
        elif name == "triton":
            from ddk_kernels import triton as mod  # type: ignore[no-redef]
        else:
            return None, f"unknown backend {name!r}"
    except ImportError as exc:  # the backend module itself is not there yet or lacks a dependency
        return None, f"cannot import ({exc})"
    ok, reason = mod.is_available(device)
    return (mod.row_losses if ok else None), reason


def available_backends(device: torch.device | str = "cpu") -> dict[str, str]:
    """Map every backend name to ``""`` if it runs on ``device``, else to the reason it cannot."""
    device = torch.device(device)
    return {name: _probe(name, device)[1] for name in BACKENDS}


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """Resolve ``"auto"`` (or ``DDK_BACKEND``) to a concrete backend name that runs on ``device``."""
    return _resolve(backend, torch.device(device))[0]


def _resolve(backend: str, device: torch.device) -> tuple[str, RowLossFn]:
    """``(name, row_losses)`` of ``backend`` on ``device``; probes each candidate once."""
    if backend == "auto":
        env = os.environ.get("DDK_BACKEND", "").strip()
        if env and env != "auto":
            backend = env
        else:
            for name in _AUTO_ORDER.get(device.type, ("chunked", "reference")):
                fn = _probe(name, device)[0]
                if fn is not None:
                    return name, fn
            return "reference", _reference_row_losses
    if backend not in BACKENDS:
        raise ValueError(
            f"kd_loss: backend must be one of {('auto',) + BACKENDS}; got {backend!r}."
        )
    fn, reason = _probe(backend, device)
    if fn is None:
        runnable = [n for n, r in available_backends(device).items() if not r]
        raise RuntimeError(
            f"kd_loss: backend {backend!r} cannot run on {device.type}: {reason}. "
            f"Available there: {runnable}; use backend='auto' to pick the fastest."
        )
    return backend, fn


# ---------------------------------------------------------------- fused lm_head + KD loss
FUSED_BACKENDS: tuple[str, ...] = ("reference", "chunked", "triton")
_FUSED_AUTO_ORDER: dict[str, tuple[str, ...]] = {"cpu": ("chunked",), "cuda": ("chunked", "triton")}


def _fused_backend_reason(name: str, device: torch.device) -> str:
    """``""`` if fused backend ``name`` runs on ``device``, else why not."""
    if name in ("reference", "chunked"):
        return ""
    if name == "triton":
        try:
            from ddk_kernels import triton as triton_pkg
        except ImportError as exc:
            return f"cannot import ({exc})"
        ok, reason = triton_pkg.is_available(device)
        if not ok:
            return reason
        try:
            import ddk_kernels.triton.fused_linear_kd  # noqa: F401
        except ImportError as exc:
            return f"cannot import ddk_kernels.triton.fused_linear_kd ({exc})"
        return ""
    return f"no fused implementation (fused backends: {FUSED_BACKENDS})"


def resolve_fused_backend(backend: str, device: torch.device | str) -> str:
    """Resolve the backend of ``fused_linear_kd_loss`` to one that runs on ``device``.

    ``"auto"`` takes ``DDK_BACKEND`` when it names a fused backend (``"reference"``,
    ``"chunked"``, ``"triton"``; other values, e.g. ``"cpp"`` which has no fused kernel, are
    ignored here), else the first runnable of ``triton, chunked`` on CUDA and ``chunked`` on CPU
    (Triton on CPU runs only under ``TRITON_INTERPRET=1`` and is never auto-picked there).
    An explicit backend that cannot run raises ``RuntimeError`` naming the ones that can; an
    unknown name raises ``ValueError``.

    """
    device = torch.device(device)
    if backend == "auto":
        env = os.environ.get("DDK_BACKEND", "").strip()
        if env in FUSED_BACKENDS:
            backend = env
        else:
            for name in _FUSED_AUTO_ORDER.get(device.type, ("chunked",)):
                if not _fused_backend_reason(name, device):
                    return name
            return "chunked"
    if backend not in FUSED_BACKENDS:
        raise ValueError(f"fused_linear_kd_loss: backend must be one of {('auto',) + FUSED_BACKENDS}; got {backend!r}.")
    reason = _fused_backend_reason(backend, device)
    if reason:
        runnable = [n for n in FUSED_BACKENDS if not _fused_backend_reason(n, device)]
        raise RuntimeError(
            f"fused_linear_kd_loss: backend {backend!r} cannot run on {device.type}: {reason}. "
            f"Available there: {runnable}; use backend='auto' to pick the fastest."
        )
    return backend


def get_row_losses(backend: str, device: torch.device | str) -> RowLossFn:
    """The ``row_losses`` function of ``backend`` (``"auto"`` allowed) for ``device``."""
    return _resolve(backend, torch.device(device))[1]
