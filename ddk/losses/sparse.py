"""The KD loss against a cached top-k teacher: ``sparse_kd_loss`` (on logits) and
``fused_linear_sparse_kd_loss`` (fused with the student's ``lm_head``, no ``(N, V)`` tensor).

``loss = (sum CE + gamma * s * sum D) / normalizer`` as in ``ddk.kd_loss``, where ``D`` is the
divergence between the teacher's and the student's distributions bucketed into the teacher's k
cached ids plus one tail bucket (everything else); see ``ddk_kernels.sparse`` for the formula,
which divergences are well defined, and the gradient. The teacher side is what
``ddk teacher-cache`` stores per position: ``topk_ids (N, k)``, ``topk_logprobs (N, k)`` at the
temperature T and, optionally, ``tail (N,)`` (default ``1 - sum(exp(topk_logprobs))``).
"""

from __future__ import annotations

import torch

from ddk.losses.kd import (
    autocast_dtype,
    autocast_off,
    check_softcap,
    flatten_for_loss,
    loss_params,
    validate_labels_domains,
)
from ddk_kernels.dispatch import resolve
from ddk_kernels.reduce import kd_output
from ddk_kernels.types import FLOAT_DTYPES, KDLossOutput, SparseTeacher

__all__ = ["fused_linear_sparse_kd_loss", "sparse_kd_loss"]


def _teacher_rows(
    fn: str,
    first: torch.Tensor,
    first_name: str,
    vocab: int,
    labels: torch.Tensor,
    domain_ids: torch.Tensor | None,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    tail: torch.Tensor | None,
    *,
    shift: bool,
    ignore_index: int,
    num_domains: int | None,
    check_inputs: bool | None,
) -> tuple[torch.Tensor, SparseTeacher, torch.Tensor, torch.Tensor | None, int]:
    """Flatten the student input and the cached teacher to rows and check them (the teacher's shapes
    and dtypes; labels, domain ids and teacher ids against V, with value checks by default on the
    CPU); return ``(rows, teacher, labels, domain_ids, D)``."""
    for name, t in (("teacher_topk_ids", ids), ("teacher_topk_logprobs", logprobs)):
        if not isinstance(t, torch.Tensor) or t.dim() != first.dim() or t.shape[:-1] != first.shape[:-1]:
            raise ValueError(
                f"{fn}: {name} must have shape {tuple(first.shape[:-1])} + (k,) (one row of k per row of "
                f"{first_name}); got {tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}."
            )
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{fn}: teacher_topk_ids must be int32 or int64; got {ids.dtype}.")
    if logprobs.dtype not in FLOAT_DTYPES or logprobs.shape != ids.shape:
        raise ValueError(
            f"{fn}: teacher_topk_logprobs must be a float tensor of the shape of teacher_topk_ids "
            f"{tuple(ids.shape)}; got {tuple(logprobs.shape)} {logprobs.dtype}."
        )
    if tail is not None and (not isinstance(tail, torch.Tensor) or tail.shape != ids.shape[:-1]):
        raise ValueError(
            f"{fn}: teacher_tail must have shape {tuple(ids.shape[:-1])} (one mass per row) or be None; got "
            f"{tuple(tail.shape) if isinstance(tail, torch.Tensor) else type(tail).__name__}."
        )
    tail3 = None if tail is None else tail.unsqueeze(-1)
    (first, ids, logprobs, tail3), labels, domain_ids = flatten_for_loss(
        (first, ids, logprobs, tail3),
        labels,
        domain_ids,
        shift=shift,
        ignore_index=ignore_index,
        names=(first_name, "teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail"),
        fn=fn,
    )
    tail = None if tail3 is None else tail3.reshape(-1)
    dev = first.device
    check = dev.type == "cpu" if check_inputs is None else check_inputs
    d = validate_labels_domains(fn, first.shape[0], vocab, labels, domain_ids, num_domains, ignore_index, dev, check)
    _check_ids(fn, ids, vocab, check)
    return first, SparseTeacher(ids, logprobs, tail), labels, domain_ids, d


def _check_ids(fn: str, ids: torch.Tensor, vocab: int, check_values: bool) -> None:
    k = ids.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"{fn}: teacher_topk_ids must hold 1 <= k <= V={vocab} ids per row; got k={k}.")
    if not check_values or ids.numel() == 0:
        return
    lo, hi = (int(x) for x in torch.aminmax(ids))
    if lo < 0 or hi >= vocab:
        raise ValueError(
            f"{fn}: teacher_topk_ids must be in [0, {vocab}) (the student's vocabulary); got {lo if lo < 0 else hi}. "
            "The cache must come from a teacher with the student's tokenizer."
        )
    if k > 1 and bool((ids.sort(dim=-1).values.diff(dim=-1) == 0).any()):
        raise ValueError(f"{fn}: teacher_topk_ids must be distinct within each row; got a repeated id.")


