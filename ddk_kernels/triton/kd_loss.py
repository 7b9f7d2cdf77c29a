"""Vocab-tiled KD loss on given logits, in Triton.

The op ladder: ``_kd_fwd_kernel`` / ``_kd_bwd_kernel`` (private, ``@triton.jit``)
-> ``kd_forward_triton`` / ``kd_backward_triton`` (launchers on plain tensors)
-> ``KDLossTritonFunction`` (autograd) -> ``row_losses`` (the backend contract of
``ddk_kernels.dispatch``, ``ROW_KERNELS``).

One program per row loops over vocabulary tiles of ``BLOCK_V`` columns with an online
max / sum-of-exponentials in float32 (float64 for float64 inputs), so nothing of size ``(N, V)``
is allocated except the gradient. Notation of one row: ``s = zS / T``, ``t = zT / T``,
``q = softmax(s)`` (student), ``p = softmax(t)`` (teacher), ``m = beta p + (1 - beta) q``.

Forward, sweep 1 (every divergence): ``lse(s)``, ``lse(t)``, ``lse(zS)`` (only when ``T != 1``)
and a rescaled accumulator

* forward KL: ``A = sum e^(t - max t) (t - s)``, so ``KL(p||q) = A / l_t - lse(t) + lse(s)``;
* reverse KL: ``A = sum e^(s - max s) (s - t)``, so ``KL(q||p) = A / l_s - lse(s) + lse(t)``.

JSD takes sweep 2 with the final ``lse`` values: ``KL(p||m)`` and ``KL(q||m)``.
Per-row statistics ``(N, 4) = [lse(s), lse(t), lse(zS), extra]`` (float64) are kept for the
backward, with ``extra = E_q[s - t]`` (reverse KL), ``KL(q||m)`` (JSD) or 0 (forward KL); each lse
is ``max + log(sum)`` added in float64 and split into a hi + lo pair in backward, so that
``log q = (s - hi) - lo`` is as exact as a ``log_softmax``.

Backward, one sweep writing the gradient tile::

    d zS = g_ce (softmax(zS) - onehot) + g_kd dD/dzS,
    forward KL: (q - p) / T,
    reverse KL: q ((s - t) - E_q[s - t]) / T = q (log q - log p - KL(q||p)) / T,
    JSD:        q (g - (1 - beta) KL(q||m)) / T,  g = (1 - beta) log(q / m).

Triton is imported lazily by the package ``__init__`` (this module imports it at import time,
so import it only after ``TRITON_INTERPRET`` is set when running on CPU).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl

from ddk_kernels.autograd import backward_rows, forward_rows
from ddk_kernels.types import KDConfig, RowKernels, acc_dtype

__all__ = [
    "ROW_KERNELS",
    "KDLossTritonFunction",
    "kd_backward_triton",
    "kd_forward_triton",
    "row_losses",
]

_MAX_BLOCK_V = 4096


@triton.jit
def _log_mix(log_p, log_q, log_beta, log_1m_beta):
    """``log m`` of ``m = beta p + (1 - beta) q`` from ``log p``, ``log q`` (finite), elementwise."""
    a = log_p + log_beta
    b = log_q + log_1m_beta
    mx = tl.maximum(a, b)
    return mx + tl.log(tl.exp(a - mx) + tl.exp(b - mx))


@triton.jit
def _kd_fwd_kernel(
    zs_ptr,
    zt_ptr,
    labels_ptr,
    ce_ptr,
    kd_ptr,
    stats_ptr,
    V,
    stride_s,
    stride_t,
    par_ptr,  # [1/T, log beta, log(1 - beta), beta, 1 - beta] in ACC (scalar args would be float32)
    ignore_index,
    DIV: tl.constexpr,  # 0 forward KL, 1 reverse KL, 2 JSD
    T_IS_ONE: tl.constexpr,
    ACC: tl.constexpr,  # tl.float32 or tl.float64
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    inv_t = tl.load(par_ptr + 0)
    log_beta = tl.load(par_ptr + 1)
    log_1m_beta = tl.load(par_ptr + 2)
    beta = tl.load(par_ptr + 3)
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    v_end = tl.where(valid, V, 0)  # ignored rows skip the vocabulary loops
    zs_row = zs_ptr + row * stride_s
    zt_row = zt_ptr + row * stride_t
    cols0 = tl.arange(0, BLOCK_V)
    neg_inf = float("-inf")

    m_s = tl.full((), neg_inf, ACC)
    l_s = tl.zeros((), ACC)
    m_t = tl.full((), neg_inf, ACC)
    l_t = tl.zeros((), ACC)
    m_z = tl.full((), neg_inf, ACC)
    l_z = tl.zeros((), ACC)
    acc = tl.zeros((), ACC)
    for start in range(0, v_end, BLOCK_V):
        cols = start + cols0
        mask = cols < V
        zs = tl.load(zs_row + cols, mask=mask, other=neg_inf).to(ACC)
        zt = tl.load(zt_row + cols, mask=mask, other=neg_inf).to(ACC)
        if T_IS_ONE:
            s = zs
            t = zt
        else:
            s = zs * inv_t
            t = zt * inv_t
        m_s_new = tl.maximum(m_s, tl.max(s, axis=0))
        m_t_new = tl.maximum(m_t, tl.max(t, axis=0))
        e_s = tl.exp(s - m_s_new)  # 0 on masked columns
        e_t = tl.exp(t - m_t_new)
        a_s = tl.exp(m_s - m_s_new)
        a_t = tl.exp(m_t - m_t_new)
        if DIV == 0:
            acc = acc * a_t + tl.sum(tl.where(mask, e_t * (t - s), 0.0), axis=0)
        l_s = l_s * a_s + tl.sum(e_s, axis=0)
        l_t = l_t * a_t + tl.sum(e_t, axis=0)
        m_s = m_s_new
        m_t = m_t_new
        if not T_IS_ONE:
            m_z_new = tl.maximum(m_z, tl.max(zs, axis=0))
            l_z = l_z * tl.exp(m_z - m_z_new) + tl.sum(tl.exp(zs - m_z_new), axis=0)
            m_z = m_z_new

    # lse = max + log(sum) kept in float64 (stats); hi + lo in ACC for the JSD sweep below
    log_ls = tl.log(l_s)
    log_lt = tl.log(l_t)
    lse_s = m_s.to(tl.float64) + log_ls.to(tl.float64)
    lse_t = m_t.to(tl.float64) + log_lt.to(tl.float64)
    if T_IS_ONE:
        lse_z = lse_s
    else:
        lse_z = m_z.to(tl.float64) + tl.log(l_z).to(tl.float64)
    d_lse = (m_s - m_t) + (log_ls - log_lt)  # lse(s) - lse(t) without lse rounding

    extra = tl.zeros((), tl.float64)
    if DIV == 0:
        kd = acc / l_t + d_lse
    elif DIV == 1:
        # E_q[u], u = (zS - zT)/T as the backward forms it, in a second sweep with float64 sums: a
        # float32 E off by 1e-7 * |E| (|E| ~ 50 on peaked rows) would reach the gradient at the top
        # entry, where backward's u - E otherwise cancels u's own rounding.
        ls_hi = lse_s.to(ACC)
        ls_lo = (lse_s - ls_hi.to(tl.float64)).to(ACC)
        eu = tl.zeros((), tl.float64)
        eq = tl.zeros((), tl.float64)
        for start in range(0, v_end, BLOCK_V):
            cols = start + cols0
            mask = cols < V
            zs = tl.load(zs_row + cols, mask=mask, other=0.0).to(ACC)
            zt = tl.load(zt_row + cols, mask=mask, other=0.0).to(ACC)
            q = tl.where(mask, tl.exp((zs * inv_t - ls_hi) - ls_lo), 0.0).to(tl.float64)
            eu += tl.sum(q * ((zs - zt) * inv_t).to(tl.float64), axis=0)
            eq += tl.sum(q, axis=0)
        extra = eu / eq
        kd = (extra - (lse_s - lse_t)).to(ACC)  # KL(q||p) = E_q[s - t] - (lse(s) - lse(t)), float64
    else:
        ls_hi = lse_s.to(ACC)
        ls_lo = (lse_s - ls_hi.to(tl.float64)).to(ACC)
        lt_hi = lse_t.to(ACC)
        lt_lo = (lse_t - lt_hi.to(tl.float64)).to(ACC)
        kl_pm = tl.zeros((), ACC)
        kl_qm = tl.zeros((), ACC)
        for start in range(0, v_end, BLOCK_V):
            cols = start + cols0
            mask = cols < V
            zs = tl.load(zs_row + cols, mask=mask, other=0.0).to(ACC)
            zt = tl.load(zt_row + cols, mask=mask, other=0.0).to(ACC)
            log_q = (zs * inv_t - ls_hi) - ls_lo
            log_p = (zt * inv_t - lt_hi) - lt_lo
            log_m = _log_mix(log_p, log_q, log_beta, log_1m_beta)
            p = tl.exp(log_p)
            q = tl.exp(log_q)
            kl_pm += tl.sum(tl.where(mask, p * (log_p - log_m), 0.0), axis=0)
            kl_qm += tl.sum(tl.where(mask, q * (log_q - log_m), 0.0), axis=0)
        kd = beta * kl_pm + (1.0 - beta) * kl_qm
        extra = kl_qm.to(tl.float64)

    # a label outside [0, V) (unchecked on GPU) gives a NaN CE, like the CUDA op, not a silent wrong value
    in_range = (label >= 0) & (label < V)
    z_label = tl.load(zs_row + tl.where(valid & in_range, label, 0)).to(ACC)
    z_label = tl.where(in_range, z_label, float("nan"))
    ce = (lse_z - z_label.to(tl.float64)).to(ACC)
    zero = tl.zeros((), ACC)
    zero64 = tl.zeros((), tl.float64)
    tl.store(ce_ptr + row, tl.where(valid, ce, zero))
    tl.store(kd_ptr + row, tl.where(valid, kd, zero))
    tl.store(stats_ptr + row * 4 + 0, tl.where(valid, lse_s, zero64))
    tl.store(stats_ptr + row * 4 + 1, tl.where(valid, lse_t, zero64))
    tl.store(stats_ptr + row * 4 + 2, tl.where(valid, lse_z, zero64))
    tl.store(stats_ptr + row * 4 + 3, tl.where(valid, extra, zero64))


@triton.jit
def _kd_bwd_kernel(
    zs_ptr,
    zt_ptr,
    labels_ptr,
    stats_ptr,
    gce_ptr,
    gkd_ptr,
    grad_ptr,
    V,
    stride_s,
    stride_t,
    stride_g,
    par_ptr,  # as in _kd_fwd_kernel
    ignore_index,
    DIV: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    inv_t = tl.load(par_ptr + 0)
    log_beta = tl.load(par_ptr + 1)
    log_1m_beta = tl.load(par_ptr + 2)
    one_m_beta = tl.load(par_ptr + 4)
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    zs_row = zs_ptr + row * stride_s
    zt_row = zt_ptr + row * stride_t
    g_row = grad_ptr + row * stride_g
    # float64 lse's split into hi + lo: log q = (s - hi) - lo is as exact as a log_softmax
    lse_s64 = tl.load(stats_ptr + row * 4 + 0)
    lse_t64 = tl.load(stats_ptr + row * 4 + 1)
    lse_z64 = tl.load(stats_ptr + row * 4 + 2)
    lse_s = lse_s64.to(ACC)
    lse_t = lse_t64.to(ACC)
    lse_z = lse_z64.to(ACC)
    lo_s = (lse_s64 - lse_s.to(tl.float64)).to(ACC)
    lo_t = (lse_t64 - lse_t.to(tl.float64)).to(ACC)
    lo_z = (lse_z64 - lse_z.to(tl.float64)).to(ACC)
    extra64 = tl.load(stats_ptr + row * 4 + 3)
    extra = extra64.to(ACC)
    extra_lo = (extra64 - extra.to(tl.float64)).to(ACC)
    zero = tl.zeros((), ACC)
    g_ce = tl.where(valid, tl.load(gce_ptr + row).to(ACC), zero)
    g_kd_t = tl.where(valid, tl.load(gkd_ptr + row).to(ACC), zero) * inv_t
    v_load = tl.where(valid, V, 0)  # ignored rows read nothing and write zeros
    cols0 = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        mask = cols < V
        ld_mask = cols < v_load
        zs = tl.load(zs_row + cols, mask=ld_mask, other=0.0).to(ACC)
        soft = tl.exp((zs - lse_z) - lo_z)
        d_ce = soft - tl.where(cols == label, 1.0, 0.0).to(ACC)
        log_q = (zs * inv_t - lse_s) - lo_s
        q = tl.exp(log_q)
        if DIV == 0:
            zt = tl.load(zt_row + cols, mask=ld_mask, other=0.0).to(ACC)
            d_kd = q - tl.exp((zt * inv_t - lse_t) - lo_t)
        elif DIV == 1:
            zt = tl.load(zt_row + cols, mask=ld_mask, other=0.0).to(ACC)
            d_kd = q * (((zs - zt) * inv_t - extra) - extra_lo)  # (s - t) - E_q[s - t] = log q - log p - KL(q||p)
        else:
            zt = tl.load(zt_row + cols, mask=ld_mask, other=0.0).to(ACC)
            log_p = (zt * inv_t - lse_t) - lo_t
            log_m = _log_mix(log_p, log_q, log_beta, log_1m_beta)
            d_kd = q * (one_m_beta * (log_q - log_m - extra))
        grad = g_ce * d_ce + g_kd_t * d_kd
        grad = tl.where(valid, grad, zero)
        tl.store(g_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)


def _row_major(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself if its last dimension is contiguous (any row stride), else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _block_v(vocab: int, block_v: int | None) -> int:
    if block_v is None:
        block_v = min(_MAX_BLOCK_V, max(16, triton.next_power_of_2(vocab)))
    if block_v < 16 or block_v & (block_v - 1):
        raise ValueError(f"kd_forward_triton: block_v must be a power of two >= 16; got {block_v}.")
    return block_v


def _num_warps(block_v: int) -> int:
    return 8 if block_v >= 2048 else 4


def _beta_terms(config: KDConfig) -> tuple[float, float, float]:
    beta = float(config.beta)
    if config.effective_divergence == "jsd":
        return beta, math.log(beta), math.log1p(-beta)
    return beta, 0.0, 0.0  # unused by the KL kernels


def _scalar_params(config: KDConfig, acc: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[1/T, log beta, log(1 - beta), beta, 1 - beta]`` as a tensor of the accumulation dtype.

    Triton passes Python floats as float32 scalars; float64 rows would then see ``beta`` and
    ``1/T`` rounded to float32 (a 1e-8 relative error). One 5-element copy per launch.
    """
    beta, log_beta, log_1m_beta = _beta_terms(config)
    vals = [1.0 / float(config.temperature), log_beta, log_1m_beta, beta, 1.0 - beta]
    return torch.tensor(vals, dtype=acc).to(device, non_blocking=True)


