"""Pure-torch chunked backend of the KD loss: any device, O(N) saved state.

The ``(N, V)`` logits are walked in blocks of rows and, when a block of ``_MIN_ROWS`` rows would be
larger than ``_BLOCK_ELEMS`` elements, in vocabulary tiles. Forward keeps only four numbers per row
(``stats``, float64: lse(zS/T), lse(zT/T), lse(zS) and the row sum the backward needs); backward recomputes
each tile from the inputs and writes its slice of the gradient. Temporaries are a few tiles of
``_BLOCK_ELEMS`` float32 elements, independent of N and V. Arguments of exp are clamped at the
smallest normal float (``_exp_floor``): denormal results make exp many times slower on x86
(bench/README.md).

Why recompute instead of computing the gradient in forward (as Liger does): the outputs are two
per-row vectors whose upstream gradients ``g_ce`` and ``g_kd`` are arbitrary, so a gradient made
in forward would need two ``(N, V)`` buffers (d CE and d KD) kept alive until backward -- the
memory this backend exists to avoid. Measured on the 2-core CPU at N=4096, V=32000 fp32
(bench/test_bench_kd_loss.py, figures in bench/README.md) recomputation costs about one extra
forward sweep and still beats the naive path, because every op runs on a cache-resident tile.

Math of one row (``s = zS/T``, ``t = zT/T``, ``q = softmax(s)``, ``p = softmax(t)``); tiles k
carry their own ``ls_k = lse_k(s)``, ``lt_k = lse_k(t)`` and a tile-local sum, merged exactly:

* forward KL: ``A_k = sum_k exp(t - lt_k) * ((t - lt_k) - (s - ls_k))``,
  ``KL(p||q) = sum_k w_k (A_k + (lt_k - lt) - (ls_k - ls))`` with ``w_k = exp(lt_k - lt)``;
* reverse KL: ``E_q[s - t]`` per tile (float64 sums), merged with weights ``exp(ls_k - ls)``;
  ``KL(q||p) = E_q[s - t] - (ls - lt)`` with the float64 lse's;
* JSD: a second sweep once ``ls, lt`` are known (``log m`` via ``logaddexp``).

Gradient (reference.kd_logits_grad_reference): ``g_ce (softmax(zS) - onehot) + g_kd/T * dD/ds``.

Precision: the lse values are kept in float64 (``max + log(sum)`` added in float64) and split into
a float32 ``hi + lo`` pair in backward, so ``log q = (s - hi) - lo`` is as exact as a
``log_softmax``; one float32 lse near 100 would be off by ~ulp(100) = 8e-6, an error every
probability inherits and that the reverse-KL and JSD gradients multiply by ``log q - log p``.
The reverse-KL gradient ``q ((s - t) - E_q[s - t])`` uses no lse at all beyond ``q``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ddk_kernels.autograd import backward_rows, forward_rows
from ddk_kernels.types import KDConfig, RowKernels, acc_dtype

__all__ = [
    "ROW_KERNELS",
    "KDLossChunkedFunction",
    "is_available",
    "kd_chunked_backward",
    "kd_chunked_forward",
    "row_losses",
]

#: elements of one (rows x vocabulary) tile: 2**22 float32 = 16 MiB, 131 rows at V=32000; about
#: six such temporaries are alive at once. Every torch op is one OpenMP parallel region, so fewer,
#: larger tiles beat cache-sized ones on a shared CPU (the tile sizes measured are in
#: bench/README.md).
_BLOCK_ELEMS = 1 << 22
#: fewest rows of a block before the vocabulary is tiled instead.
_MIN_ROWS = 4


def is_available(device: torch.device | str) -> tuple[bool, str]:
    """The chunked backend runs wherever torch does."""
    return True, ""


def _plan(n: int, v: int, block_elems: int) -> tuple[int, int]:
    """``(rows per block, vocabulary tile width)``."""
    rows = max(1, block_elems // max(v, 1))
    if rows >= _MIN_ROWS or v <= block_elems:
        return min(max(rows, 1), max(n, 1)), v
    rows = min(_MIN_ROWS, max(n, 1))
    return rows, max(1, block_elems // rows)


def _tile(x: torch.Tensor, r0: int, r1: int, c0: int, c1: int, acc: torch.dtype) -> torch.Tensor:
    return x[r0:r1, c0:c1].to(acc)


def _exp_floor(dtype: torch.dtype) -> float:
    """Arguments of exp are clamped here: below it exp returns denormals (float32: < 1.2e-38).

    x86 CPUs compute denormal results many times slower (bench/README.md), and with std-15 logits
    over 32000 classes most log-probabilities are below -87. exp(-87) = 1.6e-38 changes no
    float32 sum.
    """
    return -700.0 if dtype == torch.float64 else -87.0


def _clamped_exp(x: torch.Tensor) -> torch.Tensor:
    """``exp(max(x, floor))`` in place on ``x`` (which must be a temporary)."""
    return x.clamp_min_(_exp_floor(x.dtype)).exp_()


def _log_ratio_(u: torch.Tensor) -> torch.Tensor:
    """``u = log a - log b`` of a term ``a * u``, in place, with the reference's ``0 * anything = 0``.

    ``-inf`` logits (masked vocabulary entries) reach the sums only through these differences:
    ``u = -inf`` means ``a = 0`` and ``NaN`` (``-inf - -inf``) means ``a = b = 0``, both set to 0
    (``a`` itself is ``exp`` clamped at a tiny positive floor here, so ``a * -inf`` would be
    ``-inf``, not 0); ``+inf`` (``b = 0 < a``) stays, as the divergence is then infinite. Finite
    inputs are unchanged.
    """
    return u.nan_to_num_(nan=0.0, posinf=float("inf"), neginf=0.0)


def _shifted_exp(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(d, e, sum, max)`` of a ``(rows, cols)`` tile: ``d = x - max``, ``e = exp(d)``, row sums."""
    m = x.amax(dim=1, keepdim=True)
    d = x - m
    e = d.clamp_min(_exp_floor(d.dtype)).exp_()
    return d, e, e.sum(dim=1, keepdim=True), m


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum(1)`` as one batched matrix-vector product (one pass, no temporary)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _log_mix(lp: torch.Tensor, lq: torch.Tensor, beta: float) -> torch.Tensor:
    """``log m`` of ``m = beta p + (1 - beta) q`` from log p, log q (new tensor)."""
    x = lp + math.log(beta)
    y = lq + math.log1p(-beta)
    mx = torch.maximum(x, y)
    return _clamped_exp(torch.minimum(x, y).sub_(mx)).log1p_().add_(mx)


