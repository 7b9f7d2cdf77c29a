"""Shared inputs and error-relative checks for every KD-loss backend test.

Rule (CONVENTIONS.md 4): ``err(fast) <= k * err(oracle run in the same low precision) + atol``,
with errors measured against the float64 oracle; k = 2 for values, 3 for gradients.
"""

from __future__ import annotations

import torch

from ddk_kernels.reference import kd_logits_grad_reference, kd_row_losses_reference
from ddk_kernels.types import KDConfig

# (divergence, beta) pairs covering all three divergences and the JSD end points.
DIVERGENCE_CASES: list[tuple[str, float]] = [
    ("forward_kl", 0.5),
    ("reverse_kl", 0.5),
    ("jsd", 0.5),
    ("jsd", 0.0),
    ("jsd", 1.0),
]


def realistic_logits(
    n: int,
    v: int,
    *,
    seed: int = 0,
    std: float = 15.0,
    dtype: torch.dtype = torch.float32,
    teacher_extra_cols: int = 0,
    ignore_index: int = -100,
    masked_fraction: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student logits ``(n, v)``, teacher logits ``(n, v + extra)`` and labels ``(n,)``.

    Logits have std ``std`` (10-30 is realistic), a few rows are sharply peaked, the teacher is
    correlated with the student, and about ``masked_fraction`` of the labels are ignored.
    """
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(n, v, generator=g, dtype=torch.float64) * std
    zt = 0.6 * zs + 0.8 * std * torch.randn(n, v, generator=g, dtype=torch.float64)
    peaked = torch.rand(n, generator=g) < 0.25
    if v > 1 and bool(peaked.any()):
        cols = torch.randint(0, v, (n,), generator=g)
        rows = torch.nonzero(peaked).flatten()
        zs[rows, cols[rows]] += 6 * std
        zt[rows, cols[rows]] += 8 * std
    if teacher_extra_cols:
        zt = torch.cat([zt, torch.randn(n, teacher_extra_cols, generator=g, dtype=torch.float64) * std], dim=1)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < masked_fraction] = ignore_index
    return zs.to(dtype), zt.to(dtype), labels


def oracle_rows(zs: torch.Tensor, zt: torch.Tensor, labels: torch.Tensor, config: KDConfig):
    """float64 oracle ``(ce, kd)`` per row (teacher sliced to the student's vocabulary)."""
    v = zs.shape[1]
    return kd_row_losses_reference(zs.double(), zt[:, :v].double(), labels, config, torch.float64)


def oracle_grad(zs, zt, labels, grad_ce, grad_kd, config: KDConfig) -> torch.Tensor:
    """float64 oracle gradient of ``sum(grad_ce * ce + grad_kd * kd)`` w.r.t. ``zs``."""
    v = zs.shape[1]
    return kd_logits_grad_reference(zs.double(), zt[:, :v].double(), labels, grad_ce, grad_kd, config)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def assert_close_error_relative(
    fast: torch.Tensor,
    oracle64: torch.Tensor,
    naive_low: torch.Tensor | None,
    *,
    k: float,
    atol: float,
    rtol: float = 0.0,
    what: str = "value",
) -> None:
    """Assert ``err(fast) <= k * err(naive_low) + atol + rtol * max|oracle|``.

    ``naive_low`` is the oracle computed in the same low precision as ``fast`` (None for float32
    or float64 inputs, where only ``atol``/``rtol`` apply).
    """
    err_fast = max_err(fast, oracle64)
    err_naive = max_err(naive_low, oracle64) if naive_low is not None else 0.0
    scale = float(oracle64.abs().max()) if oracle64.numel() else 0.0
    bound = k * err_naive + atol + rtol * scale
    assert err_fast <= bound, (
        f"{what}: error {err_fast:.3e} exceeds bound {bound:.3e} "
        f"(naive low-precision error {err_naive:.3e}, scale {scale:.3e})"
    )
