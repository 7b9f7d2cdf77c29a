"""The per-row math of the fused ``lm_head`` + KD loss in torch (strategies token_chunks and recompute).

Nothing of size ``(N, V)`` is allocated: the student logits ``zS = h W^T (+ b)`` and the teacher
logits ``zT = h_T W_T[:V]^T (+ b_T)`` (or slices of given teacher logits) exist only as tiles of
``token_chunk x vocab_tile`` rows/columns (:class:`ChunkTiles`). Ignored tokens were dropped
before any matmul (``FusedBatch.rows``). A final logit softcap ``c`` (either model) is applied
to each tile as it is formed, ``z <- c * tanh(z / c)``; the student's gradient tile is then
multiplied by ``1 - (z / c)**2`` before it meets the matmuls (kept from sweep 1 when the tile is
reused, else formed from the recomputed tile).

Notation of one row: ``s = zS / T``, ``t = zT / T``, ``q = softmax(s)`` (student),
``p = softmax(t)`` (teacher), ``m = beta p + (1 - beta) q``. Per token chunk (:func:`chunk_rows`):

* sweep 1 (every divergence) folds each tile into online per-row statistics: max/sum of
  exponentials of ``s``, ``t`` and (when ``T != 1``) ``zS``, and a rescaled accumulator
  ``A = sum e^(t - max t) (t - s)`` (forward KL: ``KL(p||q) = A / l_t - lse(t) + lse(s)``) or
  ``A = sum e^(s - max s) (s - t)`` (reverse KL: ``KL(q||p) = A / l_s - lse(s) + lse(t)``).
  The label logit is a row-wise dot ``h . W[label] (+ b[label])``.
* JSD only: one more sweep with the final ``lse`` values for ``KL(p||m)`` and ``KL(q||m)``.
* sweep 2 (only when a gradient is needed) forms the gradient tile
  ``G = w_kd dD/dzS + w_ce softmax(zS)`` and multiplies it straight into ``d hidden`` and
  ``d weight`` (and ``d bias``); the ``- w_ce onehot(label)`` part of the CE gradient is a
  ``scatter_add``. ``dD/dzS`` is ``(q - p) / T`` (forward KL), ``q (log q - log p - KL(q||p)) / T``
  (reverse KL), ``q (1 - beta)(log(q/m) - KL(q||m)) / T`` (JSD).

When one tile spans the vocabulary (token_chunks) and the divergence is a KL, sweep 2 reuses the
exponentials of sweep 1 (computed in place on the chunk's own logits), so at most 4 ``(chunk, V)``
buffers live; otherwise it recomputes each tile (the recompute strategy re-runs the matmuls).

Low-precision weights (bfloat16/float16) are upcast tile by tile: logits, statistics and
accumulators are float32 (float64 for float64 inputs), so nothing is rounded to bfloat16 before
the softmax.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ddk_kernels.fused_plan import FusedPlan
from ddk_kernels.types import KDConfig, TeacherInputs, softcap_, softcap_grad

__all__ = ["ChunkTiles", "FusedBatch", "FusedBuffers", "accumulate_grads", "chunk_rows", "run_token_chunks"]

_LOWP_SUBTILE = 4096  # weight rows upcast at a time for bfloat16/float16 weights

TileObserver = Callable[[tuple[int, int]], None]


@dataclass(frozen=True)
class FusedBatch:
    """The inputs of one fused call, already validated and sliced to the student's V.

    Attributes:
        hidden: ``(N, Hs)`` student hidden states; weight: ``(V, Hs)``; bias: ``(V,)`` or None.
        labels: ``(N,)`` int64.
        rows: ``(Nv,)`` int64 indices of the valid (non-ignored) tokens.
        teacher: the teacher's hidden states and ``lm_head`` weight (bias, softcap), or its logits.
        softcap: the student's final logit softcap ``c`` (logits ``c * tanh(z / c)``) or None.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    labels: torch.Tensor
    rows: torch.Tensor
    teacher: TeacherInputs
    softcap: float | None = None


