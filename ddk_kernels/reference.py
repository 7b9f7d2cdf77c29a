"""The plain-PyTorch oracle of every op in ddk_kernels.

Readable, unfused and materialising: every fast backend is tested against these functions in
float64, and benchmarks use them as the naive path. Nothing here is tuned for speed or memory.

Notation of one row: ``s = zS / T``, ``t = zT / T``, ``q = softmax(s)`` (student),
``p = softmax(t)`` (teacher).

* forward KL  = KL(p || q) = sum p (log p - log q)
* reverse KL  = KL(q || p) = sum q (log q - log p)
* JSD(beta)   = beta * KL(p || m) + (1 - beta) * KL(q || m), ``m = beta p + (1 - beta) q``;
  ``beta = 0`` is forward KL and ``beta = 1`` reverse KL exactly.
* CE          = cross entropy of ``softmax(zS)`` (temperature 1) against the label.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ddk_kernels.reduce import combine, denominator, reduce_kd_rows
from ddk_kernels.types import (
    Divergence,
    KDConfig,
    KDLossOutput,
    KDLossParams,
    RowKernels,
    SparseTeacher,
    TeacherInputs,
    acc_dtype,
)

__all__ = [
    "ROW_KERNELS",
    "divergence_reference",
    "fused_linear_kd_reference",
    "is_available",
    "kd_backward_reference",
    "kd_forward_reference",
    "kd_logits_grad_reference",
    "kd_loss_reference",
    "kd_row_losses_reference",
    "fused_linear_sparse_kd_reference",
    "sparse_kd_reference",
]


def is_available(device: torch.device | str) -> tuple[bool, str]:
    """The oracle is plain torch: it runs wherever torch does."""
    return True, ""


def _plogp_diff(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Row sums of ``a * (log a - log b)`` with the convention ``0 * anything = 0``."""
    a = log_a.exp()
    term = torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a))
    return term.sum(dim=-1)


def divergence_reference(log_q: torch.Tensor, log_p: torch.Tensor, divergence: Divergence, beta: float) -> torch.Tensor:
    """Per-row divergence between teacher ``p`` and student ``q`` given their log-probabilities.

    Args:
        log_q: ``(N, V)`` student log-probabilities at temperature T.
        log_p: ``(N, V)`` teacher log-probabilities at temperature T.
        divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``.
        beta: JSD weight; 0 gives forward KL and 1 reverse KL exactly.

    Returns:
        ``(N,)`` divergence per row, in the dtype of the inputs.
    """
    cfg = KDConfig(divergence=divergence, beta=beta)
    kind = cfg.effective_divergence
    if kind == "forward_kl":
        return _plogp_diff(log_p, log_q)
    if kind == "reverse_kl":
        return _plogp_diff(log_q, log_p)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log1p(-beta)]), dim=0)
    return beta * _plogp_diff(log_p, log_m) + (1.0 - beta) * _plogp_diff(log_q, log_m)