def kd_forward_triton(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    config: KDConfig,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row CE, divergence and statistics.

    Args:
        student_logits: ``(N, V)`` float32/bfloat16/float16/float64, last dim contiguous.
        teacher_logits: ``(N, V)``, may be a column slice of a wider tensor (row stride > V).
        labels: ``(N,)`` int64; ``config.ignore_index`` rows give 0.
        config: temperature, divergence, beta, ignore_index.
        block_v: vocabulary tile (power of two); default ``min(4096, max(16, next_pow2(V)))``.

    Returns:
        ``(ce (N,), kd (N,), stats (N, 4))``: ce and kd float32 (float64 for float64 students),
        ``stats = [lse(zS/T), lse(zT/T), lse(zS), extra]`` float64 (``extra``: 0, E_q[s - t] or
        KL(q||m) for forward KL, reverse KL, JSD).
    """
    zs = _row_major(student_logits)
    zt = _row_major(teacher_logits)
    labels = labels.contiguous()
    n, vocab = zs.shape
    acc = acc_dtype(zs.dtype)
    ce = torch.empty(n, dtype=acc, device=zs.device)
    kd = torch.empty(n, dtype=acc, device=zs.device)
    stats = torch.empty(n, 4, dtype=torch.float64, device=zs.device)
    if n == 0:
        return ce, kd, stats
    bv = _block_v(vocab, block_v)
    _kd_fwd_kernel[(n,)](
        zs,
        zt,
        labels,
        ce,
        kd,
        stats,
        vocab,
        zs.stride(0),
        zt.stride(0),
        _scalar_params(config, acc, zs.device),
        int(config.ignore_index),
        DIV=config.code,
        T_IS_ONE=float(config.temperature) == 1.0,
        ACC=tl.float64 if acc == torch.float64 else tl.float32,
        BLOCK_V=bv,
        num_warps=_num_warps(bv),
    )
    return ce, kd, stats


def kd_backward_triton(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    stats: torch.Tensor,
    grad_ce: torch.Tensor,
    grad_kd: torch.Tensor,
    config: KDConfig,
    block_v: int | None = None,
) -> torch.Tensor:
    """Gradient of ``sum(grad_ce * ce + grad_kd * kd)`` w.r.t. the student logits.

    Args:
        student_logits, teacher_logits, labels, config: as given to ``kd_forward_triton``.
        stats: ``(N, 4)`` from ``kd_forward_triton``.
        grad_ce, grad_kd: ``(N,)`` upstream gradients (any float dtype).
        block_v: vocabulary tile (power of two).

    Returns:
        ``(N, V)`` contiguous gradient in the student's dtype; zero rows where ignored.
    """
    zs = _row_major(student_logits)
    zt = _row_major(teacher_logits)
    labels = labels.contiguous()
    n, vocab = zs.shape
    acc = acc_dtype(zs.dtype)
    grad = torch.empty((n, vocab), dtype=zs.dtype, device=zs.device)
    if n == 0 or vocab == 0:
        return grad
    bv = _block_v(vocab, block_v)
    _kd_bwd_kernel[(n,)](
        zs,
        zt,
        labels,
        stats.to(torch.float64).contiguous(),
        grad_ce.to(acc).contiguous(),
        grad_kd.to(acc).contiguous(),
        grad,
        vocab,
        zs.stride(0),
        zt.stride(0),
        grad.stride(0),
        _scalar_params(config, acc, zs.device),
        int(config.ignore_index),
        DIV=config.code,
        ACC=tl.float64 if acc == torch.float64 else tl.float32,
        BLOCK_V=bv,
        num_warps=_num_warps(bv),
    )
    return grad


class KDLossTritonFunction(torch.autograd.Function):
    """Autograd of the Triton row losses: ``apply(zS, zT, labels, config, block_v) -> (ce, kd)``;
    differentiable w.r.t. ``zS`` only; saves the inputs (no copies) and ``stats (N, 4)``."""

    @staticmethod
    def forward(
        ctx: Any,
        student: torch.Tensor,
        teacher: torch.Tensor,
        labels: torch.Tensor,
        config: KDConfig,
        block_v: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return forward_rows(ctx, kd_forward_triton, student, teacher, labels, config, block_v)

    @staticmethod
    def backward(ctx: Any, grad_ce: torch.Tensor, grad_kd: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return backward_rows(ctx, kd_backward_triton, grad_ce, grad_kd)


def row_losses(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    config: KDConfig,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backend contract of ``ddk_kernels.dispatch``: per-row ``(ce (N,), kd (N,))``.

    Args:
        student_logits: ``(N, V)`` float32/bfloat16/float16/float64.
        teacher_logits: ``(N, V)`` already sliced to the student's vocabulary (a column slice of a
            wider tensor is read in place through its row stride).
        labels: ``(N,)`` int64.
        config: ``KDConfig``; the divergence is KL(p_T || p_S) for ``"forward_kl"``.
        block_v: vocabulary tile override (tests use small tiles to exercise the loop).

    Returns:
        ``(ce, kd)``, ``(N,)`` float32 (float64 for float64 inputs), zero on ignored rows,
        differentiable w.r.t. ``student_logits``.
    """
    return KDLossTritonFunction.apply(student_logits, teacher_logits.detach(), labels, config, block_v)


#: the Triton backend of the per-row op (``backend="triton"``).
ROW_KERNELS = RowKernels(row_losses, kd_forward_triton, kd_backward_triton)