@dataclass(frozen=True)
class FusedBuffers:
    """What the strategies fill, in the compute dtype: per-row ``ce``, ``kd`` ``(N,)`` (0 on
    ignored rows) and the gradient accumulators ``dh (N, Hs)``, ``dw (V, Hs)``, ``db (V,)`` (None
    where not needed)."""

    ce: torch.Tensor
    kd: torch.Tensor
    dh: torch.Tensor | None
    dw: torch.Tensor | None
    db: torch.Tensor | None

    @property
    def need_grad(self) -> bool:
        return self.dh is not None or self.dw is not None or self.db is not None


def linear_tile(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, v0: int, v1: int) -> torch.Tensor:
    """``x @ weight[v0:v1].T (+ bias[v0:v1])`` in ``x.dtype`` (the compute dtype); low-precision
    weights are upcast ``_LOWP_SUBTILE`` rows at a time."""
    cd = x.dtype
    if weight.dtype == cd:
        out = x @ weight[v0:v1].T
    else:
        out = torch.empty(x.shape[0], v1 - v0, dtype=cd, device=x.device)
        for a in range(v0, v1, _LOWP_SUBTILE):
            b = min(v1, a + _LOWP_SUBTILE)
            out[:, a - v0 : b - v0] = x @ weight[a:b].to(cd).T
    if bias is not None:
        out += bias[v0:v1].to(cd)
    return out


def accumulate_grads(
    g: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    v0: int,
    v1: int,
    dx: torch.Tensor | None,
    dw: torch.Tensor | None,
    db: torch.Tensor | None,
) -> None:
    """``dx += g @ weight[v0:v1]``, ``dw[v0:v1] += g.T @ x``, ``db[v0:v1] += g.sum(0)``."""
    if dx is not None:
        if weight.dtype == g.dtype:
            dx.addmm_(g, weight[v0:v1])
        else:
            for a in range(v0, v1, _LOWP_SUBTILE):
                b = min(v1, a + _LOWP_SUBTILE)
                dx.addmm_(g[:, a - v0 : b - v0], weight[a:b].to(g.dtype))
    if dw is not None:
        dw[v0:v1].addmm_(g.T, x)
    if db is not None:
        db[v0:v1] += g.sum(0)


class ChunkTiles:
    """The logits tiles of one token chunk: ``zS = h W^T (+ b)`` and ``zT = h_T W_T^T (+ b_T)`` or
    columns of the chunk's own copy of the teacher logits, in the compute dtype ``h.dtype``, each
    softcapped when its model has a ``softcap``."""

    def __init__(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        teacher: TeacherInputs,
        vocab_tile: int,
        observer: TileObserver | None = None,
        softcap: float | None = None,
    ) -> None:
        self.hidden, self.weight, self.bias, self.teacher = hidden, weight, bias, teacher
        self.softcap = softcap
        self.vocab = weight.shape[0]
        self.tile = min(vocab_tile, self.vocab)
        self.single = self.tile >= self.vocab
        self.observer = observer

    def ranges(self) -> list[tuple[int, int]]:
        return [(v0, min(self.vocab, v0 + self.tile)) for v0 in range(0, self.vocab, self.tile)]

    def compute(self, v0: int, v1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(zS, zT)`` of columns ``[v0, v1)``. ``zS`` is a new tensor; ``zT`` a new tensor or a
        view of the chunk's teacher logits (so it may be changed in place only when no later
        sweep reads those columns again)."""
        if self.observer is not None:
            self.observer((self.hidden.shape[0], v1 - v0))
        zs = softcap_(linear_tile(self.hidden, self.weight, self.bias, v0, v1), self.softcap)
        t = self.teacher
        if t.logits is not None:
            zt = t.logits[:, v0:v1]
            if zt.dtype != zs.dtype:
                zt = zt.to(zs.dtype)
        else:
            assert t.hidden is not None and t.weight is not None
            zt = softcap_(linear_tile(t.hidden, t.weight, t.bias, v0, v1), t.softcap)
        return zs, zt


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum(1)`` as one batched matrix-vector product (one pass, no temporary)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _scaled(z: torch.Tensor, inv_t: float, in_place: bool) -> torch.Tensor:
    """``z / T``: ``z`` itself at ``T = 1``, else in place or a new tensor."""
    if inv_t == 1.0:
        return z
    return z.mul_(inv_t) if in_place else z * inv_t


def _kl_terms(
    s: torch.Tensor, t: torch.Tensor, m_s: torch.Tensor, m_t: torch.Tensor, diff: str | None, in_place: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(e^(s - m_s), e^(t - m_t), d)`` of one tile with ``d = t - s`` (``diff="forward_kl"``),
    ``s - t`` (``"reverse_kl"``) or None; the exponentials overwrite ``s``, ``t`` when ``in_place``."""
    d = t - s if diff == "forward_kl" else s - t if diff == "reverse_kl" else None
    es = (s.sub_(m_s[:, None]) if in_place else s - m_s[:, None]).exp_()
    et = (t.sub_(m_t[:, None]) if in_place else t - m_t[:, None]).exp_()
    return es, et, d


