"""The one place where a backend of an op is chosen: one table, one rule, one error path.

:data:`TABLE` maps each op to its backends and each backend to where its implementation lives:

* ``"kd_rows"`` (the per-row CE and divergence on given logits, used by ``ddk.kd_loss`` and by
  the fused ``gemm`` strategy): a ``RowKernels`` (``row_losses`` with autograd, plus the
  ``forward`` / ``backward`` launchers);
* ``"fused_linear_kd"`` (``lm_head`` + KD loss without ``(N, V)`` logits, used by
  ``ddk.fused_linear_kd_loss``): ``fused_linear_kd(student_hidden, student_weight, labels,
  teacher, params, *, student_bias, options) -> (loss, ce, kd)``;
* ``"sparse_kd"`` / ``"fused_linear_sparse_kd"`` (the sparse loss against a cached top-k
  teacher, on logits or fused with the ``lm_head``, used by ``ddk.sparse_kd_loss`` and
  ``ddk.fused_linear_sparse_kd_loss``; see ``ddk_kernels.sparse``).

:func:`resolve` picks one: ``backend="auto"`` takes the first backend of :data:`AUTO_ORDER` for
the device type that the op has and that runs there. The ``DDK_BACKEND`` environment variable,
when set (and not ``"auto"``), replaces ``"auto"`` for every op that has that backend and is
ignored by the ops that do not; a name no op has is an error. An explicit backend (or
``DDK_BACKEND``) that cannot run on the device raises ``RuntimeError`` naming the ones that can;
a name the op does not have raises ``ValueError``. Implementation modules are imported only
once their backend is known to run (Triton and the compiled extension stay optional).

Examples:
    >>> import torch
    >>> from ddk_kernels.types import KDConfig
    >>> rows = resolve("kd_rows", "chunked", "cpu")
    >>> ce, kd = rows.row_losses(torch.zeros(2, 5), torch.zeros(2, 5), torch.tensor([1, -100]), KDConfig())
    >>> round(float(ce[0]), 4), float(kd[0]), float(ce[1])
    (1.6094, 0.0, 0.0)
    >>> resolve_backend("reference", "cpu", op="fused_linear_kd")
    'reference'
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch

from ddk_kernels.types import RowKernels

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "OPS",
    "TABLE",
    "Op",
    "available_backends",
    "backend_report",
    "resolve",
    "resolve_backend",
]

Op = Literal["kd_rows", "fused_linear_kd", "sparse_kd", "fused_linear_sparse_kd"]
FusedKernel = Callable[..., "tuple[torch.Tensor, torch.Tensor, torch.Tensor]"]


@dataclass(frozen=True)
class BackendEntry:
    """Where one backend of one op lives.

    Attributes:
        probe: module whose ``is_available(device) -> (ok, reason)`` says whether the backend runs
            on a device; importing it needs only torch.
        implementation: ``"module:attribute"`` of the implementation, imported once the probe
            says the backend runs.
    """

    probe: str
    implementation: str

    def load(self) -> Any:
        module, _, attribute = self.implementation.partition(":")
        return getattr(importlib.import_module(module), attribute)


TABLE: dict[Op, dict[str, BackendEntry]] = {
    "kd_rows": {
        "reference": BackendEntry("ddk_kernels.reference", "ddk_kernels.reference:ROW_KERNELS"),
        "chunked": BackendEntry("ddk_kernels.chunked", "ddk_kernels.chunked:ROW_KERNELS"),
        "cpp": BackendEntry("ddk_kernels.cpp", "ddk_kernels.cpp:ROW_KERNELS"),
        "triton": BackendEntry("ddk_kernels.triton", "ddk_kernels.triton.kd_loss:ROW_KERNELS"),
    },
    "fused_linear_kd": {
        "reference": BackendEntry("ddk_kernels.reference", "ddk_kernels.reference:fused_linear_kd_reference"),
        "chunked": BackendEntry("ddk_kernels.fused_chunked", "ddk_kernels.fused_chunked:fused_linear_kd"),
    },
    "sparse_kd": {
        "reference": BackendEntry("ddk_kernels.reference", "ddk_kernels.reference:sparse_kd_reference"),
        "chunked": BackendEntry("ddk_kernels.sparse", "ddk_kernels.sparse:sparse_kd"),
    },
    "fused_linear_sparse_kd": {
        "reference": BackendEntry("ddk_kernels.reference", "ddk_kernels.reference:fused_linear_sparse_kd_reference"),
        "chunked": BackendEntry("ddk_kernels.sparse", "ddk_kernels.sparse:fused_linear_sparse_kd"),
    },
}
#: the public function of each op, named in error messages.
OPS: dict[Op, str] = {
    "kd_rows": "kd_loss",
    "fused_linear_kd": "fused_linear_kd_loss",
    "sparse_kd": "sparse_kd_loss",
    "fused_linear_sparse_kd": "fused_linear_sparse_kd_loss",
}
#: every backend name of any op.
BACKENDS: tuple[str, ...] = tuple(dict.fromkeys(name for entries in TABLE.values() for name in entries))
#: fastest first, per device type; an op skips the backends it does not have. On CUDA Triton and
#: the CUDA kernels of cpp are within a few percent of each other (bench/README.md).
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("cpp", "chunked", "reference"),
    "cuda": ("triton", "cpp", "chunked", "reference"),
}
_OTHER_DEVICES = ("chunked", "reference")


def _reason(op: Op, name: str, device: torch.device) -> str:
    """``""`` if backend ``name`` of ``op`` runs on ``device``, else why not."""
    try:
        probe = importlib.import_module(TABLE[op][name].probe)
    except ImportError as exc:  # the backend module lacks a dependency
        return f"cannot import ({exc})"
    ok, reason = probe.is_available(device)
    return "" if ok else (reason or "unavailable")


def available_backends(device: torch.device | str = "cpu", op: Op = "kd_rows") -> dict[str, str]:
    """Map every backend of ``op`` to ``""`` if it runs on ``device``, else to the reason it cannot."""
    device = torch.device(device)
    return {name: _reason(op, name, device) for name in TABLE[op]}


def _choose(op: Op, backend: str, device: torch.device) -> str:
    fn = OPS[op]
    names = tuple(TABLE[op])
    if backend == "auto":
        env = os.environ.get("DDK_BACKEND", "").strip()
        if env and env != "auto":
            if env not in BACKENDS:
                choices = ("auto",) + BACKENDS
                raise ValueError(f"{fn}: backend must be one of {choices}; got {env!r} (from DDK_BACKEND).")
            if env in names:
                backend = env
        if backend == "auto":
            for name in AUTO_ORDER.get(device.type, _OTHER_DEVICES):
                if name in names and not _reason(op, name, device):
                    return name
            return "reference"
    if backend not in names:
        other = [OPS[o] for o, entries in TABLE.items() if backend in entries]
        note = f" (a backend of {', '.join(other)} only)" if other else ""
        raise ValueError(f"{fn}: backend must be one of {('auto',) + names}; got {backend!r}{note}.")
    reason = _reason(op, backend, device)
    if reason:
        runnable = [n for n, r in available_backends(device, op).items() if not r]
        raise RuntimeError(
            f"{fn}: backend {backend!r} cannot run on {device.type}: {reason}. "
            f"Available there: {runnable}; use backend='auto' to pick the fastest."
        )
    return backend


def resolve_backend(backend: str, device: torch.device | str, op: Op = "kd_rows") -> str:
    """The concrete backend name that ``backend`` (``"auto"`` allowed) resolves to for ``op`` on ``device``."""
    return _choose(op, backend, torch.device(device))


@overload
def resolve(op: Literal["kd_rows"], backend: str, device: torch.device | str) -> RowKernels: ...
@overload
def resolve(
    op: Literal["fused_linear_kd", "sparse_kd", "fused_linear_sparse_kd"], backend: str, device: torch.device | str
) -> FusedKernel: ...
def resolve(op: Op, backend: str, device: torch.device | str) -> Any:
    """The implementation of ``op`` by ``backend`` (``"auto"`` allowed) for ``device``; raises as
    the module docstring says when it cannot run."""
    return TABLE[op][_choose(op, backend, torch.device(device))].load()


def backend_report(device: torch.device | str = "cpu") -> str:
    """The table as text: per op, what ``auto`` picks on ``device`` and why each backend runs or not."""
    device = torch.device(device)
    lines = []
    for op, fn in OPS.items():
        lines.append(f"{op} ({fn}) on {device.type}: auto -> {resolve_backend('auto', device, op)}")
        for name, reason in available_backends(device, op).items():
            lines.append(f"  {name:<10} {'available' if not reason else 'unavailable: ' + reason}")
    return "\n".join(lines)
