"""Fused ``lm_head`` + KD loss in pure torch, tiled over tokens and vocabulary ("chunked" backend).

The ladder (CONVENTIONS.md 1): ``fused_linear_kd_forward`` (launcher on plain tensors; it also
produces the gradients) -> ``FusedLinearKDChunkedFunction`` (autograd) -> ``fused_linear_kd``
(the backend contract used by ``ddk.losses.fused.fused_linear_kd_loss``).

Nothing of size ``(N, V)`` is allocated: the student logits ``zS = h W^T (+ b)`` and the teacher
logits ``zT = h_T W_T[:V]^T`` (or slices of given teacher logits) exist only as tiles of
``token_chunk x vocab_tile`` rows/columns. Ignored tokens are dropped before any matmul.

Notation of one row: ``s = zS / T``, ``t = zT / T``, ``q = softmax(s)`` (student),
``p = softmax(t)`` (teacher), ``m = beta p + (1 - beta) q``.

Per token chunk:

* sweep 1 (every divergence) folds each tile into online per-row statistics: max/sum of
  exponentials of ``s``, ``t`` and (when ``T != 1``) ``zS``, and a rescaled accumulator
  ``A = sum e^(t - max t) (t - s)`` (forward KL: ``KL(p||q) = A / l_t - lse(t) + lse(s)``) or
  ``A = sum e^(s - max s) (s - t)`` (reverse KL: ``KL(q||p) = A / l_s - lse(s) + lse(t)``).
  The label logit is a row-wise dot ``h . W[label] (+ b[label])``.
* JSD only: one more sweep with the final ``lse`` values for ``KL(p||m)`` and ``KL(q||m)``.
* sweep 2 (only when a gradient is needed) rebuilds each tile, forms the gradient tile
  ``G = w_kd dD/dzS + w_ce softmax(zS)`` and multiplies it straight into ``d hidden`` and
  ``d weight`` (and ``d bias``); the ``- w_ce onehot(label)`` part of the CE gradient is applied as
  a row gather / ``index_add`` instead. ``dD/dzS`` is ``(q - p) / T`` (forward KL),
  ``q (log q - log p - KL(q||p)) / T`` (reverse KL), ``q (1 - beta)(log(q/m) - KL(q||m)) / T`` (JSD).

The loss is a scalar, so the per-token weights ``w_ce = 1 / normalizer`` and
``w_kd = gamma * s / normalizer`` (``s = T**2`` with ``t2_scale``) are known in the forward pass;
the gradients are computed there and the backward only scales them by ``grad_output``.

Strategies (``plan_fused``):

* ``"token_chunks"``: the vocabulary tile is the whole vocabulary, so each chunk's
  ``(chunk, V)`` logits are computed once and reused by every sweep (no recompute); memory
  ``~ 8 * chunk * V * 4`` bytes.
* ``"recompute"``: vocabulary tiles of at most 2048 columns, recomputed in each sweep
  (student and teacher matmuls run 2x, 3x for JSD); memory ``~ 8 * chunk * tile * 4`` bytes.
* ``"gemm"``: token chunks whose logits are computed by one matmul each in the input dtype
  (bfloat16 tensor cores on a GPU; the logits are rounded to that dtype, as in an unfused
  ``lm_head``), then the per-row kernels of the logits backends (``cpp``, else ``triton`` on
  CUDA, else ``chunked``) give the loss rows and the ``(chunk, V)`` logits gradient, which two
  more matmuls turn into ``d hidden`` and ``d weight`` (float32 results through ``out_dtype``
  where torch supports it on the device). Memory ``~ 3 * chunk * V * elem`` bytes; the
  workspace is ``min(max(available / 16, 64 MiB), 1 GiB)``.
* ``"auto"``: ``gemm`` on CUDA when hidden and weight share a dtype; else ``token_chunks`` when a workspace of ``min(max(available / 16, 32 MiB), 256 MiB)``
  (available = ``/proc/meminfo`` MemAvailable on CPU, ``torch.cuda.mem_get_info`` free on GPU)
  holds chunks of at least 32 tokens (or all tokens); ``recompute`` otherwise. On CPU the
  recompute sweeps cost +50% matmul FLOPs while token_chunks at 32 rows costs only the extra
  read-modify-write of ``d weight`` per chunk, so recompute is kept for tight memory.

Low-precision weights (bfloat16/float16) are upcast tile by tile: logits, statistics and
accumulators are float32 (float64 for float64 inputs), so nothing is rounded to bfloat16 before
the softmax. The token mask costs one host sync (``nonzero``) per call.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ddk_kernels.autograd import apply_fused, fused_epilogue, fused_loss_function
from ddk_kernels.chunked import _rowdot
from ddk_kernels.types import KDConfig, acc_dtype

__all__ = [
    "STRATEGIES",
    "FusedPlan",
    "available_memory_bytes",
    "default_workspace_bytes",
    "gemm_row_kernels",
    "gemm_workspace_bytes",
    "plan_fused",
    "fused_linear_kd_forward",
    "FusedLinearKDChunkedFunction",
    "fused_linear_kd",
    "is_available",
]

STRATEGIES: tuple[str, ...] = ("auto", "recompute", "token_chunks", "gemm")

_MiB = 1 << 20
_TC_BUFFERS = 8  # live (chunk, V) float buffers of the token_chunks strategy (measured: <= 8)
_RC_BUFFERS = 8  # live (chunk, tile) buffers of the recompute strategy
_RC_VOCAB_TILE = 2048  # vocabulary tile of the recompute strategy
_MIN_TC_ROWS = 32  # below this many rows per chunk the thin matmuls and dW traffic cost more than recompute
_LOWP_SUBTILE = 4096  # weight rows upcast at a time for bfloat16/float16 weights
_GEMM_BUFFERS = 3  # live (chunk, V) buffers of the gemm strategy: zS, zT, d zS
_GEMM_MAX_WORKSPACE = 1 << 30
_GEMM_MIN_WORKSPACE = 64 * _MiB
_GEMM_ROW_ALIGN = 64  # chunks are multiples of this many rows (matmul tiles) when more fit

# Test hook: called with the shape of every logits tile the chunked path allocates.
_TILE_OBSERVER: Callable[[tuple[int, int]], None] | None = None


def is_available(device: torch.device | str) -> tuple[bool, str]:
    """The chunked fused path is plain torch: it runs on every device."""
    return True, ""


def available_memory_bytes(device: torch.device | str) -> int | None:
    """Free memory of ``device``: ``MemAvailable`` of ``/proc/meminfo`` on CPU, free bytes of
    ``torch.cuda.mem_get_info`` on CUDA, None when unknown."""
    device = torch.device(device)
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cpu":
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
    except (OSError, RuntimeError, ValueError):
        return None
    return None


def default_workspace_bytes(device: torch.device | str) -> int:
    """Scratch memory the fused path may use: ``available / 16`` clamped to [32 MiB, 256 MiB]."""
    avail = available_memory_bytes(device)
    if avail is None:
        return 256 * _MiB
    return int(min(max(avail // 16, 32 * _MiB), 256 * _MiB))


def gemm_workspace_bytes(device: torch.device | str) -> int:
    """Scratch memory of the ``gemm`` strategy: ``available / 16`` clamped to [64 MiB, 1 GiB]."""
    avail = available_memory_bytes(device)
    if avail is None:
        return _GEMM_MAX_WORKSPACE // 4
    return int(min(max(avail // 16, _GEMM_MIN_WORKSPACE), _GEMM_MAX_WORKSPACE))


@dataclass(frozen=True)
class FusedPlan:
    """How one call is tiled.

    Attributes:
        strategy: ``"token_chunks"`` (vocab tile = V, logits computed once per chunk),
            ``"recompute"`` (vocab tiles recomputed in every sweep) or ``"gemm"`` (vocab tile =
            V, logits in the input dtype, per-row kernels of the logits backends).
        token_chunk: tokens per chunk (>= 1).
        vocab_tile: vocabulary columns per tile (== V for token_chunks).
    """

    strategy: str
    token_chunk: int
    vocab_tile: int


def plan_fused(
    num_tokens: int,
    vocab: int,
    *,
    compute_bytes: int = 4,
    strategy: str = "auto",
    workspace_bytes: int | None = None,
    device: torch.device | str = "cpu",
    input_bytes: int | None = None,
    gemm_ok: bool = False,
) -> FusedPlan:
    """Choose strategy, token chunk and vocabulary tile (the heuristic of the module docstring).

    Args:
        num_tokens: valid (non-ignored) tokens N.
        vocab: student vocabulary V.
        compute_bytes: bytes per element of the compute dtype (4, or 8 for float64).
        strategy: ``"auto"``, ``"recompute"``, ``"token_chunks"`` or ``"gemm"``.
        workspace_bytes: scratch budget; default ``default_workspace_bytes(device)``
            (``gemm_workspace_bytes(device)`` for ``gemm``).
        device: where the budget is measured; ``"auto"`` picks ``gemm`` on CUDA.
        input_bytes: bytes per element of the inputs (the ``gemm`` logits); default
            ``compute_bytes``.
        gemm_ok: whether ``gemm`` can run (hidden and weight share a dtype); ``"auto"`` only
            picks it then.

    Returns:
        ``FusedPlan``; ``token_chunk * vocab_tile * compute_bytes * 8 <= workspace`` whenever the
        budget allows one row (an explicit ``"token_chunks"`` always gets at least one row).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"fused_linear_kd_loss: strategy must be one of {STRATEGIES}; got {strategy!r}.")
    n = max(1, num_tokens)
    if strategy == "auto" and gemm_ok and torch.device(device).type == "cuda":
        strategy = "gemm"
    if strategy == "gemm":
        ws = int(workspace_bytes) if workspace_bytes is not None else gemm_workspace_bytes(device)
        rows = ws // (_GEMM_BUFFERS * vocab * (input_bytes or compute_bytes))
        if rows >= 2 * _GEMM_ROW_ALIGN:
            rows -= rows % _GEMM_ROW_ALIGN
        return FusedPlan("gemm", max(1, min(n, rows)), vocab)
    ws = int(workspace_bytes) if workspace_bytes is not None else default_workspace_bytes(device)
    tc_rows = ws // (_TC_BUFFERS * vocab * compute_bytes)
    if strategy == "auto":
        strategy = "token_chunks" if tc_rows >= min(n, _MIN_TC_ROWS) else "recompute"
    if strategy == "token_chunks":
        return FusedPlan("token_chunks", max(1, min(n, tc_rows)), vocab)
    tile = min(vocab, _RC_VOCAB_TILE)
    rows = ws // (_RC_BUFFERS * tile * compute_bytes)
    if rows < 16 and tile > 16:  # tiny budget: narrower tiles rather than single-token chunks
        tile = max(16, ws // (_RC_BUFFERS * 16 * compute_bytes))
        tile = min(vocab, tile)
        rows = ws // (_RC_BUFFERS * tile * compute_bytes)
    return FusedPlan("recompute", max(1, min(n, rows)), tile)


# ----------------------------------------------------------------------------------------------
# tiles


def _observe(shape: tuple[int, int]) -> None:
    if _TILE_OBSERVER is not None:
        _TILE_OBSERVER(shape)


def _linear_tile(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, v0: int, v1: int) -> torch.Tensor:
    """``x @ weight[v0:v1].T (+ bias[v0:v1])`` in ``x.dtype`` (the compute dtype); low-precision
    weights are upcast ``_LOWP_SUBTILE`` rows at a time."""
    _observe((x.shape[0], v1 - v0))
    cd = x.dtype
    if weight.dtype == cd:
        out = x @ weight[v0:v1].T
    else:
        out = torch.empty(x.shape[0], v1 - v0, dtype=cd, device=x.device)
        for a in range(v0, v1, _LOWP_SUBTILE):
            b = min(v1, a + _LOWP_SUBTILE)
            out[:, a - v0:b - v0] = x @ weight[a:b].to(cd).T
    if bias is not None:
        out += bias[v0:v1].to(cd)
    return out


def _accumulate_grads(
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
                dx.addmm_(g[:, a - v0:b - v0], weight[a:b].to(g.dtype))
    if dw is not None:
        dw[v0:v1].addmm_(g.T, x)
    if db is not None:
        db[v0:v1] += g.sum(0)


class _ChunkTiles:
    """Student and teacher logits tiles of one token chunk, cached when the tile is the whole
    vocabulary (token_chunks strategy)."""

    def __init__(self, h_c, weight, bias, th_c, t_weight, tl_c, vocab, tile, cd):  # type: ignore[no-untyped-def]
        self.h_c, self.weight, self.bias = h_c, weight, bias
        self.th_c, self.t_weight, self.tl_c = th_c, t_weight, tl_c
        self.vocab, self.tile, self.cd = vocab, tile, cd
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def ranges(self) -> list[tuple[int, int]]:
        return [(v0, min(self.vocab, v0 + self.tile)) for v0 in range(0, self.vocab, self.tile)]

    def get(self, v0: int, v1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(zS, zT)`` tiles in the compute dtype. Treat both as read-only."""
        if self._cache is not None:
            return self._cache
        zs = _linear_tile(self.h_c, self.weight, self.bias, v0, v1)
        if self.tl_c is not None:
            zt = self.tl_c[:, v0:v1]
            if zt.dtype != self.cd:
                zt = zt.to(self.cd)
        else:
            zt = _linear_tile(self.th_c, self.t_weight, None, v0, v1)
        if self.tile >= self.vocab:
            self._cache = (zs, zt)
        return zs, zt


def _subtract_onehot(g: torch.Tensor, lab: torch.Tensor, v0: int, v1: int, w_ce: torch.Tensor) -> None:
    """``g[r, lab[r] - v0] -= w_ce`` for the rows whose label falls in ``[v0, v1)`` (no host sync)."""
    local = lab - v0
    inside = (local >= 0) & (local < v1 - v0)
    src = torch.where(inside, -w_ce, torch.zeros((), dtype=g.dtype, device=g.device)).to(g.dtype)
    g.scatter_add_(1, local.clamp(0, v1 - v0 - 1)[:, None], src[:, None])


def _chunk_rows(
    tiles: _ChunkTiles,
    lab: torch.Tensor,
    zlab: torch.Tensor,
    config: KDConfig,
    w_ce: torch.Tensor,
    w_kd: torch.Tensor,
    dh_c: torch.Tensor | None,
    dw: torch.Tensor | None,
    db: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(ce, kd)`` of one chunk (any tiling, any divergence); accumulates the gradient
    tiles into ``dh_c``, ``dw``, ``db`` when they are given."""
    cd = tiles.cd
    rows = zlab.shape[0]
    T = float(config.temperature)
    t_is_one = T == 1.0
    inv_t = 1.0 / T
    kind = config.effective_divergence
    dev = zlab.device
    ninf = torch.full((rows,), -math.inf, dtype=cd, device=dev)
    m_s, m_t, m_z = ninf.clone(), ninf.clone(), ninf.clone()
    l_s = torch.zeros(rows, dtype=cd, device=dev)
    l_t, l_z, acc = l_s.clone(), l_s.clone(), l_s.clone()

    # sweep 1: online statistics
    for v0, v1 in tiles.ranges():
        zs, zt = tiles.get(v0, v1)
        s = zs if t_is_one else zs * inv_t
        t = zt if t_is_one else zt * inv_t
        new_m_s = torch.maximum(m_s, s.amax(1))
        new_m_t = torch.maximum(m_t, t.amax(1))
        a_s = torch.exp(m_s - new_m_s)
        a_t = torch.exp(m_t - new_m_t)
        es = (s - new_m_s[:, None]).exp_()
        l_s = l_s * a_s + es.sum(1)
        et = (t - new_m_t[:, None]).exp_()
        l_t = l_t * a_t + et.sum(1)
        if kind == "forward_kl":
            diff = t - s
            acc = acc * a_t + diff.mul_(et).sum(1)
        elif kind == "reverse_kl":
            diff = s - t
            acc = acc * a_s + diff.mul_(es).sum(1)
        del es, et
        if not t_is_one:
            new_m_z = torch.maximum(m_z, zs.amax(1))
            ez = (zs - new_m_z[:, None]).exp_()
            l_z = l_z * torch.exp(m_z - new_m_z) + ez.sum(1)
            del ez
            m_z = new_m_z
        m_s, m_t = new_m_s, new_m_t
    # log-probabilities are formed as (x - max) - log(sum): subtracting the full lse from
    # logits of size ~100 would cost ulp(100) ~ 1e-5 relative error in every probability.
    ll_s, ll_t = l_s.log(), l_t.log()
    if t_is_one:
        m_z, ll_z = m_s, ll_s
    else:
        ll_z = l_z.log()
    ce = (m_z - zlab) + ll_z

    beta = float(config.beta)
    kl_qm = None
    if kind == "forward_kl":
        kd = acc / l_t + (m_s - m_t) + (ll_s - ll_t)
    elif kind == "reverse_kl":
        kd = acc / l_s + (m_t - m_s) + (ll_t - ll_s)
    else:  # JSD: one more sweep with the final lse values
        log_b, log_1mb = math.log(beta), math.log1p(-beta)
        kl_pm = torch.zeros(rows, dtype=cd, device=dev)
        kl_qm = kl_pm.clone()
        for v0, v1 in tiles.ranges():
            zs, zt = tiles.get(v0, v1)
            log_q = _log_softmax_tile(zs, inv_t, m_s, ll_s)
            log_p = _log_softmax_tile(zt, inv_t, m_t, ll_t)
            log_m = torch.logaddexp(log_p + log_b, log_q + log_1mb)
            kl_pm += (log_p - log_m).mul_(log_p.exp()).sum(1)  # p (log p - log m)
            kl_qm += (log_q - log_m).mul_(log_q.exp()).sum(1)  # q (log q - log m)
            del log_q, log_p, log_m
        kd = beta * kl_pm + (1.0 - beta) * kl_qm

    if dh_c is None and dw is None and db is None:
        return ce, kd

    # sweep 2: gradient tiles straight into d hidden / d weight / d bias
    w_kd_t = w_kd * inv_t
    for v0, v1 in tiles.ranges():
        zs, zt = tiles.get(v0, v1)
        log_q = _log_softmax_tile(zs, inv_t, m_s, ll_s)
        q = log_q.exp()
        if kind == "forward_kl":
            g = _log_softmax_tile(zt, inv_t, m_t, ll_t).exp_().neg_().add_(q)  # q - p
        elif kind == "reverse_kl":
            g = _log_softmax_tile(zt, inv_t, m_t, ll_t)
            g.neg_().add_(log_q).sub_(kd[:, None]).mul_(q)  # q (log q - log p - KL)
        else:
            log_p = _log_softmax_tile(zt, inv_t, m_t, ll_t)
            log_p.add_(math.log(beta))
            g = torch.logaddexp(log_p, log_q + math.log1p(-beta))  # log m
            del log_p
            g.neg_().add_(log_q).sub_(kl_qm[:, None]).mul_(q).mul_(1.0 - beta)  # type: ignore[index]
        del log_q
        g.mul_(w_kd_t)
        if t_is_one:
            g.add_(q.mul_(w_ce))  # softmax(zS) = q at T = 1
            del q
        else:
            del q
            g.add_(_log_softmax_tile(zs, 1.0, m_z, ll_z).exp_().mul_(w_ce))
        _subtract_onehot(g, lab, v0, v1, w_ce)
        _accumulate_grads(g, tiles.h_c, tiles.weight, v0, v1, dh_c, dw, db)
        del g
    return ce, kd


def _log_softmax_tile(z: torch.Tensor, scale: float, m: torch.Tensor, ll: torch.Tensor) -> torch.Tensor:
    """New tensor ``(z * scale - m) - ll`` (row statistics ``m`` = max, ``ll`` = log of the sum of
    exponentials of ``z * scale - m``)."""
    out = z * scale if scale != 1.0 else z.clone()
    out.sub_(m[:, None]).sub_(ll[:, None])
    return out


def _chunk_rows_whole_vocab(
    tiles: _ChunkTiles,
    lab: torch.Tensor,
    zlab: torch.Tensor,
    config: KDConfig,
    w_ce: torch.Tensor,
    w_kd: torch.Tensor,
    dh_c: torch.Tensor | None,
    dw: torch.Tensor | None,
    db: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``_chunk_rows`` for one tile spanning the vocabulary and a KL divergence (token_chunks).

    Same math with fewer passes over the ``(chunk, V)`` buffers, reusing ``e^(s - max s)`` and
    ``e^(t - max t)`` of the statistics as ``q`` and ``p``; at most 4 such buffers live
    (``zS``/``s``, ``zT``/``t``, ``t - s`` and, when ``T != 1``, ``softmax(zS)``).
    """
    vocab = tiles.vocab
    zs, zt = tiles.get(0, vocab)
    # We own both buffers from here and modify them in place: zS is a fresh matmul, zT a fresh
    # matmul or a slice of this chunk's own index_select copy of the teacher logits.
    tiles._cache = None
    T = float(config.temperature)
    t_is_one = T == 1.0
    inv_t = 1.0 / T
    forward = config.effective_divergence == "forward_kl"
    need_grad = dh_c is not None or dw is not None or db is not None
    sm = None
    lse_z = None
    if not t_is_one:  # softmax(zS) at T = 1 for the CE, before zS is scaled in place
        m_z = zs.amax(1, keepdim=True)
        sm = (zs - m_z).exp_()
        l_z = sm.sum(1)
        lse_z = m_z.view(-1) + l_z.log()
        if need_grad:
            sm.mul_((w_ce / l_z)[:, None])  # w_ce softmax(zS)
        else:
            sm = None
        zs.mul_(inv_t)
        zt.mul_(inv_t)
    s, t = zs, zt
    m_s = s.amax(1, keepdim=True)
    m_t = t.amax(1, keepdim=True)
    diff = t - s if forward else s - t
    es = s.sub_(m_s).exp_()
    et = t.sub_(m_t).exp_()
    l_s = es.sum(1)
    l_t = et.sum(1)
    d_lse = (m_s - m_t).view(-1) + (l_s.log() - l_t.log())  # lse(s) - lse(t)
    if forward:  # KL(p||q) = sum p (t - s) - lse(t) + lse(s)
        kd = _rowdot(diff, et) / l_t + d_lse
    else:  # KL(q||p) = sum q (s - t) - lse(s) + lse(t)
        kd = _rowdot(diff, es) / l_s - d_lse
    ce = ((m_s.view(-1) - zlab) + l_s.log()) if t_is_one else (lse_z - zlab)  # type: ignore[operator]
    if not need_grad:
        return ce, kd
    w_kd_t = w_kd * inv_t
    if forward:
        del diff
        # G = w_ce softmax(zS) + w_kd (q - p) / T
        q_scale = (w_kd_t + w_ce) / l_s if t_is_one else w_kd_t / l_s
        g = es.mul_(q_scale[:, None]).sub_(et.mul_((w_kd_t / l_t)[:, None]))
    else:
        # G = w_ce softmax(zS) + w_kd q (s - t - (lse_s - lse_t) - KL) / T
        del et
        q = es.mul_((1.0 / l_s)[:, None])
        g = diff.sub_((d_lse + kd)[:, None]).mul_(w_kd_t)
        if t_is_one:
            g.add_(w_ce)
        g.mul_(q)
        del q, es
    if sm is not None:
        g.add_(sm)
        del sm
    _subtract_onehot(g, lab, 0, vocab, w_ce)
    _accumulate_grads(g, tiles.h_c, tiles.weight, 0, vocab, dh_c, dw, db)
    return ce, kd


# ----------------------------------------------------------------------------------------------
# gemm strategy

_OUT_DTYPE_MM: dict[tuple[str, str], bool] = {}  # (device type, "mm"/"addmm") -> out_dtype works there
_FALLBACK_ROWS = 8192  # rows of ``a`` per rounded product on the fallback path (bounded temporaries)


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """``out (+)= a @ b`` with ``out`` in the compute dtype and ``a``, ``b`` in the input dtype.

    Low-precision operands use ``out_dtype`` (a float32 result of the bf16 matmul, no rounding
    of the product) where torch supports it on the device (CUDA), else the product rounded to the
    input dtype, ``_FALLBACK_ROWS`` rows of ``a`` at a time (a warning says so, once per op).
    Out-of-memory errors propagate.
    """
    if a.dtype == out.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
        return
    key = (out.device.type, "addmm" if accumulate else "mm")
    if _OUT_DTYPE_MM.get(key, key[0] == "cuda"):
        try:
            if accumulate:
                torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
            else:
                torch.mm(a, b, out_dtype=out.dtype, out=out)
            _OUT_DTYPE_MM[key] = True
            return
        except torch.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError, NotImplementedError) as exc:
            if key[0] == "cuda":
                warnings.warn(
                    f"fused_linear_kd_loss: torch.{key[1]}(..., out_dtype={out.dtype}) failed on this torch "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); the gemm strategy now rounds "
                    f"each {key[1]} product to {a.dtype} before accumulating.", RuntimeWarning, stacklevel=3,
                )
            _OUT_DTYPE_MM[key] = False
    for r0 in range(0, a.shape[0], _FALLBACK_ROWS):
        r1 = min(a.shape[0], r0 + _FALLBACK_ROWS)
        if accumulate:
            out[r0:r1].add_(a[r0:r1] @ b)
        else:
            out[r0:r1].copy_(a[r0:r1] @ b)


def gemm_row_kernels(device: torch.device | str) -> tuple[str, Callable[..., Any], Callable[..., Any]]:
    """``(name, forward, backward)``: the per-row launchers the ``gemm`` strategy uses on ``device``.

    ``cpp`` where the compiled ops run there, else ``triton`` on CUDA, else ``chunked`` (torch).
    """
    from ddk_kernels import cpp

    dev = torch.device(device)
    if cpp.is_available(dev)[0]:
        return "cpp", cpp.kd_forward, cpp.kd_backward
    if dev.type == "cuda":
        from ddk_kernels import triton as triton_backend

        if triton_backend.is_available(dev)[0]:
            from ddk_kernels.triton.kd_loss import kd_backward_triton, kd_forward_triton

            return "triton", kd_forward_triton, kd_backward_triton
    from ddk_kernels.chunked import kd_chunked_backward, kd_chunked_forward

    return "chunked", kd_chunked_forward, kd_chunked_backward


def _gemm_chunks(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    labels: torch.Tensor,
    idx: torch.Tensor,
    config: KDConfig,
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    teacher_logits: torch.Tensor | None,
    w_ce: torch.Tensor,
    w_kd: torch.Tensor,
    token_chunk: int,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
) -> None:
    """The ``gemm`` strategy: fills ``out = (ce_rows, kd_rows, dh, dw, db)`` (compute dtype).

    The row backward gets the upstream weights ``1`` and ``w_kd / w_ce`` (``gamma * kd_scale``), so
    the ``(r, V)`` logits gradient is O(1) in the input dtype (``1 / normalizer`` there would put
    float16 gradients into the subnormal range for large token counts); ``w_ce = 1 / normalizer``
    is applied once to the float32 ``d hidden``, ``d weight``, ``d bias`` at the end.
    """
    ce_rows, kd_rows, dh, dw, db = out
    vocab = student_weight.shape[0]
    dt = student_hidden.dtype
    if student_weight.dtype != dt:
        raise TypeError(
            f"fused_linear_kd_loss: student_weight must have the dtype of student_hidden ({dt}) for "
            f"strategy='gemm'; got {student_weight.dtype}. Cast one of them, or use strategy='token_chunks'."
        )
    _, fwd, bwd = gemm_row_kernels(student_hidden.device)
    acc = ce_rows.dtype
    need_grad = dh is not None or dw is not None or db is not None
    w_t = student_weight.T
    tw_t = teacher_weight[:vocab].T if teacher_weight is not None else None
    kd_ratio = w_kd / w_ce  # gamma * kd_scale, a 0-dim tensor (no host sync)
    for c0 in range(0, int(idx.numel()), token_chunk):
        rows = idx[c0:c0 + token_chunk]
        r = int(rows.numel())
        h_c = student_hidden.index_select(0, rows)
        lab_c = labels.index_select(0, rows)
        _observe((r, vocab))
        zs = torch.addmm(student_bias.to(dt), h_c, w_t) if student_bias is not None else h_c @ w_t
        if teacher_logits is not None:
            zt = teacher_logits[:, :vocab].index_select(0, rows)  # copies only the V columns used
        else:
            assert teacher_hidden is not None and tw_t is not None
            zt = teacher_hidden.index_select(0, rows).to(tw_t.dtype) @ tw_t
        if zt.dtype != dt:
            zt = zt.to(dt)
        ce, kd, stats = fwd(zs, zt, lab_c, config)
        ce_rows.index_copy_(0, rows, ce.to(acc))
        kd_rows.index_copy_(0, rows, kd.to(acc))
        if not need_grad:
            continue
        g = bwd(zs, zt, lab_c, stats, torch.ones(r, dtype=ce.dtype, device=ce.device),
                kd_ratio.to(ce.dtype).expand(r).contiguous(), config)  # (r, V), input dtype, unscaled
        del zs, zt, stats
        if dh is not None:
            dh_c = torch.empty(r, dh.shape[1], dtype=acc, device=dh.device)
            _mm_into(dh_c, g, student_weight, accumulate=False)
            dh.index_copy_(0, rows, dh_c)
            del dh_c
        if dw is not None:
            _mm_into(dw, g.T, h_c, accumulate=True)
        if db is not None:
            db += g.sum(0, dtype=acc)
        del g
    for t in (dh, dw, db):
        if t is not None:
            t.mul_(w_ce.to(t.dtype))


def fused_linear_kd_forward(
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
    strategy: str = "auto",
    workspace_bytes: int | None = None,
    need_grads: tuple[bool, bool, bool] = (True, True, True),
    plan: FusedPlan | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Loss, per-row values and (optionally) gradients of the fused lm_head + KD loss.

    Args:
        student_hidden: ``(N, Hs)`` float32/bfloat16/float16/float64.
        student_weight: ``(V, Hs)`` same device.
        labels: ``(N,)`` int64; ``config.ignore_index`` rows contribute nothing.
        config: temperature, divergence, beta, ignore_index.
        teacher_hidden, teacher_weight: ``(N, Ht)`` and ``(Vt, Ht)``, ``Vt >= V`` (rows beyond V
            are never read); or
        teacher_logits: ``(N, Vt)``, ``Vt >= V`` (columns beyond V are never read).
        student_bias: ``(V,)`` or None.
        gamma, kd_scale: the divergence enters the loss as ``gamma * kd_scale * kd``.
        normalizer: denominator of the loss; default the number of valid tokens (at least 1).
        strategy, workspace_bytes: see ``plan_fused``.
        need_grads: which of ``(d hidden, d weight, d bias)`` to compute.
        plan: explicit tiling (tests); overrides ``strategy`` and ``workspace_bytes``.

    Returns:
        ``(loss, ce, kd, d_hidden, d_weight, d_bias)``: ``loss`` 0-dim in the compute dtype
        (float32; float64 for float64 inputs), ``ce`` and ``kd`` ``(N,)`` (0 on ignored rows),
        gradients of ``loss`` in the dtype of their inputs (``d_hidden`` is 0 on ignored rows) or
        None where not requested.
    """
    n, hs = student_hidden.shape
    vocab = student_weight.shape[0]
    dev = student_hidden.device
    cd = acc_dtype(student_hidden.dtype)
    valid = labels != config.ignore_index
    idx = valid.nonzero().squeeze(1)  # the one host sync: ignored tokens are dropped up front
    nv = int(idx.numel())
    if normalizer is None:
        norm = torch.tensor(float(max(nv, 1)), dtype=cd, device=dev)
    else:
        norm = torch.as_tensor(normalizer, device=dev).detach().to(cd)
    w_ce = 1.0 / norm
    w_kd = (float(gamma) * float(kd_scale)) / norm

    need_dh, need_dw, need_db = need_grads
    need_db = need_db and student_bias is not None
    ce_rows = torch.zeros(n, dtype=cd, device=dev)
    kd_rows = torch.zeros(n, dtype=cd, device=dev)
    dh = torch.zeros(n, hs, dtype=cd, device=dev) if need_dh else None
    dw = torch.zeros(vocab, hs, dtype=cd, device=dev) if need_dw else None
    db = torch.zeros(vocab, dtype=cd, device=dev) if need_db else None

    if plan is None:
        plan = plan_fused(
            nv, vocab, compute_bytes=torch.finfo(cd).bits // 8, strategy=strategy,
            workspace_bytes=workspace_bytes, device=dev, input_bytes=student_hidden.element_size(),
            gemm_ok=student_weight.dtype == student_hidden.dtype,
        )
    if plan.strategy == "gemm":
        _gemm_chunks(
            student_hidden, student_weight, student_bias, labels, idx, config, teacher_hidden, teacher_weight,
            teacher_logits, w_ce, w_kd, plan.token_chunk, (ce_rows, kd_rows, dh, dw, db),
        )
        return fused_epilogue(
            ce_rows, kd_rows, norm, gamma, kd_scale, (dh, dw, db), (student_hidden, student_weight, student_bias)
        )
    for c0 in range(0, nv, plan.token_chunk):
        rows = idx[c0:c0 + plan.token_chunk]
        h_c = student_hidden.index_select(0, rows).to(cd)
        lab_c = labels.index_select(0, rows)
        w_lab = student_weight.index_select(0, lab_c).to(cd)
        zlab = (h_c * w_lab).sum(1)
        if student_bias is not None:
            zlab = zlab + student_bias.index_select(0, lab_c).to(cd)
        if teacher_logits is not None:
            th_c, tl_c = None, teacher_logits.index_select(0, rows)
        else:
            assert teacher_hidden is not None
            th_c, tl_c = teacher_hidden.index_select(0, rows).to(cd), None
        tiles = _ChunkTiles(h_c, student_weight, student_bias, th_c, teacher_weight, tl_c, vocab, plan.vocab_tile, cd)
        dh_c = torch.zeros(rows.shape[0], hs, dtype=cd, device=dev) if need_dh else None
        del w_lab
        fast = plan.vocab_tile >= vocab and config.effective_divergence != "jsd"
        ce, kd = (_chunk_rows_whole_vocab if fast else _chunk_rows)(tiles, lab_c, zlab, config, w_ce, w_kd, dh_c, dw, db)
        del tiles
        ce_rows.index_copy_(0, rows, ce)
        kd_rows.index_copy_(0, rows, kd)
        if dh_c is not None:
            dh.index_copy_(0, rows, dh_c)  # type: ignore[union-attr]
    return fused_epilogue(
        ce_rows, kd_rows, norm, gamma, kd_scale, (dh, dw, db), (student_hidden, student_weight, student_bias)
    )


#: autograd of the chunked launcher: the forward computes loss and gradients, the backward scales
#: them by ``grad_output`` (one backward per forward; see ``ddk_kernels.autograd.fused_loss_function``).
FusedLinearKDChunkedFunction = fused_loss_function("FusedLinearKDChunkedFunction", fused_linear_kd_forward)


def fused_linear_kd(
    student_hidden: torch.Tensor, student_weight: torch.Tensor, labels: torch.Tensor, config: KDConfig, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backend contract of the fused op: ``(loss (differentiable 0-dim), ce (N,), kd (N,))``.

    Inputs and keyword options (``teacher_hidden``, ``teacher_weight``, ``teacher_logits``,
    ``student_bias``, ``gamma``, ``kd_scale``, ``normalizer``, ``strategy``, ``workspace_bytes``,
    ``plan``) as ``fused_linear_kd_forward``, already validated; teacher tensors are detached.
    """
    return apply_fused(FusedLinearKDChunkedFunction, student_hidden, student_weight, labels, config, **kwargs)