def _log_softmax_tile(z: torch.Tensor, scale: float, m: torch.Tensor, ll: torch.Tensor) -> torch.Tensor:
    """New tensor ``(z * scale - m) - ll`` (row statistics ``m`` = max, ``ll`` = log of the sum of
    exponentials of ``z * scale - m``): as exact as a ``log_softmax``, where subtracting one lse
    of size ~100 would cost ulp(100) ~ 1e-5 relative error in every probability."""
    out = z * scale if scale != 1.0 else z.clone()
    out.sub_(m[:, None]).sub_(ll[:, None])
    return out


def _subtract_onehot(g: torch.Tensor, lab: torch.Tensor, v0: int, v1: int, w_ce: torch.Tensor) -> None:
    """``g[r, lab[r] - v0] -= w_ce`` for the rows whose label falls in ``[v0, v1)`` (no host sync)."""
    local = lab - v0
    inside = (local >= 0) & (local < v1 - v0)
    src = torch.where(inside, -w_ce, torch.zeros((), dtype=g.dtype, device=g.device)).to(g.dtype)
    g.scatter_add_(1, local.clamp(0, v1 - v0 - 1)[:, None], src[:, None])


def chunk_rows(
    tiles: ChunkTiles,
    lab: torch.Tensor,
    zlab: torch.Tensor,
    config: KDConfig,
    weights: tuple[torch.Tensor, torch.Tensor],
    grads: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(ce, kd)`` of one chunk (any tiling, any divergence; see the module docstring).

    Args:
        tiles: the chunk's logits tiles.
        lab: ``(rows,)`` labels (all valid); zlab: ``(rows,)`` label logits ``zS[r, lab[r]]``.
        config: temperature, divergence, beta.
        weights: ``(w_ce, w_kd)``, 0-dim d loss / d CE and d loss / d KD of each token.
        grads: ``(d hidden of the chunk, d weight, d bias)`` accumulators, None where not needed
            (all None: no gradient sweep).
    """
    w_ce, w_kd = weights
    dh_c, dw, db = grads
    need_grad = dh_c is not None or dw is not None or db is not None
    cd, dev, rows = zlab.dtype, zlab.device, zlab.shape[0]
    inv_t = 1.0 / float(config.temperature)
    t1 = inv_t == 1.0
    kind = config.effective_divergence
    reuse = tiles.single and kind != "jsd"  # sweep 1's exponentials of the one tile serve sweep 2
    kl = None if kind == "jsd" else kind
    ninf = torch.full((rows,), -math.inf, dtype=cd, device=dev)
    m_s, m_t, m_z = ninf.clone(), ninf.clone(), ninf
    l_s = torch.zeros(rows, dtype=cd, device=dev)
    l_t, l_z, acc = l_s.clone(), l_s.clone(), l_s.clone()
    cap = tiles.softcap
    kept: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None = None
    kept_dcap: torch.Tensor | None = None  # 1 - (zS / c)**2 of the one tile, for sweep 2
    cached: tuple[torch.Tensor, torch.Tensor] | None = None  # the one tile, read again by the JSD sweeps

    def tile(v0: int, v1: int) -> tuple[torch.Tensor, torch.Tensor]:
        return cached if cached is not None else tiles.compute(v0, v1)

    # sweep 1: online statistics
    for v0, v1 in tiles.ranges():
        zs, zt = tiles.compute(v0, v1)
        if tiles.single and not reuse:
            cached = (zs, zt)
        if reuse and need_grad and cap is not None:  # before zs is overwritten in place
            kept_dcap = softcap_grad(zs, cap)
        ez = None
        if not t1:  # sum of e^(zS - max zS) for the CE at T = 1, before zS is scaled (in place)
            new_m_z = torch.maximum(m_z, zs.amax(1))
            ez = (zs - new_m_z[:, None]).exp_()
            l_z = l_z * torch.exp(m_z - new_m_z) + ez.sum(1)
            m_z = new_m_z
            if not (reuse and need_grad):
                ez = None
        s, t = _scaled(zs, inv_t, reuse), _scaled(zt, inv_t, reuse)
        new_m_s = torch.maximum(m_s, s.amax(1))
        new_m_t = torch.maximum(m_t, t.amax(1))
        a_s, a_t = torch.exp(m_s - new_m_s), torch.exp(m_t - new_m_t)
        es, et, diff = _kl_terms(s, t, new_m_s, new_m_t, kl, reuse or not t1)
        l_s = l_s * a_s + es.sum(1)
        l_t = l_t * a_t + et.sum(1)
        if kind == "forward_kl":
            assert diff is not None  # _kl_terms(..., "forward_kl") returns d = t - s
            acc = acc * a_t + _rowdot(diff, et)
        elif kind == "reverse_kl":
            assert diff is not None  # _kl_terms(..., "reverse_kl") returns d = s - t
            acc = acc * a_s + _rowdot(diff, es)
        m_s, m_t = new_m_s, new_m_t
        if reuse and need_grad:
            kept = (es, et, diff if kind == "reverse_kl" else None, ez)
        del zs, zt, s, t, es, et, diff, ez
    ll_s, ll_t = l_s.log(), l_t.log()
    ll_z = ll_s if t1 else l_z.log()
    if t1:
        m_z = m_s
    ce = (m_z - zlab) + ll_z

    beta = float(config.beta)
    kl_qm = torch.zeros(rows, dtype=cd, device=dev)
    if kind == "forward_kl":
        kd = acc / l_t + (m_s - m_t) + (ll_s - ll_t)
    elif kind == "reverse_kl":
        kd = acc / l_s + (m_t - m_s) + (ll_t - ll_s)
    else:  # JSD: one more sweep with the final lse values
        log_b, log_1mb = math.log(beta), math.log1p(-beta)
        kl_pm = torch.zeros(rows, dtype=cd, device=dev)
        for v0, v1 in tiles.ranges():
            zs, zt = tile(v0, v1)
            log_q = _log_softmax_tile(zs, inv_t, m_s, ll_s)
            log_p = _log_softmax_tile(zt, inv_t, m_t, ll_t)
            log_m = torch.logaddexp(log_p + log_b, log_q + log_1mb)
            kl_pm += (log_p - log_m).mul_(log_p.exp()).sum(1)  # p (log p - log m)
            kl_qm += (log_q - log_m).mul_(log_q.exp()).sum(1)  # q (log q - log m)
            del zs, zt, log_q, log_p, log_m
        kd = beta * kl_pm + (1.0 - beta) * kl_qm
    if not need_grad:
        return ce, kd

    # sweep 2: gradient tiles straight into d hidden / d weight / d bias
    w_kd_t = w_kd * inv_t
    d_lse = (m_s - m_t) + (ll_s - ll_t)  # lse(s) - lse(t)
    for v0, v1 in tiles.ranges():
        dcap = kept_dcap
        kept_dcap = None
        if kind == "jsd":  # sweep 1 kept nothing (no reuse for the JSD): recompute the tile
            zs, zt = tile(v0, v1)
            if cap is not None:
                dcap = softcap_grad(zs, cap)
            ez = None if t1 else (zs - m_z[:, None]).exp_()
            log_q = _log_softmax_tile(zs, inv_t, m_s, ll_s)
            log_p = _log_softmax_tile(zt, inv_t, m_t, ll_t).add_(math.log(beta))
            q = log_q.exp()
            g = torch.logaddexp(log_p, log_q + math.log1p(-beta))  # log m
            del log_p
            g.neg_().add_(log_q).sub_(kl_qm[:, None]).mul_(q).mul_((1.0 - beta) * w_kd_t)
            if t1:
                g.add_(q.mul_(w_ce))  # softmax(zS) = q at T = 1
            del log_q, q, zs, zt
        else:
            if kept is not None:
                es, et, diff, ez = kept
                kept = None
            else:
                zs, zt = tile(v0, v1)
                if cap is not None:
                    dcap = softcap_grad(zs, cap)
                ez = None if t1 else (zs - m_z[:, None]).exp_()
                es, et, diff = _kl_terms(
                    _scaled(zs, inv_t, False),
                    _scaled(zt, inv_t, False),
                    m_s,
                    m_t,
                    "reverse_kl" if kind == "reverse_kl" else None,
                    not t1,
                )
                del zs, zt
            if kind == "forward_kl":  # G = w_ce softmax(zS) + w_kd (q - p) / T
                q_scale = (w_kd_t + w_ce) / l_s if t1 else w_kd_t / l_s
                g = es.mul_(q_scale[:, None]).sub_(et.mul_((w_kd_t / l_t)[:, None]))
            else:  # reverse_kl: G = w_ce softmax(zS) + w_kd q (s - t - (lse_s - lse_t) - KL) / T
                assert diff is not None  # kept by sweep 1, or _kl_terms(..., "reverse_kl")
                del et
                g = diff.sub_((d_lse + kd)[:, None]).mul_(w_kd_t)
                if t1:
                    g.add_(w_ce)
                g.mul_(es.mul_((1.0 / l_s)[:, None]))
            del es, diff
        if ez is not None:  # softmax(zS) at T = 1 for the CE
            g.add_(ez.mul_((w_ce / l_z)[:, None]))
            del ez
        _subtract_onehot(g, lab, v0, v1, w_ce)
        if dcap is not None:  # d loss / d zS of the capped logits -> of the linear ones
            g.mul_(dcap)
            del dcap
        accumulate_grads(g, tiles.hidden, tiles.weight, v0, v1, dh_c, dw, db)
        del g
    return ce, kd


def run_token_chunks(
    batch: FusedBatch,
    config: KDConfig,
    weights: tuple[torch.Tensor, torch.Tensor],
    plan: FusedPlan,
    out: FusedBuffers,
    observer: TileObserver | None = None,
) -> None:
    """The token_chunks and recompute strategies: fills ``out`` chunk by chunk of ``plan.token_chunk``
    valid tokens, in the compute dtype of ``out`` (float32, float64 for float64 inputs)."""
    cd, dev = out.ce.dtype, out.ce.device
    t = batch.teacher
    for c0 in range(0, int(batch.rows.numel()), plan.token_chunk):
        rows = batch.rows[c0 : c0 + plan.token_chunk]
        h_c = batch.hidden.index_select(0, rows).to(cd)
        lab_c = batch.labels.index_select(0, rows)
        zlab = (h_c * batch.weight.index_select(0, lab_c).to(cd)).sum(1)
        if batch.bias is not None:
            zlab = zlab + batch.bias.index_select(0, lab_c).to(cd)
        zlab = softcap_(zlab, batch.softcap)
        if t.logits is not None:  # the chunk's own copy: its columns may be changed in place
            teacher = TeacherInputs(logits=t.logits.index_select(0, rows))
        else:
            assert t.hidden is not None
            teacher = TeacherInputs(
                hidden=t.hidden.index_select(0, rows).to(cd), weight=t.weight, bias=t.bias, softcap=t.softcap
            )
        tiles = ChunkTiles(h_c, batch.weight, batch.bias, teacher, plan.vocab_tile, observer, batch.softcap)
        dh_c = torch.zeros(rows.shape[0], h_c.shape[1], dtype=cd, device=dev) if out.dh is not None else None
        ce, kd = chunk_rows(tiles, lab_c, zlab, config, weights, (dh_c, out.dw, out.db))
        del tiles
        out.ce.index_copy_(0, rows, ce)
        out.kd.index_copy_(0, rows, kd)
        if out.dh is not None and dh_c is not None:  # dh_c exists exactly when out.dh does
            out.dh.index_copy_(0, rows, dh_c)
