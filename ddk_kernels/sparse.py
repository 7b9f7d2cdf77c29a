"""The sparse KD loss against a cached top-k teacher: ``CE + gamma * D(P || Q)`` over k + 1 buckets.

A cached teacher row keeps the ids ``I`` of its k most likely tokens, their log-probabilities
``log p_j`` (at the temperature T of the divergence) and the tail mass ``t = 1 - sum_j p_j``
outside them. The student's row is bucketed the same way: ``log q_j = z_j / T - LSE(z / T)`` for
``j in I`` and its own tail ``log s = LSE_{v not in I}(z_v / T) - LSE(z / T)`` (computed over the
complement, so it stays exact when the tail is tiny). ``D`` is the divergence of
``ddk_kernels.reference.divergence_reference`` between these two (k + 1)-bucket distributions:

* ``forward_kl``: ``sum_j p_j (log p_j - log q_j) + t (log t - log s)``; the KL between the
  bucketed distributions, a lower bound of the full-vocabulary KL(p_T || p_S), exact when the
  teacher's tail is 0.
* ``jsd``: JSD(beta) of the buckets; well defined for every input.
* ``reverse_kl``: ``KL(Q || P)`` of the buckets; it needs ``t > 0`` wherever the student's tail
  is positive, so the teacher's tail is floored at ``REVERSE_TAIL_FLOOR`` for this divergence
  (a stored tail of 0, e.g. ``k = V`` or fp16 rounding, would otherwise make it infinite).

The CE term is the student's full-vocabulary CE at T = 1. The gradient w.r.t. the logits, with
``G_b = dD / d log Q_b``, ``q = softmax(z / T)`` and ``r = softmax`` of ``z / T`` over the
complement of ``I``: ``dD/dz = (G_tail * r - (sum_b G_b) * q + scatter(I, G_I)) / T``.

Two backends, in ``ddk_kernels.dispatch``: ``reference`` (``ddk_kernels.reference``: full
log-softmax and autograd; the oracle) and ``chunked`` (here: per token chunk one ``(chunk, V)``
slice of logits, with the ``lm_head`` matmul fused in for the linear op, and the student's
final logit softcap ``c * tanh(z / c)`` applied to each slice, its gradient by ``1 - (z / c)**2``;
gradients computed in the forward pass and scaled by ``grad_output``). No ``(N, V)`` tensor is
allocated by the fused linear op.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ddk_kernels.reduce import combine, denominator, gradient_weights
from ddk_kernels.types import KDConfig, KDLossParams, SparseTeacher, acc_dtype, softcap_, softcap_grad

__all__ = [
    "REVERSE_TAIL_FLOOR",
    "bucket_divergence",
    "fused_linear_sparse_kd",
    "is_available",
    "sparse_kd",
    "teacher_buckets",
]

REVERSE_TAIL_FLOOR = 1e-12


def is_available(device: torch.device | str) -> tuple[bool, str]:
    """Pure torch: runs wherever torch does."""
    return True, ""


def teacher_buckets(teacher: SparseTeacher, config: KDConfig, vocab: int) -> torch.Tensor:
    """``(N, k + 1)`` float64 teacher bucket log-probabilities ``[log p_I, log t]``.

    The tail is ``teacher.tail`` (or ``1 - sum exp(log p_I)``), clamped to ``[0, 1]``, and exactly
    0 when ``k = vocab`` (no token lies outside the ids, whatever the stored rounding says);
    floored at ``REVERSE_TAIL_FLOOR`` when the divergence is reverse KL.
    """
    logp = teacher.logprobs.double()
    tail = teacher.tail.double() if teacher.tail is not None else 1.0 - logp.exp().sum(-1)
    tail = tail.clamp(0.0, 1.0)
    if logp.shape[-1] >= vocab:
        tail = torch.zeros_like(tail)
    if config.effective_divergence == "reverse_kl":
        tail = tail.clamp_min(REVERSE_TAIL_FLOOR)
    return torch.cat([logp, tail.log().unsqueeze(-1)], dim=-1)


def _xlogy_diff(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a))


def bucket_divergence(log_q: torch.Tensor, log_p: torch.Tensor, config: KDConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Divergence of two bucket distributions and its gradient w.r.t. the student's log-buckets.

    Args:
        log_q: ``(N, B)`` float64 student bucket log-probabilities (``-inf`` for an empty bucket).
        log_p: ``(N, B)`` float64 teacher bucket log-probabilities.
        config: the divergence and beta.

    Returns:
        ``(d (N,), g (N, B))``: the divergence per row and ``g = d d / d log_q`` (0 where a bucket
        of the student is empty), both float64.
    """
    kind = config.effective_divergence
    q = log_q.exp()
    if kind == "forward_kl":
        return _xlogy_diff(log_p, log_q).sum(-1), -log_p.exp()
    if kind == "reverse_kl":
        d = _xlogy_diff(log_q, log_p)
        g = torch.where(q > 0, q * (log_q - log_p + 1.0), torch.zeros_like(q))
        return d.sum(-1), g
    beta = float(config.beta)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    d = beta * _xlogy_diff(log_p, log_m).sum(-1) + (1.0 - beta) * _xlogy_diff(log_q, log_m).sum(-1)
    g = torch.where(q > 0, (1.0 - beta) * q * (log_q - log_m), torch.zeros_like(q))
    return d, g


