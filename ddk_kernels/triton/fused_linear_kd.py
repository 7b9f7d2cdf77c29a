"""Fused lm_head + KD loss in Triton: logits tiles from ``tl.dot``, never an ``(N, V)`` buffer.

The ladder (CONVENTIONS.md 1): ``_fused_kd_stats_kernel`` / ``_fused_kd_grad_kernel`` (private,
``@triton.jit``) -> ``fused_linear_kd_forward_triton`` (launcher on plain tensors; also the
gradients) -> ``FusedLinearKDTritonFunction`` (autograd) -> ``fused_linear_kd`` (the backend
contract of ``ddk.losses.fused.fused_linear_kd_loss``, same as ``ddk_kernels.fused_chunked``).

Ignored tokens are dropped (one ``nonzero``) before any kernel runs. Notation and math as in
``ddk_kernels.fused_chunked``: ``s = zS / T``, ``t = zT / T``, ``q = softmax(s)``,
``p = softmax(t)``.

* ``_fused_kd_stats_kernel``, one program per ``BLOCK_N`` tokens: loops over vocabulary tiles of
  ``BLOCK_V``; each tile is ``h @ W_tile^T`` accumulated in float32 over ``BLOCK_H`` slices of the
  hidden size with ``tl.dot`` (same for the teacher, or a load of given teacher logits), folded
  into online max / sum statistics and the rescaled forward / reverse KL accumulator. Writes per
  row ``[max s, log sum e^(s - max), same for t and zS, ce, kd, KL(q||m)]``. JSD runs it a second time
  (``SWEEP = 1``) with the final ``lse`` values for ``KL(p||m)`` and ``KL(q||m)``.
* ``_fused_kd_grad_kernel``, one program per (token block, vocabulary tile): recomputes both
  tiles, forms ``G = w_ce (softmax(zS) - onehot) + w_kd dD/dzS`` and adds ``G @ W_tile`` into
  ``d hidden``, ``G^T @ h`` into ``d weight`` and ``sum G`` into ``d bias`` with float32
  ``tl.atomic_add``. ``G`` enters these dots in the input dtype (like the naive bf16 path's
  gradient of the logits); all accumulation is float32.

float32 inputs use ``input_precision="ieee"`` (no TF32). float64 inputs are not supported here
(use the chunked backend). On CPU the kernels run under ``TRITON_INTERPRET=1`` on tiny shapes; the
interpreter computes ``tl.dot`` wrongly on bfloat16 operands, so under it low-precision tiles are
upcast to float32 before every ``tl.dot`` (the compiled GPU path keeps bf16 dots).

Speed: correct on an H200 (bench/README.md) but slow, 406 ms against 33 ms for the ``chunked``
backend's ``gemm`` strategy at N=8192, H=2048, V=151936 bf16: every (token block, vocabulary
tile) program adds its partial ``d hidden`` and ``d weight`` with float32 atomics, which is most
of the time. ``backend="auto"`` therefore picks ``chunked`` on CUDA; this backend stays for
explicit use and as the base of a future split into separate ``d hidden`` / ``d weight`` kernels.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl

from ddk_kernels.autograd import apply_fused, fused_epilogue, fused_loss_function
from ddk_kernels.triton.kd_loss import _beta_terms, _log_mix
from ddk_kernels.types import KDConfig, divergence_code

__all__ = [
    "fused_linear_kd_forward_triton",
    "FusedLinearKDTritonFunction",
    "fused_linear_kd",
]

_STATS = 9  # max and log-sum of s, t, zS; ce, kd, kl_qm


@triton.jit
def _mm_tile(
    x_ptr, w_ptr, rows, cols, rmask, cmask, K, stride_x, stride_w,
    IEEE: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """``x[rows] @ w[cols]^T`` as a float32 ``(BLOCK_N, BLOCK_V)`` tile."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for k0 in range(0, K, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        kmask = ks < K
        x = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
        if DOT_F32:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    return acc


