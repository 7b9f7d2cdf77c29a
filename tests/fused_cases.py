"""Shared inputs and oracle of the fused lm_head + KD loss tests (every backend and strategy).

The oracle materialises the float64 logits ``zS = h W^T (+ b)`` and ``zT = h_T W_T[:V]^T (+ b_T)``
(or the given teacher logits), soft-caps them (``c * tanh(z / c)``) when the case has caps, and
differentiates ``ddk_kernels.reference.kd_loss_reference`` with autograd.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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
    tb: torch.Tensor | None = None  # (Vt,) teacher lm_head bias
    scap: float | None = None  # student final logit softcap
    tcap: float | None = None  # teacher final logit softcap

    def to(self, dtype: torch.dtype) -> FusedCase:
        def cv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().to(dtype)

        return replace(
            self,
            h=cv(self.h),
            w=cv(self.w),
            th=cv(self.th),
            tw=cv(self.tw),
            tl=cv(self.tl),
            b=cv(self.b),
            tb=cv(self.tb),
        )

    def teacher_kwargs(self) -> dict:
        if self.tl is not None:
            return {"teacher_logits": self.tl}
        given = {"teacher_hidden": self.th, "teacher_weight": self.tw, "teacher_bias": self.tb}
        return {k: v for k, v in given.items() if v is not None} | ({"teacher_softcap": self.tcap} if self.tcap else {})

    def with_caps(
        self, student: float | None, teacher: float | None, teacher_bias_seed: int | None = None
    ) -> FusedCase:
        """This case with final logit softcaps and (given a seed) a random teacher ``lm_head`` bias."""
        tb = None
        if teacher_bias_seed is not None:
            assert self.tw is not None
            g = torch.Generator().manual_seed(teacher_bias_seed)
            tb = 3 * torch.randn(self.tw.shape[0], generator=g, dtype=self.tw.dtype)
        return replace(self, scap=student, tcap=teacher, tb=tb)


def capped(z: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap * tanh(z / cap)`` (autograd-differentiable), or ``z`` for None."""
    return z if cap is None else cap * torch.tanh(z / cap)


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
    zs = capped(zs, case.scap)
    v = w.shape[0]
    if case.tl is not None:
        zt = case.tl[:, :v]
    else:
        zt = case.th @ case.tw[:v].T  # type: ignore[index,operator]
        if case.tb is not None:
            zt = zt + case.tb[:v]
        zt = capped(zt, case.tcap)
    compute = torch.float64 if h.dtype == torch.float64 else torch.float32
    out = kd_loss_reference(zs, zt, case.labels, compute_dtype=compute, **opts)
    (out.loss * grad_output).backward()
    return out, (h.grad, w.grad, None if b is None else b.grad)