def kd_row_losses_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    config: KDConfig = KDConfig(),
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row CE and divergence, differentiable through autograd.

    Args:
        student_logits: ``(N, V)`` any float dtype.
        teacher_logits: ``(N, V)`` (already sliced to the student's vocabulary).
        labels: ``(N,)`` int64; rows equal to ``config.ignore_index`` give 0 for both terms.
        config: temperature, divergence, beta, ignore_index.
        compute_dtype: dtype of the math; default float32, or float64 for float64 inputs.

    Returns:
        ``(ce, kd)``: two ``(N,)`` tensors in ``compute_dtype``.
    """
    if compute_dtype is None:
        compute_dtype = acc_dtype(student_logits.dtype)
    zs = student_logits.to(compute_dtype)
    zt = teacher_logits.to(compute_dtype)
    valid = labels != config.ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    ce = F.cross_entropy(zs, safe_labels, reduction="none")
    ce = torch.where(valid, ce, torch.zeros_like(ce))
    log_q = F.log_softmax(zs / config.temperature, dim=-1)
    log_p = F.log_softmax(zt / config.temperature, dim=-1)
    kd = divergence_reference(log_q, log_p, config.divergence, config.beta)
    kd = torch.where(valid, kd, torch.zeros_like(kd))
    return ce, kd


def kd_loss_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    domain_ids: torch.Tensor | None = None,
    num_domains: int = 1,
    gamma: float = 0.2,
    temperature: float = 1.0,
    divergence: Divergence = "forward_kl",
    beta: float = 0.5,
    ignore_index: int = -100,
    t2_scale: bool = False,
    normalizer: float | torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> KDLossOutput:
    """The whole KD loss, materialising everything (the oracle).

    ``loss = (sum CE + gamma * s * sum KD) / normalizer`` over valid tokens, with
    ``s = T**2`` if ``t2_scale`` else 1 and ``normalizer`` = number of valid tokens (at least 1)
    unless given. A teacher vocabulary larger than the student's is sliced to the student's.

    Args:
        student_logits: ``(N, V)``.
        teacher_logits: ``(N, Vt)`` with ``Vt >= V``.
        labels: ``(N,)`` int64.
        domain_ids: ``(N,)`` int64 in ``[0, num_domains)``, or None for one domain.
        num_domains: D, the length of the per-domain outputs.
        gamma, temperature, divergence, beta, ignore_index, t2_scale, normalizer: see ``ddk.kd_loss``.
        compute_dtype: dtype of the math (float64 for the oracle in tests).

    Returns:
        ``KDLossOutput`` (the formula of ``ddk_kernels.reduce``).

    Examples:
        >>> zs, zt = torch.zeros(2, 3), torch.zeros(2, 4)
        >>> out = kd_loss_reference(zs, zt, torch.tensor([0, -100]))
        >>> round(float(out.loss), 4), int(out.num_tokens)
        (1.0986, 1)
    """
    vocab = student_logits.shape[-1]
    cfg = KDConfig(temperature=temperature, divergence=divergence, beta=beta, ignore_index=ignore_index)
    params = KDLossParams(cfg, gamma=gamma, t2_scale=t2_scale, normalizer=normalizer)
    ce, kd = kd_row_losses_reference(student_logits, teacher_logits[:, :vocab], labels, cfg, compute_dtype)
    return reduce_kd_rows(ce, kd, labels != ignore_index, domain_ids, num_domains, params)


def kd_logits_grad_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    grad_ce: torch.Tensor,
    grad_kd: torch.Tensor,
    config: KDConfig = KDConfig(),
) -> torch.Tensor:
    """Closed-form gradient of ``sum(grad_ce * ce + grad_kd * kd)`` w.r.t. the student logits.

    With ``s = zS / T``, ``q = softmax(s)``, ``p = softmax(t)``:

    * CE:          ``softmax(zS) - onehot(label)``
    * forward KL:  ``(q - p) / T``
    * reverse KL:  ``q * (log q - log p - KL(q || p)) / T``
    * JSD(beta):   ``q * (g - sum q g) / T`` with ``g = (1 - beta) log(q / m)``

    Args:
        student_logits, teacher_logits: ``(N, V)``.
        labels: ``(N,)``; ignored rows get a zero gradient.
        grad_ce, grad_kd: ``(N,)`` upstream gradients of each row's CE and divergence.
        config: temperature, divergence, beta, ignore_index.

    Returns:
        ``(N, V)`` gradient in float64.
    """
    zs = student_logits.double()
    zt = teacher_logits.double()
    T = config.temperature
    valid = labels != config.ignore_index
    soft = torch.softmax(zs, dim=-1)
    onehot = F.one_hot(torch.where(valid, labels, torch.zeros_like(labels)), zs.shape[-1]).double()
    d_ce = soft - onehot
    log_q = F.log_softmax(zs / T, dim=-1)
    log_p = F.log_softmax(zt / T, dim=-1)
    q, p = log_q.exp(), log_p.exp()
    kind = config.effective_divergence
    if kind == "forward_kl":
        d_kd = q - p
    elif kind == "reverse_kl":
        g = log_q - log_p
        d_kd = q * (g - (q * g).sum(-1, keepdim=True))
    else:
        beta = config.beta
        log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log1p(-beta)]), dim=0)
        g = (1.0 - beta) * (log_q - log_m)
        d_kd = q * (g - (q * g).sum(-1, keepdim=True))
    d_kd = d_kd / T
    grad = grad_ce.double().unsqueeze(-1) * d_ce + grad_kd.double().unsqueeze(-1) * d_kd
    return torch.where(valid.unsqueeze(-1), grad, torch.zeros_like(grad))


def kd_forward_reference(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, config: KDConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``forward`` launcher of ``RowKernels``: ``(ce, kd, stats)`` without autograd; ``stats``
    is an empty ``(N, 0)`` tensor (the oracle's backward recomputes everything)."""
    with torch.no_grad():
        ce, kd = kd_row_losses_reference(student, teacher, labels, config)
    return ce, kd, student.new_empty((student.shape[0], 0), dtype=torch.float64)


def kd_backward_reference(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    stats: torch.Tensor,
    grad_ce: torch.Tensor,
    grad_kd: torch.Tensor,
    config: KDConfig,
) -> torch.Tensor:
    """The ``backward`` launcher of ``RowKernels``: the closed form of
    :func:`kd_logits_grad_reference` in the student's dtype (``stats`` unused)."""
    return kd_logits_grad_reference(student, teacher, labels, grad_ce, grad_kd, config).to(student.dtype)


#: the oracle as a backend of the per-row op (``backend="reference"``): autograd through torch.
ROW_KERNELS = RowKernels(kd_row_losses_reference, kd_forward_reference, kd_backward_reference)


def fused_linear_kd_reference(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    labels: torch.Tensor,
    teacher: TeacherInputs,
    params: KDLossParams,
    *,
    student_bias: torch.Tensor | None = None,
    options: object = None,
    student_softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The naive fused ``lm_head`` + KD loss (``backend="reference"``): materialises both ``(N, V)``
    logits and differentiates the oracle with autograd.

    Args:
        student_hidden: ``(N, Hs)``; student_weight: ``(V, Hs)``; student_bias: ``(V,)`` or None.
        labels: ``(N,)`` int64.
        teacher: ``hidden (N, Ht)`` + ``weight (Vt, Ht)`` (+ ``bias``, ``softcap``), or
            ``logits (N, Vt)``; ``Vt >= V``.
        params: the loss options.
        options: the tiling options of the fused backends (ignored here).
        student_softcap: ``c`` of the student's logits ``c * tanh(z / c)``, or None.

    Returns:
        ``(loss (0-dim, differentiable), ce (N,), kd (N,))`` in float32 (float64 for float64).
    """
    vocab = student_weight.shape[0]
    zs = student_hidden @ student_weight.T
    if student_bias is not None:
        zs = zs + student_bias
    if student_softcap is not None:
        zs = student_softcap * torch.tanh(zs / student_softcap)
    t = teacher.detached()
    if t.logits is not None:
        zt = t.logits[:, :vocab]
    else:
        assert t.hidden is not None and t.weight is not None
        zt = t.hidden @ t.weight[:vocab].T
        if t.bias is not None:
            zt = zt + t.bias[:vocab]
        if t.softcap is not None:
            zt = t.softcap * torch.tanh(zt / t.softcap)
    ce, kd = kd_row_losses_reference(zs, zt, labels, params.config, acc_dtype(student_hidden.dtype))
    norm = denominator(params, (labels != params.config.ignore_index).sum(), ce.dtype)
    return combine(ce.sum(), kd.sum(), norm, params), ce.detach(), kd.detach()


def sparse_kd_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher: SparseTeacher,
    params: KDLossParams,
    *,
    workspace_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Oracle of the sparse op (see ``ddk_kernels.sparse``): the full ``log_softmax(z / T)``, the
    student's buckets gathered from it (its tail by a log-sum-exp over the complement of the
    ids), ``divergence_reference`` of the buckets, autograd for the gradient.

    Returns:
        ``(loss, ce (N,), kd (N,))`` in float32 (float64 for float64 logits).
    """
    from ddk_kernels.sparse import teacher_buckets

    cfg = params.config
    dtype = acc_dtype(logits.dtype)
    z = logits.to(dtype)
    valid = labels != cfg.ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    ce = torch.where(valid, F.cross_entropy(z, safe, reduction="none"), torch.zeros(z.shape[0], dtype=dtype))
    log_q_full = F.log_softmax(z / cfg.temperature, dim=-1)
    ids = teacher.ids.long()
    in_top = torch.zeros_like(log_q_full, dtype=torch.bool).scatter(1, ids, True)
    log_tail = torch.logsumexp(log_q_full.masked_fill(in_top, float("-inf")), dim=-1)
    log_q = torch.cat([log_q_full.gather(1, ids), log_tail.unsqueeze(1)], dim=1).double()
    kd = divergence_reference(log_q, teacher_buckets(teacher, cfg, z.shape[1]), cfg.divergence, cfg.beta).to(dtype)
    kd = torch.where(valid, kd, torch.zeros_like(kd))
    norm = denominator(params, valid.sum(), dtype)
    return combine(ce.sum(), kd.sum(), norm, params), ce, kd


def fused_linear_sparse_kd_reference(
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
    """Oracle of the fused sparse op: materialise ``hidden @ weight.T (+ bias)`` (softcapped to
    ``softcap * tanh(z / softcap)`` when given), then :func:`sparse_kd_reference`."""
    dtype = acc_dtype(hidden.dtype)
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return sparse_kd_reference(logits, labels, teacher, params)