def _chunk_rows(
    z: torch.Tensor,
    labels: torch.Tensor,
    ids: torch.Tensor,
    log_p: torch.Tensor,
    config: KDConfig,
    w_ce: torch.Tensor,
    w_kd: torch.Tensor,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """CE and bucket divergence of one chunk of student logits, and ``d loss / d z`` if asked.

    ``z``: ``(n, V)`` in the accumulation dtype; ``labels``: ``(n,)`` (``ignore_index`` allowed);
    ``ids``: ``(n, k)`` int64; ``log_p``: ``(n, k + 1)`` float64 from ``teacher_buckets``;
    ``w_ce``, ``w_kd``: 0-dim weights of a valid row's CE and divergence in the loss.
    """
    t = float(config.temperature)
    valid = labels != config.ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    lse1 = torch.logsumexp(z, dim=-1)
    ce = torch.where(valid, lse1 - z.gather(1, safe.unsqueeze(1)).squeeze(1), torch.zeros_like(lse1))
    s = z / t if t != 1.0 else z
    lse_t = torch.logsumexp(s, dim=-1) if t != 1.0 else lse1
    masked = s.scatter(1, ids, float("-inf"))
    lse_tail = torch.logsumexp(masked, dim=-1)
    log_q = torch.cat([(s.gather(1, ids) - lse_t.unsqueeze(1)), (lse_tail - lse_t).unsqueeze(1)], dim=1).double()
    kd64, g = bucket_divergence(log_q, log_p, config)
    kd = torch.where(valid, kd64.to(z.dtype), torch.zeros_like(ce))
    if not need_grad:
        return ce, kd, None
    k = ids.shape[1]
    vf = valid.to(z.dtype).unsqueeze(1)
    q = torch.exp(s - lse_t.unsqueeze(1))
    r = torch.exp(masked - lse_tail.unsqueeze(1))
    r = torch.where(torch.isfinite(lse_tail).unsqueeze(1), r, torch.zeros_like(r))  # k = V: no tail
    g = g.to(z.dtype)
    g_tail, g_sum = g[:, k : k + 1], g.sum(dim=1, keepdim=True)
    kd_w = w_kd * vf / t
    grad = kd_w * (g_tail * r - g_sum * q)
    grad.scatter_add_(1, ids, kd_w * g[:, :k])
    p1 = torch.exp(z - lse1.unsqueeze(1)) if t != 1.0 else q
    grad += (w_ce * vf) * p1
    grad.scatter_add_(1, safe.unsqueeze(1), -(w_ce * vf))
    return ce, kd, grad


def _chunk_size(n: int, vocab: int, itemsize: int, workspace_bytes: int | None) -> int:
    budget = workspace_bytes if workspace_bytes is not None else 128 * 2**20
    return max(1, min(n, budget // max(1, 6 * vocab * itemsize)))  # ~6 (chunk, V) temporaries


class SparseKDFunction(torch.autograd.Function):
    """``sparse_kd`` on given logits: forward computes the loss and (if needed) the logits' gradient."""

    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        labels: torch.Tensor,
        teacher: SparseTeacher,
        params: KDLossParams,
        workspace_bytes: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = params.config
        acc = acc_dtype(logits.dtype)
        n, vocab = logits.shape
        valid = labels != cfg.ignore_index
        norm = denominator(params, valid.sum(), acc)
        w_ce, w_kd = gradient_weights(norm, params)
        log_p = teacher_buckets(teacher, cfg, vocab)
        ids = teacher.ids.long()
        need = logits.requires_grad
        ce, kd = torch.zeros(n, dtype=acc, device=logits.device), torch.zeros(n, dtype=acc, device=logits.device)
        grad = torch.zeros_like(logits) if need else None
        step = _chunk_size(n, vocab, torch.finfo(acc).bits // 8, workspace_bytes)
        for a in range(0, n, step):
            b = min(n, a + step)
            c, d, g = _chunk_rows(logits[a:b].to(acc), labels[a:b], ids[a:b], log_p[a:b], cfg, w_ce, w_kd, need)
            ce[a:b], kd[a:b] = c, d
            if grad is not None and g is not None:
                grad[a:b] = g.to(grad.dtype)
        ctx.save_for_backward(*(() if grad is None else (grad,)))
        ctx.mark_non_differentiable(ce, kd)
        return combine(ce.sum(), kd.sum(), norm, params), ce, kd

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, *_: Any) -> tuple[Any, ...]:
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss.to(grad.dtype), None, None, None, None)


class FusedLinearSparseKDFunction(torch.autograd.Function):
    """``sparse_kd`` fused with the student's ``lm_head``: one ``(chunk, V)`` slice per token chunk."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        teacher: SparseTeacher,
        params: KDLossParams,
        workspace_bytes: int | None,
        softcap: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = params.config
        acc = acc_dtype(hidden.dtype)
        n, vocab = hidden.shape[0], weight.shape[0]
        valid = labels != cfg.ignore_index
        norm = denominator(params, valid.sum(), acc)
        w_ce, w_kd = gradient_weights(norm, params)
        log_p = teacher_buckets(teacher, cfg, vocab)
        ids = teacher.ids.long()
        need = hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
        ce, kd = torch.zeros(n, dtype=acc, device=hidden.device), torch.zeros(n, dtype=acc, device=hidden.device)
        w_acc = weight.to(acc)
        b_acc = None if bias is None else bias.to(acc)
        dh = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need else None
        dw = torch.zeros_like(w_acc) if need else None
        db = None if b_acc is None or not need else torch.zeros_like(b_acc)
        step = _chunk_size(n, vocab, torch.finfo(acc).bits // 8, workspace_bytes)
        for a in range(0, n, step):
            b = min(n, a + step)
            h = hidden[a:b].to(acc)
            z = h @ w_acc.T
            if b_acc is not None:
                z = z + b_acc
            softcap_(z, softcap)
            dcap = softcap_grad(z, softcap) if softcap is not None and need else None
            c, d, g = _chunk_rows(z, labels[a:b], ids[a:b], log_p[a:b], cfg, w_ce, w_kd, need)
            ce[a:b], kd[a:b] = c, d
            if g is not None and dcap is not None:
                g.mul_(dcap)
            if g is not None and dh is not None and dw is not None:
                dh[a:b] = g @ w_acc
                dw.addmm_(g.T, h)
                if db is not None:
                    db += g.sum(0)
        saved = (dh, dw, db) if need else (None, None, None)
        ctx.grads = tuple(None if x is None else x for x in saved)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(ce, kd)
        return combine(ce.sum(), kd.sum(), norm, params), ce, kd

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, *_: Any) -> tuple[Any, ...]:
        out = []
        for g, dt in zip(ctx.grads, ctx.dtypes):
            out.append(None if g is None or dt is None else (g * grad_loss.to(g.dtype)).to(dt))
        ctx.grads = None
        return (out[0], out[1], out[2], None, None, None, None, None)


def sparse_kd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher: SparseTeacher,
    params: KDLossParams,
    *,
    workspace_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunked backend of the sparse op on logits ``(N, V)``: ``(loss, ce (N,), kd (N,))``."""
    loss, ce, kd = SparseKDFunction.apply(logits, labels, teacher, params, workspace_bytes)
    return loss, ce, kd


def fused_linear_sparse_kd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    teacher: SparseTeacher,
    params: KDLossParams,
    *,
    bias: torch.Tensor | None = None,
    workspace_bytes: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunked backend of the fused sparse op: logits ``hidden @ weight.T (+ bias)`` per token
    chunk, softcapped to ``softcap * tanh(z / softcap)`` when ``softcap`` is given."""
    loss, ce, kd = FusedLinearSparseKDFunction.apply(
        hidden, weight, bias, labels, teacher, params, workspace_bytes, softcap
    )
    return loss, ce, kd
