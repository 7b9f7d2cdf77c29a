"""Shared inputs, backends and error-relative checks of every KD-loss backend test.

Rule (CONVENTIONS.md 4): ``err(fast) <= k * err(oracle run in the same low precision) + atol``,
with errors measured against the float64 oracle; k = 2 for values, 3 for gradients.
:func:`check_row_losses` applies it to one ``row_losses`` of the op ``kd_rows`` (every backend's
suite in tests/ddk_kernels/test_kd_rows.py, plus backend-specific tile options).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ddk_kernels.dispatch import Op, available_backends
from ddk_kernels.reference import kd_logits_grad_reference, kd_row_losses_reference
from ddk_kernels.types import KDConfig

#: where the backends run in the tests: the GPU when there is one (Triton compiles there).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
#: unit roundoff of the accumulation dtype of each input dtype.
EPS = {torch.float64: 2.0**-52, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-24, torch.float16: 2.0**-24}


def runnable_backends(op: Op, device: torch.device | str = DEVICE) -> list[str]:
    """The backends of ``op`` that run on ``device`` here (Triton on CPU: under TRITON_INTERPRET=1)."""
    return [name for name, reason in available_backends(device, op).items() if not reason]


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


def upstream(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 upstream gradients ``(grad_ce, grad_kd)`` of ``n`` rows, not all 1 (some negative)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g, dtype=torch.float64) * 2 - 0.5, torch.rand(
        n, generator=g, dtype=torch.float64
    ) * 3


def naive_low(zs, zt, labels, cfg: KDConfig, gce, gkd):  # type: ignore[no-untyped-def]
    """The oracle run in the input's own precision: ``(ce, kd, d zS)``; None for float64 (where
    only the absolute tolerance applies)."""
    if zs.dtype == torch.float64:
        return None, None, None
    z = zs.detach().clone().requires_grad_(True)
    ce, kd = kd_row_losses_reference(z, zt[:, : zs.shape[1]], labels, cfg, compute_dtype=zs.dtype)
    (ce * gce.to(ce.dtype) + kd * gkd.to(ce.dtype)).sum().backward()
    return ce.detach(), kd.detach(), z.grad


def tolerances(zs, cfg: KDConfig, gce, gkd) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """atol of values and gradients: the rounding of ``|lse|``-sized numbers in the accumulation dtype.

    The statistics are float64 and split into hi + lo in backward, so this bound (``ulp(|lse|)``
    relative error in ``q``, times the upstream scale) is loose for them; it still bounds the
    rounding of ``s = zS/T`` and of the float32 sums (tests/ddk_kernels/test_stats_precision.py
    pins the tighter behaviour).
    """
    eps = EPS[zs.dtype]
    lse = float(zs.double().abs().max()) / cfg.temperature + 12.0
    g = float(gce.abs().max()) + float(gkd.abs().max()) / cfg.temperature
    return 16 * eps * lse, 32 * eps * lse * g


RowLosses = Callable[..., "tuple[torch.Tensor, torch.Tensor]"]


def check_row_losses(row_losses: RowLosses, zs, zt, labels, cfg: KDConfig, seed: int = 1) -> None:  # type: ignore[no-untyped-def]
    """Run ``row_losses`` (on :data:`DEVICE`) and check ce, kd and the gradient for random upstream
    gradients against the float64 oracle (k = 2 / k = 3), plus zeros on ignored rows.

    ``zt`` may be wider than ``zs``: the backend gets its first V columns as a view (row stride
    larger than V), as ``ddk.kd_loss`` passes them.
    """
    n, v = zs.shape
    zt_device = zt.to(DEVICE)[:, :v]
    zt = zt[:, :v]
    gce, gkd = upstream(n, seed)
    z = zs.detach().to(DEVICE).clone().requires_grad_(True)
    ce, kd = row_losses(z, zt_device, labels.to(DEVICE), cfg)
    acc = torch.float64 if zs.dtype == torch.float64 else torch.float32
    assert ce.dtype == acc and kd.dtype == acc and ce.shape == (n,) and kd.shape == (n,)
    (ce * gce.to(DEVICE, acc) + kd * gkd.to(DEVICE, acc)).sum().backward()
    assert z.grad is not None and z.grad.dtype == zs.dtype and z.grad.shape == (n, v)
    ce, kd, grad = ce.detach().cpu(), kd.detach().cpu(), z.grad.cpu()
    oce, okd = oracle_rows(zs, zt, labels, cfg)
    og = oracle_grad(zs, zt, labels, gce, gkd, cfg)
    nce, nkd, ng = naive_low(zs, zt, labels, cfg, gce, gkd)
    atol_v, atol_g = tolerances(zs, cfg, gce, gkd)
    assert_close_error_relative(ce, oce, nce, k=2, atol=atol_v, what="ce")
    assert_close_error_relative(kd, okd, nkd, k=2, atol=atol_v, what="kd")
    assert_close_error_relative(grad, og, ng, k=3, atol=atol_g, what="grad")
    ignored = labels == cfg.ignore_index
    assert bool((ce[ignored] == 0).all()) and bool((kd[ignored] == 0).all())
    assert bool((grad[ignored] == 0).all())


def small_batch(n: int = 6, v: int = 7, seed: int = 0, num_domains: int = 3):  # type: ignore[no-untyped-def]
    """``(student logits (n, v) requiring grad, teacher logits (n, v), labels (n,), domain ids (n,))``."""
    g = torch.Generator().manual_seed(seed)
    zs = (torch.randn(n, v, generator=g) * 3).requires_grad_(True)
    zt = torch.randn(n, v, generator=g) * 3
    labels = torch.randint(0, v, (n,), generator=g)
    return zs, zt, labels, torch.arange(n) % num_domains