@triton.jit
def _logit_tiles(
    h_ptr, w_ptr, b_ptr, th_ptr, tw_ptr, tl_ptr, rows, cols, rmask, cmask,
    HS, HT, stride_h, stride_w, stride_th, stride_tw, stride_tl,
    HAS_BIAS: tl.constexpr, TEACHER_LOGITS: tl.constexpr, IEEE: tl.constexpr, IEEE_T: tl.constexpr,
    DOT_F32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    zs = _mm_tile(h_ptr, w_ptr, rows, cols, rmask, cmask, HS, stride_h, stride_w, IEEE, DOT_F32, BLOCK_N, BLOCK_V, BLOCK_H)
    if HAS_BIAS:
        zs += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if TEACHER_LOGITS:
        zt = tl.load(
            tl_ptr + rows[:, None] * stride_tl + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0
        ).to(tl.float32)
    else:
        zt = _mm_tile(th_ptr, tw_ptr, rows, cols, rmask, cmask, HT, stride_th, stride_tw, IEEE_T, DOT_F32, BLOCK_N, BLOCK_V, BLOCK_H)
    return zs, zt


@triton.jit
def _fused_kd_stats_kernel(
    h_ptr, w_ptr, b_ptr, th_ptr, tw_ptr, tl_ptr, lab_ptr, stats_ptr,
    N, V, HS, HT, stride_h, stride_w, stride_th, stride_tw, stride_tl,
    inv_t, log_beta, log_1m_beta, beta,
    DIV: tl.constexpr, SWEEP: tl.constexpr, T_IS_ONE: tl.constexpr, HAS_BIAS: tl.constexpr,
    TEACHER_LOGITS: tl.constexpr, IEEE: tl.constexpr, IEEE_T: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    lab = tl.load(lab_ptr + rows, mask=rmask, other=0)
    neg_inf = float("-inf")
    srow = stats_ptr + rows * 9
    if SWEEP == 0:
        m_s = tl.full((BLOCK_N,), neg_inf, tl.float32)
        m_t = tl.full((BLOCK_N,), neg_inf, tl.float32)
        m_z = tl.full((BLOCK_N,), neg_inf, tl.float32)
        l_s = tl.zeros((BLOCK_N,), tl.float32)
        l_t = tl.zeros((BLOCK_N,), tl.float32)
        l_z = tl.zeros((BLOCK_N,), tl.float32)
        acc = tl.zeros((BLOCK_N,), tl.float32)
        zlab = tl.zeros((BLOCK_N,), tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            cmask = cols < V
            zs, zt = _logit_tiles(
                h_ptr, w_ptr, b_ptr, th_ptr, tw_ptr, tl_ptr, rows, cols, rmask, cmask,
                HS, HT, stride_h, stride_w, stride_th, stride_tw, stride_tl,
                HAS_BIAS, TEACHER_LOGITS, IEEE, IEEE_T, DOT_F32, BLOCK_N, BLOCK_V, BLOCK_H,
            )
            zlab += tl.sum(tl.where(cols[None, :] == lab[:, None], zs, 0.0), axis=1)
            d_ts = (zt - zs) * inv_t  # t - s, finite on masked columns (0 there)
            zs = tl.where(cmask[None, :], zs, neg_inf)
            zt = tl.where(cmask[None, :], zt, neg_inf)
            if T_IS_ONE:
                s = zs
                t = zt
            else:
                s = zs * inv_t
                t = zt * inv_t
            m_s_new = tl.maximum(m_s, tl.max(s, axis=1))
            m_t_new = tl.maximum(m_t, tl.max(t, axis=1))
            e_s = tl.exp(s - m_s_new[:, None])
            e_t = tl.exp(t - m_t_new[:, None])
            a_s = tl.exp(m_s - m_s_new)
            a_t = tl.exp(m_t - m_t_new)
            if DIV == 0:
                acc = acc * a_t + tl.sum(e_t * d_ts, axis=1)
            elif DIV == 1:
                acc = acc * a_s - tl.sum(e_s * d_ts, axis=1)
            l_s = l_s * a_s + tl.sum(e_s, axis=1)
            l_t = l_t * a_t + tl.sum(e_t, axis=1)
            m_s = m_s_new
            m_t = m_t_new
            if not T_IS_ONE:
                m_z_new = tl.maximum(m_z, tl.max(zs, axis=1))
                l_z = l_z * tl.exp(m_z - m_z_new) + tl.sum(tl.exp(zs - m_z_new[:, None]), axis=1)
                m_z = m_z_new
        # log-probabilities are (x - max) - log(sum), never x - lse (ulp(lse) ~ 1e-5 at lse ~ 100)
        ll_s = tl.log(l_s)
        ll_t = tl.log(l_t)
        if T_IS_ONE:
            m_z = m_s
            ll_z = ll_s
        else:
            ll_z = tl.log(l_z)
        if DIV == 0:
            kd = acc / l_t + (m_s - m_t) + (ll_s - ll_t)
        elif DIV == 1:
            kd = acc / l_s + (m_t - m_s) + (ll_t - ll_s)
        else:
            kd = tl.zeros((BLOCK_N,), tl.float32)
        tl.store(srow + 0, m_s, mask=rmask)
        tl.store(srow + 1, ll_s, mask=rmask)
        tl.store(srow + 2, m_t, mask=rmask)
        tl.store(srow + 3, ll_t, mask=rmask)
        tl.store(srow + 4, m_z, mask=rmask)
        tl.store(srow + 5, ll_z, mask=rmask)
        # a label outside [0, V) (unchecked on GPU) gives a NaN CE instead of a silent wrong value
        ce = tl.where((lab >= 0) & (lab < V), (m_z - zlab) + ll_z, float("nan"))
        tl.store(srow + 6, ce, mask=rmask)
        tl.store(srow + 7, kd, mask=rmask)
    else:  # JSD sweep with the final lse values
        m_s = tl.load(srow + 0, mask=rmask, other=0.0)
        ll_s = tl.load(srow + 1, mask=rmask, other=0.0)
        m_t = tl.load(srow + 2, mask=rmask, other=0.0)
        ll_t = tl.load(srow + 3, mask=rmask, other=0.0)
        kl_pm = tl.zeros((BLOCK_N,), tl.float32)
        kl_qm = tl.zeros((BLOCK_N,), tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            cmask = cols < V
            zs, zt = _logit_tiles(
                h_ptr, w_ptr, b_ptr, th_ptr, tw_ptr, tl_ptr, rows, cols, rmask, cmask,
                HS, HT, stride_h, stride_w, stride_th, stride_tw, stride_tl,
                HAS_BIAS, TEACHER_LOGITS, IEEE, IEEE_T, DOT_F32, BLOCK_N, BLOCK_V, BLOCK_H,
            )
            log_q = (zs * inv_t - m_s[:, None]) - ll_s[:, None]
            log_p = (zt * inv_t - m_t[:, None]) - ll_t[:, None]
            log_m = _log_mix(log_p, log_q, log_beta, log_1m_beta)
            kl_pm += tl.sum(tl.where(cmask[None, :], tl.exp(log_p) * (log_p - log_m), 0.0), axis=1)
            kl_qm += tl.sum(tl.where(cmask[None, :], tl.exp(log_q) * (log_q - log_m), 0.0), axis=1)
        tl.store(srow + 7, beta * kl_pm + (1.0 - beta) * kl_qm, mask=rmask)
        tl.store(srow + 8, kl_qm, mask=rmask)


@triton.jit
def _fused_kd_grad_kernel(
    h_ptr, w_ptr, b_ptr, th_ptr, tw_ptr, tl_ptr, lab_ptr, stats_ptr, wts_ptr,
    dh_ptr, dw_ptr, db_ptr,
    N, V, HS, HT, stride_h, stride_w, stride_th, stride_tw, stride_tl,
    inv_t, log_beta, log_1m_beta, one_m_beta,
    DIV: tl.constexpr, T_IS_ONE: tl.constexpr, HAS_BIAS: tl.constexpr, TEACHER_LOGITS: tl.constexpr,
    NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    IEEE: tl.constexpr, IEEE_T: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    rmask = rows < N
    cmask = cols < V
    lab = tl.load(lab_ptr + rows, mask=rmask, other=0)
    srow = stats_ptr + rows * 9
    m_s = tl.load(srow + 0, mask=rmask, other=0.0)
    ll_s = tl.load(srow + 1, mask=rmask, other=0.0)
    m_t = tl.load(srow + 2, mask=rmask, other=0.0)
    ll_t = tl.load(srow + 3, mask=rmask, other=0.0)
    m_z = tl.load(srow + 4, mask=rmask, other=0.0)
    ll_z = tl.load(srow + 5, mask=rmask, other=0.0)
    kd = tl.load(srow + 7, mask=rmask, other=0.0)
    kl_qm = tl.load(srow + 8, mask=rmask, other=0.0)
    w_ce = tl.load(wts_ptr + 0)
    w_kd_t = tl.load(wts_ptr + 1) * inv_t
    zs, zt = _logit_tiles(
        h_ptr, w_ptr, b_ptr, th_ptr, tw_ptr, tl_ptr, rows, cols, rmask, cmask,
        HS, HT, stride_h, stride_w, stride_th, stride_tw, stride_tl,
        HAS_BIAS, TEACHER_LOGITS, IEEE, IEEE_T, DOT_F32, BLOCK_N, BLOCK_V, BLOCK_H,
    )
    log_q = (zs * inv_t - m_s[:, None]) - ll_s[:, None]
    q = tl.exp(log_q)
    log_p = (zt * inv_t - m_t[:, None]) - ll_t[:, None]
    if DIV == 0:
        d = q - tl.exp(log_p)
    elif DIV == 1:
        d = q * (log_q - log_p - kd[:, None])
    else:
        log_m = _log_mix(log_p, log_q, log_beta, log_1m_beta)
        d = one_m_beta * q * (log_q - log_m - kl_qm[:, None])
    if T_IS_ONE:
        soft = q
    else:
        soft = tl.exp((zs - m_z[:, None]) - ll_z[:, None])
    g = w_kd_t * d + w_ce * (soft - tl.where(cols[None, :] == lab[:, None], 1.0, 0.0))
    g = tl.where(rmask[:, None] & cmask[None, :], g, 0.0)
    if NEED_DB:
        tl.atomic_add(db_ptr + cols, tl.sum(g, axis=0), mask=cmask)
    if DOT_F32:
        gl = g
    else:
        gl = g.to(h_ptr.dtype.element_ty)
    for k0 in range(0, HS, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        kmask = ks < HS
        if NEED_DH:
            w = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
            if DOT_F32:
                w = w.to(tl.float32)
            if IEEE:
                part = tl.dot(gl, w, input_precision="ieee")
            else:
                part = tl.dot(gl, w)
            tl.atomic_add(dh_ptr + rows[:, None] * HS + ks[None, :], part, mask=rmask[:, None] & kmask[None, :])
        if NEED_DW:
            x = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            if DOT_F32:
                x = x.to(tl.float32)
            if IEEE:
                part_w = tl.dot(tl.trans(gl), x, input_precision="ieee")
            else:
                part_w = tl.dot(tl.trans(gl), x)
            tl.atomic_add(dw_ptr + cols[:, None] * HS + ks[None, :], part_w, mask=cmask[:, None] & kmask[None, :])


def _blocks(n: int, vocab: int, hs: int, ht: int) -> tuple[int, int, int]:
    """``(BLOCK_N, BLOCK_V, BLOCK_H)``: powers of two >= 16 (``tl.dot``), capped at 64 / 128 / 64."""
    def p2(x: int, cap: int) -> int:
        return max(16, min(cap, triton.next_power_of_2(max(1, x))))

    return p2(n, 64), p2(vocab, 128), p2(max(hs, ht), 64)


def fused_linear_kd_forward_triton(
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
    need_grads: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Same contract as ``ddk_kernels.fused_chunked.fused_linear_kd_forward`` (float32 results)."""
    if student_hidden.dtype == torch.float64:
        raise TypeError(
            "fused_linear_kd_loss: student_hidden must be float32, bfloat16 or float16 on the triton backend; "
            "got torch.float64. Use backend='chunked' for float64."
        )
    n, hs = student_hidden.shape
    vocab = student_weight.shape[0]
    dev = student_hidden.device
    f32 = torch.float32
    valid = labels != config.ignore_index
    idx = valid.nonzero().squeeze(1)
    nv = int(idx.numel())
    if normalizer is None:
        norm = torch.tensor(float(max(nv, 1)), dtype=f32, device=dev)
    else:
        norm = torch.as_tensor(normalizer, device=dev).detach().to(f32)
    wts = torch.stack([1.0 / norm, (float(gamma) * float(kd_scale)) / norm]).contiguous()
    need_dh, need_dw, need_db = need_grads
    need_db = need_db and student_bias is not None
    ce_rows = torch.zeros(n, dtype=f32, device=dev)
    kd_rows = torch.zeros(n, dtype=f32, device=dev)
    dh_full = torch.zeros(n, hs, dtype=f32, device=dev) if need_dh else None
    dw = torch.zeros(vocab, hs, dtype=f32, device=dev) if need_dw else None
    db = torch.zeros(vocab, dtype=f32, device=dev) if need_db else None
    if nv:
        h = student_hidden.index_select(0, idx).contiguous()
        w = student_weight.contiguous()
        lab = labels.index_select(0, idx).contiguous()
        if teacher_logits is not None:
            tl_c = teacher_logits.index_select(0, idx)
            if tl_c.stride(-1) != 1:
                tl_c = tl_c.contiguous()
            th = tw = None
            ht = 1
        else:
            assert teacher_hidden is not None and teacher_weight is not None
            th = teacher_hidden.index_select(0, idx).contiguous()
            tw = teacher_weight[:vocab].contiguous()
            tl_c = None
            ht = th.shape[1]
        dummy = h  # unused pointer arguments
        stats = torch.zeros(nv, _STATS, dtype=f32, device=dev)
        bn, bv, bh = _blocks(nv, vocab, hs, ht)
        kind = config.effective_divergence
        beta, log_beta, log_1mb = _beta_terms(config)
        common = dict(
            HAS_BIAS=student_bias is not None, TEACHER_LOGITS=tl_c is not None,
            IEEE=h.dtype == f32, IEEE_T=(th is not None and th.dtype == f32),
            # Triton's CPU interpreter mis-computes tl.dot on bfloat16/float16 operands: upcast there.
            DOT_F32=os.environ.get("TRITON_INTERPRET") == "1" and h.dtype != f32,
            BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh,
        )
        ptrs = (h, w, student_bias if student_bias is not None else dummy,
                th if th is not None else dummy, tw if tw is not None else dummy,
                tl_c if tl_c is not None else dummy)
        strides = (nv, vocab, hs, ht, h.stride(0), w.stride(0),
                   th.stride(0) if th is not None else 0, tw.stride(0) if tw is not None else 0,
                   tl_c.stride(0) if tl_c is not None else 0)
        inv_t = 1.0 / float(config.temperature)
        t_is_one = float(config.temperature) == 1.0
        grid_n = (triton.cdiv(nv, bn),)
        for sweep in ((0, 1) if kind == "jsd" else (0,)):
            _fused_kd_stats_kernel[grid_n](
                *ptrs, lab, stats, *strides, inv_t, log_beta, log_1mb, beta,
                DIV=divergence_code(config), SWEEP=sweep, T_IS_ONE=t_is_one, **common,
            )
        ce_rows.index_copy_(0, idx, stats[:, 6])
        kd_rows.index_copy_(0, idx, stats[:, 7])
        if need_dh or need_dw or need_db:
            dh = torch.zeros(nv, hs, dtype=f32, device=dev) if need_dh else stats
            _fused_kd_grad_kernel[(triton.cdiv(nv, bn), triton.cdiv(vocab, bv))](
                *ptrs, lab, stats, wts, dh, dw if dw is not None else stats, db if db is not None else stats,
                *strides, inv_t, log_beta, log_1mb, 1.0 - beta,
                DIV=divergence_code(config), T_IS_ONE=t_is_one, NEED_DH=need_dh, NEED_DW=need_dw, NEED_DB=need_db,
                **common,
            )
            if dh_full is not None:
                dh_full.index_copy_(0, idx, dh)
    return fused_epilogue(
        ce_rows, kd_rows, norm, gamma, kd_scale, (dh_full, dw, db), (student_hidden, student_weight, student_bias)
    )


#: autograd of the Triton launcher: the forward computes loss and gradients, the backward scales
#: them by ``grad_output`` (one backward per forward; see ``ddk_kernels.autograd.fused_loss_function``).
FusedLinearKDTritonFunction = fused_loss_function("FusedLinearKDTritonFunction", fused_linear_kd_forward_triton)


def fused_linear_kd(
    student_hidden: torch.Tensor, student_weight: torch.Tensor, labels: torch.Tensor, config: KDConfig, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backend contract: ``(loss (differentiable 0-dim float32), ce (N,), kd (N,))``.

    Keyword options (``teacher_hidden``, ``teacher_weight``, ``teacher_logits``, ``student_bias``,
    ``gamma``, ``kd_scale``, ``normalizer``) as ``fused_linear_kd_forward_triton``.
    """
    return apply_fused(FusedLinearKDTritonFunction, student_hidden, student_weight, labels, config, **kwargs)
