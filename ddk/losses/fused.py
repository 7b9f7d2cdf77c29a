"""Fused ``lm_head`` + KD loss: ``fused_linear_kd_loss`` and its module ``FusedLinearKDLoss``
(the transformers causal-LM helper built on it is ``ddk.losses.causal_lm``).

The loss is the one of ``ddk.kd_loss`` on the logits ``zS = h W^T (+ b)`` and
``zT = h_T W_T[:V]^T (+ b_T)`` (or given teacher logits), each optionally soft-capped
(``c * tanh(z / c)``, Gemma2's ``final_logit_softcapping``) inside the tiles, forward and
backward; computed without ever allocating an ``(N, V)``
tensor (backend ``"chunked"``; ``"reference"`` materialises, for tests), both resolved by
``ddk_kernels.dispatch``.
Inputs follow the batch convention of :func:`ddk.losses.kd.flatten_for_loss`: rows ``(N, H)`` or
batches ``(B, L, H)`` with ``(B, L)`` labels, optionally shifted inside (``shift=True``).

Autocast: under ``torch.autocast(device, dtype)`` the hidden states, ``lm_head`` weights and bias
are cast to the autocast dtype, as ``F.linear`` (so ``model(...).logits``) would, and the kernels
then run with autocast disabled: the ``gemm`` strategy (CUDA) multiplies in that dtype and rounds
the logits to it like an unfused ``lm_head``; ``token_chunks`` / ``recompute`` multiply the
autocast-dtype values with float32 accumulation and keep the logits in float32. Row statistics
(max, log-sum-exp, divergence accumulators) are always float32 (float64 for float64 inputs).
"""

from __future__ import annotations

from typing import Any, overload

import torch

from ddk.losses.kd import (
    KDLossConfigModule,
    autocast_dtype,
    autocast_off,
    check_softcap,
    flatten_for_loss,
    got_str,
    loss_params,
    one_of,
    shape_str,
    validate_labels_domains,
)
from ddk_kernels.dispatch import resolve
from ddk_kernels.fused_plan import STRATEGIES, FusedOptions
from ddk_kernels.reduce import kd_output
from ddk_kernels.types import FLOAT_DTYPES, KDLossOutput, TeacherInputs

__all__ = ["fused_linear_kd_loss", "FusedLinearKDLoss"]

_FN = "fused_linear_kd_loss"


def _check_2d(name: str, t: Any) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{_FN}: {name} must be a torch.Tensor; got {type(t).__name__}.")
    if t.dim() != 2 or t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{_FN}: {name} must be a 2-D float tensor; got shape {shape_str(t)} and dtype {t.dtype}.")


