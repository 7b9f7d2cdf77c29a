"""The ``gemm`` strategy of the fused ``lm_head`` + KD loss: per token chunk, the logits by one
matmul each in the input dtype (bfloat16 tensor cores on a GPU; the logits are rounded to that
dtype, as in an unfused ``lm_head``), then the per-row kernels of the logits backends give the
loss rows and the ``(chunk, V)`` logits gradient, which two more matmuls turn into ``d hidden``
and ``d weight`` (float32 results through ``out_dtype`` where torch supports it on the device).
A final logit softcap ``c`` (either model) is applied to the chunk's logits in the input dtype,
as the model's own forward would; the student's logits gradient is multiplied by
``1 - (z / c)**2`` before the gradient matmuls.

The row kernels come from ``ddk_kernels.dispatch`` (``resolve("kd_rows", "auto", device)``), so
this strategy uses the backend ``kd_loss`` would pick there (``DDK_BACKEND`` included).
"""

from __future__ import annotations

import warnings

import torch

from ddk_kernels import dispatch
from ddk_kernels.fused_plan import FusedPlan
from ddk_kernels.fused_rows import FusedBatch, FusedBuffers, TileObserver
from ddk_kernels.types import KDConfig, softcap_, softcap_grad

__all__ = ["run_gemm_chunks"]

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
                    f"each {key[1]} product to {a.dtype} before accumulating.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            _OUT_DTYPE_MM[key] = False
    for r0 in range(0, a.shape[0], _FALLBACK_ROWS):
        r1 = min(a.shape[0], r0 + _FALLBACK_ROWS)
        if accumulate:
            out[r0:r1].add_(a[r0:r1] @ b)
        else:
            out[r0:r1].copy_(a[r0:r1] @ b)


def run_gemm_chunks(
    batch: FusedBatch,
    config: KDConfig,
    weights: tuple[torch.Tensor, torch.Tensor],
    plan: FusedPlan,
    out: FusedBuffers,
    observer: TileObserver | None = None,
) -> None:
    """The ``gemm`` strategy: fills ``out`` (compute dtype) chunk by chunk of ``plan.token_chunk`` rows.

    The row backward gets the upstream weights ``1`` and ``w_kd / w_ce`` (``gamma * kd_scale``), so
    the ``(r, V)`` logits gradient is O(1) in the input dtype (``1 / normalizer`` there would put
    float16 gradients into the subnormal range for large token counts); ``w_ce = 1 / normalizer``
    is applied once to the float32 ``d hidden``, ``d weight``, ``d bias`` at the end.
    """
    h, w = batch.hidden, batch.weight
    vocab, dt = w.shape[0], h.dtype
    if w.dtype != dt:
        raise TypeError(
            f"fused_linear_kd_loss: student_weight must have the dtype of student_hidden ({dt}) for "
            f"strategy='gemm'; got {w.dtype}. Cast one of them, or use strategy='token_chunks'."
        )
    kernels = dispatch.resolve("kd_rows", "auto", h.device)
    w_ce, w_kd = weights
    acc = out.ce.dtype
    t = batch.teacher
    w_t = w.T
    tw_t = t.weight[:vocab].T if t.weight is not None else None
    kd_ratio = w_kd / w_ce  # gamma * kd_scale, a 0-dim tensor (no host sync)
    for c0 in range(0, int(batch.rows.numel()), plan.token_chunk):
        rows = batch.rows[c0 : c0 + plan.token_chunk]
        r = int(rows.numel())
        h_c = h.index_select(0, rows)
        lab_c = batch.labels.index_select(0, rows)
        if observer is not None:
            observer((r, vocab))
        zs = torch.addmm(batch.bias.to(dt), h_c, w_t) if batch.bias is not None else h_c @ w_t
        softcap_(zs, batch.softcap)
        dcap = softcap_grad(zs, batch.softcap) if batch.softcap is not None and out.need_grad else None
        if t.logits is not None:
            zt = t.logits[:, :vocab].index_select(0, rows)  # copies only the V columns used
        else:
            assert t.hidden is not None and tw_t is not None
            ht_c = t.hidden.index_select(0, rows).to(tw_t.dtype)
            zt = torch.addmm(t.bias[:vocab].to(ht_c.dtype), ht_c, tw_t) if t.bias is not None else ht_c @ tw_t
            softcap_(zt, t.softcap)
        if zt.dtype != dt:
            zt = zt.to(dt)
        ce, kd, stats = kernels.forward(zs, zt, lab_c, config)
        out.ce.index_copy_(0, rows, ce.to(acc))
        out.kd.index_copy_(0, rows, kd.to(acc))
        if not out.need_grad:
            continue
        g = kernels.backward(
            zs,
            zt,
            lab_c,
            stats,
            torch.ones(r, dtype=ce.dtype, device=ce.device),
            kd_ratio.to(ce.dtype).expand(r).contiguous(),
            config,
        )  # (r, V), input dtype, unscaled
        del zs, zt, stats
        if dcap is not None:
            g.mul_(dcap)
            del dcap
        if out.dh is not None:
            dh_c = torch.empty(r, out.dh.shape[1], dtype=acc, device=out.dh.device)
            _mm_into(dh_c, g, w, accumulate=False)
            out.dh.index_copy_(0, rows, dh_c)
            del dh_c
        if out.dw is not None:
            _mm_into(out.dw, g.T, h_c, accumulate=True)
        if out.db is not None:
            out.db.add_(g.sum(0, dtype=acc))
        del g
    for buf in (out.dh, out.dw, out.db):
        if buf is not None:
            buf.mul_(w_ce.to(buf.dtype))