def sparse_kd_loss(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    labels: torch.Tensor,
    *,
    teacher_tail: torch.Tensor | None = None,
    domain_ids: torch.Tensor | None = None,
    num_domains: int | None = None,
    gamma: float = 0.2,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    ignore_index: int = -100,
    t2_scale: bool = False,
    normalizer: float | torch.Tensor | None = None,
    backend: str = "auto",
    check_inputs: bool | None = None,
    shift: bool = False,
) -> KDLossOutput:
    """``CE + gamma * D`` of given student logits against a cached top-k teacher.

    ``domain_ids``, ``num_domains``, ``gamma``, ``temperature``, ``divergence``, ``beta``,
    ``ignore_index``, ``t2_scale``, ``normalizer`` and ``shift`` are those of ``ddk.kd_loss``.

    Args:
        student_logits: ``(N, V)`` or ``(B, L, V)`` float logits.
        teacher_topk_ids: ``(N, k)`` / ``(B, L, k)`` int32/int64 ids, distinct per row, in ``[0, V)``.
        teacher_topk_logprobs: same shape, the teacher's log-probabilities of those ids at ``T``.
        labels: ``(N,)`` / ``(B, L)`` int labels (unshifted with ``shift=True``).
        teacher_tail: ``(N,)`` / ``(B, L)`` teacher mass outside the ids, or None (from the logprobs).
        backend: ``"auto"`` (``chunked``), ``"chunked"`` or ``"reference"`` (the oracle).
        check_inputs: check label, domain and id ranges (host syncs). Default: on for CPU.

    Returns:
        ``KDLossOutput``; ``kd_sum`` is the sum of the bucketed divergence.

    Examples:
        >>> import torch
        >>> z = torch.randn(3, 10, requires_grad=True)
        >>> top = torch.log_softmax(torch.randn(3, 10), -1).topk(4, dim=-1)
        >>> out = sparse_kd_loss(z, top.indices, top.values, torch.tensor([1, 2, -100]))
        >>> out.loss.backward(); int(out.num_tokens), tuple(z.grad.shape)
        (2, (3, 10))
    """
    fn = "sparse_kd_loss"
    if not isinstance(student_logits, torch.Tensor) or student_logits.dim() not in (2, 3):
        raise ValueError(f"{fn}: student_logits must be a 2-D (N, V) or 3-D (B, L, V) float tensor.")
    if student_logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: student_logits must be a float tensor; got {student_logits.dtype}.")
    logits, teacher, labels, domain_ids, d = _teacher_rows(
        fn,
        student_logits,
        "student_logits",
        student_logits.shape[-1],
        labels,
        domain_ids,
        teacher_topk_ids,
        teacher_topk_logprobs,
        teacher_tail,
        shift=shift,
        ignore_index=ignore_index,
        num_domains=num_domains,
        check_inputs=check_inputs,
    )
    params = loss_params(
        fn,
        gamma=gamma,
        temperature=temperature,
        divergence=divergence,
        beta=beta,
        num_domains=num_domains,
        normalizer=normalizer,
        ignore_index=ignore_index,
        t2_scale=t2_scale,
    )
    dev = logits.device
    op = resolve("sparse_kd", backend, dev)
    with autocast_off(dev):
        loss, ce, kd = op(logits, labels.long(), teacher, params)
        return kd_output(loss, ce, kd, labels != ignore_index, domain_ids, d)