def _jsd_sums(
    lq: torch.Tensor, lp: torch.Tensor, q: torch.Tensor, p: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row sums ``sum p (log p - log m)`` and ``sum q (log q - log m)`` of one tile."""
    lm = _log_mix(lp, lq, beta)
    kp = (p * _log_ratio_(lp - lm)).sum(dim=1)
    kq = (q * _log_ratio_(lq - lm)).sum(dim=1)
    return kp, kq


def _hi_lo(x: torch.Tensor, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hi, lo)`` in ``acc`` with ``hi + lo == x`` (float64) to about ``ulp(x)**2``."""
    hi = x.to(acc)
    return hi, (x - hi.double()).to(acc)


def _sub_lse(x: torch.Tensor, lse: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``x - lse`` in ``x.dtype`` for a float64 ``lse`` (or its ``(hi, lo)`` pair): ``(x - hi) - lo``.

    ``x - hi`` is exact where it matters (``x`` near ``hi``), so the result is as accurate as a
    ``log_softmax`` instead of inheriting the rounding of one float32 lse. Returns a new tensor.
    """
    hi, lo = lse if isinstance(lse, tuple) else _hi_lo(lse, x.dtype)
    return torch.sub(x, hi).sub_(lo)


def kd_chunked_forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    config: KDConfig,
    block_elems: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row ``(ce (N,), kd (N,), stats (N, 4))`` without autograd.

    ``stats`` = ``[lse(zS/T), lse(zT/T), lse(zS), extra]`` (float64) with ``extra`` = E_q[s - t]
    (reverse KL), KL(q||m) (JSD) or 0 (forward KL) -- the layout of the compiled op
    ``ddk::kd_fwd``, except that ignored rows keep their statistics here. ce and kd are float32
    (float64 for float64 inputs) and 0 on ignored rows. ``block_elems`` overrides the tile size (tests).
    """
    n, v = student.shape
    acc = acc_dtype(student.dtype)
    kind = config.effective_divergence
    inv_t = 1.0 / config.temperature
    t1 = config.temperature == 1.0
    beta = config.beta
    ce = torch.empty(n, dtype=acc, device=student.device)
    kd = torch.empty(n, dtype=acc, device=student.device)
    stats = torch.empty(n, 4, dtype=torch.float64, device=student.device)
    if n == 0:
        return ce, kd, stats
    valid = labels != config.ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    rows, width = _plan(n, v, block_elems or _BLOCK_ELEMS)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        parts: list[tuple[torch.Tensor, ...]] = []
        for c0 in range(0, v, width):
            c1 = min(v, c0 + width)
            xs = _tile(student, r0, r1, c0, c1, acc)
            s = xs if t1 else xs * inv_t
            xt = _tile(teacher, r0, r1, c0, c1, acc)
            t = xt if t1 else xt * inv_t
            ds, es, ss, ms = _shifted_exp(s)  # ds = s - max, es = exp(ds), ss = sum es
            dt, et, st_, mt = _shifted_exp(t)
            log_ss, log_st = ss.log(), st_.log()
            ls = (ms.double() + log_ss.double()).squeeze(1)  # float64: max + log(sum) exactly
            lt = (mt.double() + log_st.double()).squeeze(1)
            if t1:
                lz = ls
            else:
                mz = xs.amax(dim=1, keepdim=True)
                lz = (mz.double() + _clamped_exp(xs - mz).sum(dim=1, keepdim=True).log_().double()).squeeze(1)
            if kind == "jsd":
                if width == v:  # one tile: finish JSD on the exactly normalised lq, lp now
                    lq, lp = ds.sub_(log_ss), dt.sub_(log_st)  # (x - max) - log(sum): float32, no lse rounding
                    parts.append((ls, lt, lz, *_jsd_sums(lq, lp, es.div_(ss), et.div_(st_), beta)))
                else:
                    parts.append((ls, lt, lz))
                continue
            # KL of the tile's own softmaxes: sum p~ ((t - lt_k) - (s - ls_k)), normalised by the
            # exact sum (not by exp(-lse), which scales p by 1 + ulp(lse): KL * ulp(lse) error)
            if kind == "forward_kl":
                a = _rowdot(et, _log_ratio_(dt.sub_(ds))) / st_.squeeze(1) - log_st.squeeze(1) + log_ss.squeeze(1)
            else:
                # E_q~[s - t] of the tile over the very float32 values (zS - zT)/T the backward
                # forms, summed in float64: at a peaked row's top entry backward's (s - t) - E
                # then cancels its own rounding instead of amplifying it. KL(q||p) follows from it
                # and the float64 lse's below, so no second row sum is needed.
                u = _log_ratio_(torch.sub(xs, xt).mul_(inv_t))
                es64 = es.double()  # normalised by its own float64 sum, not the float32 one (1e-7 * 50)
                parts.append((ls, lt, lz, _rowdot(es64, u.double()) / es64.sum(1)))
                continue
            parts.append((ls, lt, lz, a))
        if len(parts) == 1:
            ls, lt, lz = parts[0][:3]
            val = parts[0][3] if kind == "forward_kl" else None
            e_st = parts[0][3] if kind == "reverse_kl" else None
        else:
            stacked = [torch.stack(p, dim=1) for p in zip(*parts)]  # each (rows, tiles)
            ls_k, lt_k, lz_k = stacked[:3]
            ls, lt, lz = (torch.logsumexp(x, dim=1) for x in (ls_k, lt_k, lz_k))  # float64
            val = None
            # tile weights normalised by their sum (exactly 1), not by exp(-rounded lse)
            if kind == "forward_kl":
                w = torch.softmax(lt_k, dim=1)
                val = (w * (stacked[3] + (lt_k - lt.unsqueeze(1)) - (ls_k - ls.unsqueeze(1)))).sum(dim=1).to(acc)
            elif kind == "reverse_kl":
                e_st = (torch.softmax(ls_k, dim=1) * stacked[3]).sum(dim=1)
        if kind == "jsd":
            if len(parts) == 1:
                kp, kq = parts[0][3:]
            else:  # second sweep over the tiles now that the row lse's are known
                kp = torch.zeros(r1 - r0, dtype=acc, device=student.device)
                kq = torch.zeros_like(kp)
                for c0 in range(0, v, width):
                    c1 = min(v, c0 + width)
                    lq = _sub_lse(_tile(student, r0, r1, c0, c1, acc).mul(inv_t), ls.unsqueeze(1))
                    lp = _sub_lse(_tile(teacher, r0, r1, c0, c1, acc).mul(inv_t), lt.unsqueeze(1))
                    kp_k, kq_k = _jsd_sums(lq, lp, _clamped_exp(lq.clone()), _clamped_exp(lp.clone()), beta)
                    kp += kp_k
                    kq += kq_k
            val = beta * kp + (1.0 - beta) * kq
            extra = kq
        elif kind == "reverse_kl":
            assert e_st is not None  # E_q[s - t] of the row, set above for reverse KL
            extra = e_st
            val = (e_st - (ls - lt)).to(acc)  # KL(q||p) = E_q[s - t] - (lse(s) - lse(t)), float64
        else:
            extra = torch.zeros_like(ls)
        assert val is not None
        ok = valid[r0:r1]
        z_label = student[r0:r1].gather(1, safe[r0:r1].unsqueeze(1)).squeeze(1).to(acc)
        ce[r0:r1] = torch.where(ok, (lz - z_label.double()).to(acc), 0.0)
        kd[r0:r1] = torch.where(ok, val, 0.0)
        # ignored rows keep their (finite) statistics: backward multiplies them by a zero g_ce/g_kd
        # instead of branching (no host sync), and exp(s - 0) could overflow to inf * 0 = NaN.
        stats[r0:r1] = torch.stack([ls, lt, lz, extra.double()], dim=1)
    return ce, kd, stats


def kd_chunked_backward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    stats: torch.Tensor,
    grad_ce: torch.Tensor,
    grad_kd: torch.Tensor,
    config: KDConfig,
    block_elems: int | None = None,
) -> torch.Tensor:
    """``(N, V)`` gradient of ``sum(grad_ce * ce + grad_kd * kd)`` w.r.t. ``student``, in its dtype.

    Recomputes every tile from the inputs and ``stats`` of :func:`kd_chunked_forward`.
    """
    n, v = student.shape
    acc = acc_dtype(student.dtype)
    kind = config.effective_divergence
    inv_t = 1.0 / config.temperature
    t1 = config.temperature == 1.0
    omb = 1.0 - config.beta
    grad = torch.empty((n, v), dtype=student.dtype, device=student.device)
    if n == 0:
        return grad
    valid = labels != config.ignore_index
    gce_all = torch.where(valid, grad_ce.to(acc), 0.0)
    gkd_all = torch.where(valid, grad_kd.to(acc), 0.0) * inv_t
    floor = _exp_floor(acc)
    rows, width = _plan(n, v, block_elems or _BLOCK_ELEMS)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        st = stats[r0:r1].double()
        ls, lt, lz, extra_hl = (_hi_lo(st[:, i : i + 1], acc) for i in range(4))
        extra = extra_hl[0]
        gce = gce_all[r0:r1].unsqueeze(1)
        gkd = gkd_all[r0:r1].unsqueeze(1)
        lab = labels[r0:r1].unsqueeze(1)
        for c0 in range(0, v, width):
            c1 = min(v, c0 + width)
            xs = _tile(student, r0, r1, c0, c1, acc)
            t = _tile(teacher, r0, r1, c0, c1, acc)
            lq = _sub_lse(xs if t1 else torch.mul(xs, inv_t), ls)
            lp = _sub_lse(t if t1 else torch.mul(t, inv_t), lt)
            q = lq.clamp_min(floor).exp_()
            if kind == "forward_kl":  # g = g_ce soft + g_kd/T (q - p)
                if t1:
                    g = q.mul_(gce + gkd)
                else:
                    g = q.mul_(gkd).addcmul_(_sub_lse(xs, lz).clamp_min_(floor).exp_(), gce)
                g.sub_(lp.clamp_min_(floor).exp_().mul_(gkd))
            else:  # g = g_ce soft + g_kd/T q (g_D - extra), g_D = log q - log p or (1-beta)(log q - log m)
                if kind == "reverse_kl":  # (s - t) - E_q[s - t] = log q - log p - KL(q||p)
                    inner = _sub_lse(_log_ratio_(torch.sub(xs, t).mul_(inv_t)), extra_hl)
                else:
                    inner = _log_ratio_(lq.sub(_log_mix(lp, lq, config.beta))).sub_(extra).mul_(omb)
                g = inner.mul_(q).mul_(gkd)
                g.addcmul_(q if t1 else _sub_lse(xs, lz).clamp_min_(floor).exp_(), gce)
            # onehot term of the CE gradient, in the accumulation dtype (before any rounding)
            in_tile = (lab >= c0) & (lab < c1)
            idx = (lab - c0).clamp_(0, c1 - c0 - 1)
            g.scatter_add_(1, idx, torch.where(in_tile, -gce, 0.0))
            grad[r0:r1, c0:c1] = g
    return grad


class KDLossChunkedFunction(torch.autograd.Function):
    """Autograd of the chunked row losses: ``apply(student, teacher, labels, config, block_elems)
    -> (ce, kd)``; saves the inputs (no copies) and ``stats (N, 4)``."""

    @staticmethod
    def forward(
        ctx: Any,
        student: torch.Tensor,
        teacher: torch.Tensor,
        labels: torch.Tensor,
        config: KDConfig,
        block_elems: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return forward_rows(ctx, kd_chunked_forward, student, teacher, labels, config, block_elems)

    @staticmethod
    def backward(ctx: Any, grad_ce: torch.Tensor, grad_kd: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return backward_rows(ctx, kd_chunked_backward, grad_ce, grad_kd)


def row_losses(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    config: KDConfig,
    block_elems: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(ce (N,), kd (N,))`` of the chunked backend (see ``ddk_kernels.dispatch``).

    Args:
        student_logits: ``(N, V)`` float32/bfloat16/float16/float64.
        teacher_logits: ``(N, V)``, may be a column slice of a wider tensor (not copied), any
            float dtype, never differentiated.
        labels: ``(N,)`` int64; ``config.ignore_index`` rows give 0.
        config: temperature, divergence (``effective_divergence``), beta.
        block_elems: elements of one tile (tests use small tiles to force vocabulary tiling).

    Returns:
        ``(ce, kd)`` float32 (float64 for float64 inputs), differentiable w.r.t. ``student_logits``.

    Examples:
        >>> zs = torch.tensor([[2.0, 0.0, -1.0]], requires_grad=True)
        >>> ce, kd = row_losses(zs, torch.zeros(1, 3), torch.tensor([0]), KDConfig())
        >>> round(float(ce.detach()), 4), round(float(kd.detach()), 4)
        (0.1698, 0.7379)
    """
    return KDLossChunkedFunction.apply(student_logits, teacher_logits.detach(), labels.long(), config, block_elems)


#: the chunked backend of the per-row op (``backend="chunked"``).
ROW_KERNELS = RowKernels(row_losses, kd_chunked_forward, kd_chunked_backward)