@overload
def _to_autocast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor: ...
@overload
def _to_autocast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None: ...
def _to_autocast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` in the autocast ``dtype`` where autocast would cast it (float32/16 and bfloat16, not float64)."""
    if t is None or t.dtype == dtype or t.dtype == torch.float64 or not t.is_floating_point():
        return t
    return t.to(dtype)


def _validate(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    teacher_logits: torch.Tensor | None,
    student_bias: torch.Tensor | None,
    teacher_bias: torch.Tensor | None = None,
    teacher_softcap: float | None = None,
) -> tuple[int, int]:
    """Shape/dtype/device checks of the tensors; returns ``(N, V)``."""
    _check_2d("student_hidden", student_hidden)
    _check_2d("student_weight", student_weight)
    n, hs = student_hidden.shape
    vocab = student_weight.shape[0]
    dev = student_hidden.device
    if student_weight.shape[1] != hs:
        raise ValueError(
            f"{_FN}: student_weight must have shape (V, Hs) with Hs={hs} like student_hidden; got {shape_str(student_weight)}."
        )
    if vocab == 0:
        raise ValueError(f"{_FN}: student_weight must have V >= 1 rows; got {shape_str(student_weight)}.")
    if student_weight.dtype != student_hidden.dtype:
        raise TypeError(
            f"{_FN}: student_weight must have the dtype of student_hidden ({student_hidden.dtype}); got {student_weight.dtype}."
        )
    if student_bias is not None:
        if not isinstance(student_bias, torch.Tensor) or student_bias.shape != (vocab,):
            raise ValueError(
                f"{_FN}: student_bias must be a 1-D tensor of length V={vocab} or None; got {got_str(student_bias)}."
            )
    has_hidden = teacher_hidden is not None or teacher_weight is not None
    if has_hidden == (teacher_logits is not None):
        raise ValueError(
            f"{_FN}: teacher must be given exactly one way, teacher_hidden + teacher_weight or teacher_logits; "
            f"got teacher_hidden={'set' if teacher_hidden is not None else None}, "
            f"teacher_weight={'set' if teacher_weight is not None else None}, "
            f"teacher_logits={'set' if teacher_logits is not None else None}."
        )
    if has_hidden:
        if teacher_hidden is None or teacher_weight is None:
            missing = "teacher_weight" if teacher_weight is None else "teacher_hidden"
            raise ValueError(f"{_FN}: {missing} must be given together with the other teacher tensor; got None.")
        _check_2d("teacher_hidden", teacher_hidden)
        _check_2d("teacher_weight", teacher_weight)
        if teacher_hidden.shape[0] != n:
            raise ValueError(
                f"{_FN}: teacher_hidden must have N={n} rows like student_hidden; got {shape_str(teacher_hidden)}."
            )
        if teacher_weight.shape[1] != teacher_hidden.shape[1]:
            raise ValueError(
                f"{_FN}: teacher_weight must have shape (Vt, Ht) with Ht={teacher_hidden.shape[1]} like teacher_hidden; "
                f"got {shape_str(teacher_weight)}."
            )
        if teacher_weight.shape[0] < vocab:
            raise ValueError(
                f"{_FN}: teacher_weight must have at least the student's V={vocab} rows (a larger teacher vocabulary "
                f"is sliced); got {teacher_weight.shape[0]}. Teacher and student must share a tokenizer."
            )
        if teacher_bias is not None and (
            not isinstance(teacher_bias, torch.Tensor) or teacher_bias.shape != (teacher_weight.shape[0],)
        ):
            raise ValueError(
                f"{_FN}: teacher_bias must be a 1-D tensor of length Vt={teacher_weight.shape[0]} like the rows of "
                f"teacher_weight, or None; got {got_str(teacher_bias)}."
            )
        teachers: tuple[tuple[str, torch.Tensor | None], ...] = (
            ("teacher_hidden", teacher_hidden),
            ("teacher_weight", teacher_weight),
            ("teacher_bias", teacher_bias),
        )
    else:
        for name, given in (("teacher_bias", teacher_bias), ("teacher_softcap", teacher_softcap)):
            if given is not None:
                raise ValueError(
                    f"{_FN}: {name} applies to teacher_hidden + teacher_weight (given teacher_logits are final); "
                    f"got {name}={'a tensor' if isinstance(given, torch.Tensor) else repr(given)} with teacher_logits."
                )
        _check_2d("teacher_logits", teacher_logits)
        assert teacher_logits is not None
        if teacher_logits.shape[0] != n:
            raise ValueError(
                f"{_FN}: teacher_logits must have N={n} rows like student_hidden; got {shape_str(teacher_logits)}."
            )
        if teacher_logits.shape[1] < vocab:
            raise ValueError(
                f"{_FN}: teacher_logits must have at least the student's V={vocab} columns (a larger teacher "
                f"vocabulary is sliced); got {teacher_logits.shape[1]}. Teacher and student must share a tokenizer."
            )
        teachers = (("teacher_logits", teacher_logits),)
    for name, t in (("student_weight", student_weight), ("student_bias", student_bias)) + teachers:
        if t is not None and t.device != dev:
            raise ValueError(f"{_FN}: {name} must be on the device of student_hidden ({dev}); got {t.device}.")
    return n, vocab


def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
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
    strategy: str = "auto",
    workspace_bytes: int | None = None,
    check_inputs: bool | None = None,
    shift: bool = False,
) -> KDLossOutput:
    """``kd_loss`` fused with the student's (and teacher's) ``lm_head``; no ``(N, V)`` tensor.

    Same loss as ``ddk.kd_loss(cap(h @ W.T + b), teacher_logits, labels, ...)`` (``cap`` the
    softcap ``c * tanh(z / c)`` when ``student_softcap`` is given, else the identity):
    ``(sum CE + gamma * s * sum D) / normalizer`` over valid tokens, ``s = T**2`` with
    ``t2_scale`` else 1, ``D`` = forward KL ``KL(p_T || p_S)`` (default), reverse KL
    ``KL(p_S || p_T)`` or JSD(beta) between ``p = softmax(logits / T)``; CE at ``T = 1``.

    Args:
        student_hidden: ``(N, Hs)`` or ``(B, L, Hs)`` float32/bfloat16/float16/float64 (last
            hidden states).
        student_weight: ``(V, Hs)`` same dtype (the student's ``lm_head.weight``; under autocast
            both are cast to the autocast dtype, see the module docstring).
        labels: ``(N,)`` or ``(B, L)`` int64/int32 in ``[0, V)`` or ``ignore_index``; ignored
            tokens are dropped before any matmul. Unshifted with ``shift=True``.
        teacher_hidden: ``(N, Ht)`` / ``(B, L, Ht)`` (the leading dims of ``student_hidden``), any
            float dtype, with ``teacher_weight`` ``(Vt, Ht)`` of its dtype, ``Vt >= V`` (rows
            beyond V, e.g. embedding padding, are never read); or
        teacher_logits: ``(N, Vt)`` / ``(B, L, Vt)``, ``Vt >= V``. Exactly one of the two. Never
            differentiated.
        student_bias: ``(V,)`` or None.
        teacher_bias: ``(Vt,)`` (the teacher ``lm_head``'s bias, e.g. Phi) or None; with
            ``teacher_hidden`` only.
        student_softcap: ``c`` of the student's final logit softcap (logits ``c * tanh(z / c)``,
            e.g. Gemma2's ``config.final_logit_softcapping``), a number > 0, or None. Applied inside
            the tiles, forward and backward.
        teacher_softcap: the same for the teacher's logits; with ``teacher_hidden`` only (given
            ``teacher_logits`` are final).
        domain_ids: ``(N,)``, or with 3-D inputs ``(B,)`` (per sequence) or ``(B, L)`` (per
            token; with ``shift=True`` the domain of the label token counts), int64/int32 in
            ``[0, num_domains)``; None puts every token in domain 0.
        num_domains: D, required with ``domain_ids``.
        gamma: weight of the divergence (paper default 0.2), as in ``ddk.kd_loss``.
        temperature: T of the divergence (paper default 1.0; the CE uses T = 1), as in ``ddk.kd_loss``.
        divergence: ``"forward_kl"`` (KL(p_T || p_S), the default), ``"reverse_kl"`` or ``"jsd"``.
        beta: JSD weight in ``[0, 1]``, as in ``ddk.kd_loss``.
        ignore_index: label of tokens that contribute nothing.
        t2_scale: multiply the divergence by ``T**2`` in the loss.
        normalizer: denominator of the loss instead of the valid-token count, as in ``ddk.kd_loss``.
        backend: ``"auto"``, ``"chunked"`` (pure torch) or ``"reference"`` (materialises the
            logits; for tests). ``"cpp"`` and ``"triton"`` are backends of ``ddk.kd_loss`` only
            (the ``gemm`` strategy uses them for its rows) and raise here.
        strategy: ``"auto"``, ``"recompute"`` (vocabulary tiles, recomputed in backward sweeps;
            least memory), ``"token_chunks"`` (one ``(chunk, V)`` slice per token chunk,
            computed once; faster) or ``"gemm"`` (per token chunk: logits by one matmul in the
            input dtype, the per-row kernels of ``kd_loss``, two gradient matmuls; the default
            on CUDA, where it runs on the tensor cores). See ``ddk_kernels.fused_plan``.
        workspace_bytes: scratch budget of the tiles (default: available memory / 16, clamped to
            [32 MiB, 256 MiB]).
        check_inputs: check label and domain-id ranges (one min/max reduction each, one host sync).
            Default: on for CPU.
        shift: next-token shift inside the loss (3-D inputs only): the last position of the
            hidden states (teacher logits) and the first label of every sequence are dropped.

    Returns:
        ``KDLossOutput`` over the (shifted) tokens; ``loss`` is differentiable w.r.t.
        ``student_hidden``, ``student_weight`` and ``student_bias`` (one backward per forward on
        the chunked backend: its gradients are computed in the forward pass and scaled by
        ``grad_output``).

    Raises:
        TypeError, ValueError: bad input, named in the message with the expected shape or value.

    Examples:
        >>> import torch
        >>> from ddk.losses.fused import fused_linear_kd_loss
        >>> h = torch.randn(2, 4, 8, requires_grad=True)
        >>> w = torch.randn(11, 8, requires_grad=True)
        >>> labels = torch.tensor([[1, 2, 3, -100], [4, 5, 6, 7]])
        >>> out = fused_linear_kd_loss(h, w, labels, teacher_hidden=torch.randn(2, 4, 16),
        ...                            teacher_weight=torch.randn(13, 16), shift=True)
        >>> out.loss.backward()
        >>> int(out.num_tokens), tuple(w.grad.shape)
        (5, (11, 8))
    """
    if not isinstance(student_hidden, torch.Tensor):
        raise TypeError(f"{_FN}: student_hidden must be a torch.Tensor; got {type(student_hidden).__name__}.")
    if student_hidden.dim() not in (2, 3) or student_hidden.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{_FN}: student_hidden must be a 2-D (N, Hs) or 3-D (B, L, Hs) float tensor; "
            f"got shape {shape_str(student_hidden)} and dtype {student_hidden.dtype}."
        )
    (student_hidden, teacher_hidden, teacher_logits), labels, domain_ids = flatten_for_loss(
        (student_hidden, teacher_hidden, teacher_logits),
        labels,
        domain_ids,
        shift=shift,
        ignore_index=ignore_index,
        names=("student_hidden", "teacher_hidden", "teacher_logits"),
        fn=_FN,
    )
    amp = autocast_dtype(student_hidden.device)
    if amp is not None:  # the lm_head matmuls in the autocast dtype, as F.linear would run them
        student_hidden, student_weight = _to_autocast(student_hidden, amp), _to_autocast(student_weight, amp)
        student_bias, teacher_hidden, teacher_weight, teacher_bias = (
            _to_autocast(t, amp) for t in (student_bias, teacher_hidden, teacher_weight, teacher_bias)
        )
    student_softcap = check_softcap(_FN, "student_softcap", student_softcap)
    teacher_softcap = check_softcap(_FN, "teacher_softcap", teacher_softcap)
    n, vocab = _validate(
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        teacher_logits,
        student_bias,
        teacher_bias,
        teacher_softcap,
    )
    params = loss_params(
        _FN,
        gamma=gamma,
        temperature=temperature,
        divergence=divergence,
        beta=beta,
        num_domains=num_domains,
        normalizer=normalizer,
        ignore_index=ignore_index,
        t2_scale=t2_scale,
    )
    plan_strategy = one_of(_FN, "strategy", strategy, STRATEGIES)
    if workspace_bytes is not None and (
        not isinstance(workspace_bytes, int) or isinstance(workspace_bytes, bool) or workspace_bytes < 1
    ):
        raise ValueError(f"{_FN}: workspace_bytes must be a positive int or None; got {workspace_bytes!r}.")
    dev = student_hidden.device
    if check_inputs is None:
        check_inputs = dev.type == "cpu"
    d = validate_labels_domains(_FN, n, vocab, labels, domain_ids, num_domains, ignore_index, dev, check_inputs)
    labels = labels.long()
    fused = resolve("fused_linear_kd", backend, dev)
    if teacher_weight is not None:
        teacher_weight = teacher_weight[:vocab]
    if teacher_bias is not None:
        teacher_bias = teacher_bias[:vocab]
    if teacher_logits is not None:  # a view: the backends copy only the V columns they read
        teacher_logits = teacher_logits[:, :vocab]
    if not torch.is_grad_enabled():
        # The chunked path computes the gradients in the forward pass whenever an input requires
        # grad; under no_grad (evaluation) nobody can use them, so skip (V, Hs) of work.
        student_hidden, student_weight = student_hidden.detach(), student_weight.detach()
        student_bias = None if student_bias is None else student_bias.detach()
    teacher = TeacherInputs(teacher_hidden, teacher_weight, teacher_logits, teacher_bias, teacher_softcap)
    options = FusedOptions(strategy=plan_strategy, workspace_bytes=workspace_bytes)
    with autocast_off(dev):
        loss, ce, kd = fused(
            student_hidden,
            student_weight,
            labels,
            teacher,
            params,
            student_bias=student_bias,
            options=options,
            student_softcap=student_softcap,
        )
        return kd_output(loss, ce, kd, labels != ignore_index, domain_ids, d)


class FusedLinearKDLoss(KDLossConfigModule):
    """``nn.Module`` wrapper of :func:`fused_linear_kd_loss` holding only its configuration.

    ``forward(student_hidden (N, Hs) | (B, L, Hs), student_weight (V, Hs), labels (N,) | (B, L), *,
    teacher_hidden=None, teacher_weight=None, teacher_logits=None, student_bias=None,
    teacher_bias=None, student_softcap=None, teacher_softcap=None, domain_ids=None,
    normalizer=None, shift=False) -> KDLossOutput``. Options as :class:`ddk.KDLoss`, plus
    ``strategy`` and ``workspace_bytes``.
    """

    def __init__(self, *, strategy: str = "auto", workspace_bytes: int | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.strategy = strategy
        self.workspace_bytes = workspace_bytes

    def options(self) -> dict[str, Any]:
        """The keyword options passed to :func:`fused_linear_kd_loss` (without tensors)."""
        return dict(super().options(), strategy=self.strategy, workspace_bytes=self.workspace_bytes)

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        labels: torch.Tensor,
        *,
        teacher_hidden: torch.Tensor | None = None,
        teacher_weight: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
        student_bias: torch.Tensor | None = None,
        teacher_bias: torch.Tensor | None = None,
        student_softcap: float | None = None,
        teacher_softcap: float | None = None,
        domain_ids: torch.Tensor | None = None,
        normalizer: float | torch.Tensor | None = None,
        shift: bool = False,
    ) -> KDLossOutput:
        return fused_linear_kd_loss(
            student_hidden,
            student_weight,
            labels,
            teacher_hidden=teacher_hidden,
            teacher_weight=teacher_weight,
            teacher_logits=teacher_logits,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            student_softcap=student_softcap,
            teacher_softcap=teacher_softcap,
            domain_ids=domain_ids,
            num_domains=self.num_domains if domain_ids is not None else None,
            normalizer=normalizer,
            shift=shift,
            **self.options(),
        )
