"""Shared inputs and oracle of the fused lm_head + KD loss tests (every backend and strategy).

The oracle materialises the float64 logits ``zS = h W^T (+ b)`` and ``zT = h_T W_T[:V]^T`` (or
the given teacher logits) and differentiates ``ddk_kernels.reference.kd_loss_reference`` with
autograd.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ddk_kernels.reference import kd_loss_reference


@dataclass
class FusedCase:
    h: torch.Tensor  # (N, Hs)
    w: torch.Tensor  # (V, Hs)
    labels: torch.Tensor  # (N,)
    th: torch.Tensor | None  # (N, Ht)
    tw: torch.Tensor | None  # (Vt, Ht)
    tl: torch.Tensor | None  # (N, Vt)
    b: torch.Tensor | None  # (V,)
    domain_ids: torch.Tensor  # (N,)

    def to(self, dtype: torch.dtype) -> FusedCase:
        def cv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().to(dtype)

        return FusedCase(
            cv(self.h), cv(self.w), self.labels, cv(self.th), cv(self.tw), cv(self.tl), cv(self.b), self.domain_ids
        )

    def teacher_kwargs(self) -> dict:
        if self.tl is not None:
            return {"teacher_logits": self.tl}
        return {"teacher_hidden": self.th, "teacher_weight": self.tw}


def make_case(
    n: int = 23,
    hs: int = 16,
    ht: int = 24,
    v: int = 97,
    vt: int | None = None,
    *,
    seed: int = 0,
    bias: bool = False,
    teacher_as_logits: bool = False,
    masked_fraction: float = 0.2,
    num_domains: int = 3,
    std: float = 15.0,
    ignore_index: int = -100,
) -> FusedCase:
    """float64 inputs whose logits have std ``std`` with a quarter of the rows sharply peaked,
    the teacher correlated with the student, and ``masked_fraction`` of the labels ignored.
    Domain ``num_domains - 1`` is left empty."""
    vt = v if vt is None else vt
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    w = torch.randn(v, hs, generator=g, dtype=f64)
    h = torch.randn(n, hs, generator=g, dtype=f64) * (std / hs**0.5)
    peaked = torch.rand(n, generator=g) < 0.25
    cols = torch.randint(0, v, (n,), generator=g)
    boost = (6 * std) * w[cols] / (w[cols] ** 2).sum(1, keepdim=True)
    h = h + peaked.to(f64)[:, None] * boost
    tw = torch.randn(vt, ht, generator=g, dtype=f64)
    th = torch.randn(n, ht, generator=g, dtype=f64) * (std / ht**0.5)
    th = th + peaked.to(f64)[:, None] * (8 * std) * tw[cols] / (tw[cols] ** 2).sum(1, keepdim=True)
    b = torch.randn(v, generator=g, dtype=f64) if bias else None
    tl = th @ tw.T if teacher_as_logits else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < masked_fraction] = ignore_index
    domain_ids = torch.randint(0, max(1, num_domains - 1), (n,), generator=g)
    return FusedCase(
        h, w, labels, None if teacher_as_logits else th, None if teacher_as_logits else tw, tl, b, domain_ids
    )


def naive_loss(case: FusedCase, grad_output: float = 1.0, **opts):
    """The naive path in the dtype of ``case``: materialised logits, reference loss, autograd.

    Returns ``(KDLossOutput, (d h, d W, d b or None))``.
    """
    h = case.h.detach().clone().requires_grad_()
    w = case.w.detach().clone().requires_grad_()
    b = None if case.b is None else case.b.detach().clone().requires_grad_()
    zs = h @ w.T
    if b is not None:
        zs = zs + b
    v = w.shape[0]
    zt = case.tl[:, :v] if case.tl is not None else case.th @ case.tw[:v].T  # type: ignore[index,operator]
    compute = torch.float64 if h.dtype == torch.float64 else torch.float32
    out = kd_loss_reference(zs, zt, case.labels, compute_dtype=compute, **opts)
    (out.loss * grad_output).backward()
    return out, (h.grad, w.grad, None if b is None else b.grad)