def fused_linear_sparse_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    labels: torch.Tensor,
    *,
    teacher_tail: torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    student_softcap: float | None = None,
    domain_ids: torch.Tensor | None = None,
    num_domains: int | None = None,
    gamma: float = 0.2,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    ignore_index: int = -100,
    t2_scale: bool = False,
    normalizer: float | torch.Tensor | None = None,
    backend: str = "auto",
    workspace_bytes: int | None = None,
    check_inputs: bool | None = None,
    shift: bool = False,
) -> KDLossOutput:
    """:func:`sparse_kd_loss` on the logits ``h @ W.T (+ b)``, computed per token chunk: the student's
    full-vocabulary log-sum-exp from one ``(chunk, V)`` slice at a time, never an ``(N, V)`` tensor.

    The other keyword arguments (``teacher_tail``, ``domain_ids``, ``num_domains``, ``gamma``,
    ``temperature``, ``divergence``, ``beta``, ``ignore_index``, ``t2_scale``, ``normalizer``,
    ``backend``, ``check_inputs``, ``shift``) are those of :func:`sparse_kd_loss`.

    Args:
        student_hidden: ``(N, Hs)`` or ``(B, L, Hs)`` float hidden states (under autocast cast to
            the autocast dtype with the weight, as ``F.linear`` would).
        student_weight: ``(V, Hs)``, the student's ``lm_head.weight``.
        teacher_topk_ids: ``(N, k)`` / ``(B, L, k)`` cached ids, as in :func:`sparse_kd_loss`.
        teacher_topk_logprobs: their log-probabilities, as in :func:`sparse_kd_loss`.
        labels: ``(N,)`` / ``(B, L)`` int labels (unshifted with ``shift=True``).
        student_bias: ``(V,)`` or None.
        student_softcap: ``c`` of the student's final logit softcap (logits ``c * tanh(z / c)``,
            Gemma2's ``config.final_logit_softcapping``), a number > 0, or None; applied per chunk,
            forward and backward.
        workspace_bytes: scratch budget of one token chunk (default 128 MiB).

    Returns:
        ``KDLossOutput``; ``loss`` is differentiable w.r.t. hidden, weight and bias (gradients
        computed in the forward pass and scaled by ``grad_output``: one backward per forward).

    Examples:
        >>> import torch
        >>> h, w = torch.randn(2, 5, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
        >>> top = torch.log_softmax(torch.randn(2, 5, 11), -1).topk(3, dim=-1)
        >>> out = fused_linear_sparse_kd_loss(h, w, top.indices, top.values, torch.randint(0, 11, (2, 5)), shift=True)
        >>> out.loss.backward(); int(out.num_tokens), tuple(w.grad.shape)
        (8, (11, 8))
    """
    fn = "fused_linear_sparse_kd_loss"
    if not isinstance(student_hidden, torch.Tensor) or student_hidden.dim() not in (2, 3):
        raise ValueError(f"{fn}: student_hidden must be a 2-D (N, Hs) or 3-D (B, L, Hs) float tensor.")
    if not isinstance(student_weight, torch.Tensor) or student_weight.dim() != 2:
        raise ValueError(f"{fn}: student_weight must be a 2-D (V, Hs) tensor (the lm_head weight).")
    if student_hidden.dtype not in FLOAT_DTYPES or student_weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(
            f"{fn}: student_hidden must be float with Hs = student_weight.shape[1] = {student_weight.shape[1]}; "
            f"got {tuple(student_hidden.shape)} {student_hidden.dtype}."
        )
    vocab = student_weight.shape[0]
    if student_bias is not None and (not isinstance(student_bias, torch.Tensor) or student_bias.shape != (vocab,)):
        raise ValueError(f"{fn}: student_bias must have shape ({vocab},) or be None.")
    softcap = check_softcap(fn, "student_softcap", student_softcap)
    hidden, teacher, labels, domain_ids, d = _teacher_rows(
        fn,
        student_hidden,
        "student_hidden",
        vocab,
        labels,
        domain_ids,
        teacher_topk_ids,
        teacher_topk_logprobs,
        teacher_tail,
        shift=shift,
        ignore_index=ignore_index,
        num_domains=num_domains,
        check_inputs=check_inputs,
    )
    params = loss_params(
        fn,
        gamma=gamma,
        temperature=temperature,
        divergence=divergence,
        beta=beta,
        num_domains=num_domains,
        normalizer=normalizer,
        ignore_index=ignore_index,
        t2_scale=t2_scale,
    )
    dev = hidden.device
    amp = autocast_dtype(dev)
    weight, bias = student_weight, student_bias
    if amp is not None:
        hidden, weight = hidden.to(amp), weight.to(amp)
        bias = None if bias is None else bias.to(amp)
    if not torch.is_grad_enabled():
        hidden, weight = hidden.detach(), weight.detach()
        bias = None if bias is None else bias.detach()
    op = resolve("fused_linear_sparse_kd", backend, dev)
    with autocast_off(dev):
        loss, ce, kd = op(
            hidden, weight, labels.long(), teacher, params, bias=bias, workspace_bytes=workspace_bytes, softcap=softcap
        )
        return kd_output(loss, ce, kd, labels != ignore_index, domain_ids, d)
