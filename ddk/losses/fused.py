"""Fused ``lm_head`` + KD loss: ``fused_linear_kd_loss``, its module ``FusedLinearKDLoss`` and the
transformers helper ``causal_lm_kd_loss``.

The loss is the one of ``ddk.kd_loss`` on the logits ``zS = h W^T (+ b)`` and
``zT = h_T W_T[:V]^T`` (or given teacher logits), computed without ever allocating an ``(N, V)``
tensor (backends ``"chunked"`` and ``"triton"``; ``"reference"`` materialises, for tests).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ddk.losses.kd import _FLOAT_DTYPES, KDLossConfigModule, _shape, validate_kd_options, validate_labels_domains
from ddk_kernels.dispatch import FUSED_BACKENDS, resolve_fused_backend
from ddk_kernels.reduce import domain_sums
from ddk_kernels.types import KDConfig, KDLossOutput, acc_dtype

__all__ = [
    "FUSED_BACKENDS",
    "resolve_fused_backend",
    "fused_linear_kd_loss",
    "FusedLinearKDLoss",
    "causal_lm_kd_loss",
]

_FN = "fused_linear_kd_loss"


def _check_2d(name: str, t: Any, allow_none: bool = False) -> None:
    if t is None and allow_none:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{_FN}: {name} must be a torch.Tensor; got {type(t).__name__}.")
    if t.dim() != 2 or t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{_FN}: {name} must be a 2-D float tensor; got shape {_shape(t)} and dtype {t.dtype}.")


def _validate(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    teacher_logits: torch.Tensor | None,
    student_bias: torch.Tensor | None,
) -> tuple[int, int]:
    """Shape/dtype/device checks of the tensors; returns ``(N, V)``."""
    _check_2d("student_hidden", student_hidden)
    _check_2d("student_weight", student_weight)
    n, hs = student_hidden.shape
    vocab = student_weight.shape[0]
    dev = student_hidden.device
    if student_weight.shape[1] != hs:
        raise ValueError(
            f"{_FN}: student_weight must have shape (V, Hs) with Hs={hs} like student_hidden; got {_shape(student_weight)}."
        )
    if vocab == 0:
        raise ValueError(f"{_FN}: student_weight must have V >= 1 rows; got {_shape(student_weight)}.")
    if student_weight.dtype != student_hidden.dtype:
        raise TypeError(
            f"{_FN}: student_weight must have the dtype of student_hidden ({student_hidden.dtype}); got {student_weight.dtype}."
        )
    if student_bias is not None:
        if not isinstance(student_bias, torch.Tensor) or student_bias.shape != (vocab,):
            got = _shape(student_bias) if isinstance(student_bias, torch.Tensor) else type(student_bias).__name__
            raise ValueError(f"{_FN}: student_bias must be a 1-D tensor of length V={vocab} or None; got {got}.")
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
            raise ValueError(f"{_FN}: teacher_hidden must have N={n} rows like student_hidden; got {_shape(teacher_hidden)}.")
        if teacher_weight.shape[1] != teacher_hidden.shape[1]:
            raise ValueError(
                f"{_FN}: teacher_weight must have shape (Vt, Ht) with Ht={teacher_hidden.shape[1]} like teacher_hidden; "
                f"got {_shape(teacher_weight)}."
            )
        if teacher_weight.shape[0] < vocab:
            raise ValueError(
                f"{_FN}: teacher_weight must have at least the student's V={vocab} rows (a larger teacher vocabulary "
                f"is sliced); got {teacher_weight.shape[0]}. Teacher and student must share a tokenizer."
            )
        teachers = (("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight))
    else:
        _check_2d("teacher_logits", teacher_logits)
        assert teacher_logits is not None
        if teacher_logits.shape[0] != n:
            raise ValueError(f"{_FN}: teacher_logits must have N={n} rows like student_hidden; got {_shape(teacher_logits)}.")
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


def _reference_rows(
    student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_logits,
    labels, config, gamma, kd_scale, normalizer,
):  # type: ignore[no-untyped-def]
    """The naive path (materialises both ``(N, V)`` logits): oracle math with autograd."""
    from ddk_kernels.reference import kd_row_losses_reference

    vocab = student_weight.shape[0]
    cd = acc_dtype(student_hidden.dtype)
    zs = student_hidden @ student_weight.T
    if student_bias is not None:
        zs = zs + student_bias
    if teacher_logits is not None:
        zt = teacher_logits[:, :vocab].detach()
    else:
        zt = (teacher_hidden.detach() @ teacher_weight[:vocab].detach().T)
    ce, kd = kd_row_losses_reference(zs, zt, labels, config, cd)
    valid = labels != config.ignore_index
    if normalizer is None:
        norm = valid.sum().clamp(min=1).to(cd)
    else:
        norm = torch.as_tensor(normalizer, device=ce.device).detach().to(cd)
    loss = (ce.sum() + (gamma * kd_scale) * kd.sum()) / norm
    return loss, ce.detach(), kd.detach()


def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
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
) -> KDLossOutput:
    """``kd_loss`` fused with the student's (and teacher's) ``lm_head``; no ``(N, V)`` tensor.

    Same loss as ``ddk.kd_loss(h @ W.T + b, teacher_logits, labels, ...)``:
    ``(sum CE + gamma * s * sum D) / normalizer`` over valid tokens, ``s = T**2`` with
    ``t2_scale`` else 1, ``D`` = forward KL ``KL(p_T || p_S)`` (default), reverse KL
    ``KL(p_S || p_T)`` or JSD(beta) between ``p = softmax(logits / T)``; CE at ``T = 1``.

    Args:
        student_hidden: ``(N, Hs)`` float32/bfloat16/float16/float64 (last hidden states, flattened).
        student_weight: ``(V, Hs)`` same dtype (the student's ``lm_head.weight``).
        labels: ``(N,)`` int64 in ``[0, V)`` or ``ignore_index``; ignored tokens are dropped
            before any matmul.
        teacher_hidden: ``(N, Ht)`` with ``teacher_weight`` ``(Vt, Ht)``, ``Vt >= V`` (rows beyond
            V, e.g. embedding padding, are never read); or
        teacher_logits: ``(N, Vt)``, ``Vt >= V``. Exactly one of the two. Never differentiated.
        student_bias: ``(V,)`` or None.
        domain_ids: ``(N,)`` int64 in ``[0, num_domains)``; None puts every token in domain 0.
        num_domains: D, required with ``domain_ids``.
        gamma, temperature, divergence, beta, ignore_index, t2_scale, normalizer: as ``ddk.kd_loss``.
        backend: ``"auto"``, ``"chunked"`` (pure torch), ``"triton"`` (GPU; CPU only under
            ``TRITON_INTERPRET=1``) or ``"reference"`` (materialises the logits; for tests).
        strategy: ``"auto"``, ``"recompute"`` (vocabulary tiles, recomputed in backward sweeps;
            least memory), ``"token_chunks"`` (one ``(chunk, V)`` slice per token chunk,
            computed once; faster) or ``"gemm"`` (per token chunk: logits by one matmul in the
            input dtype, the per-row kernels of ``kd_loss``, two gradient matmuls; the default
            on CUDA, where it runs on the tensor cores). See ``ddk_kernels.fused_chunked``.
        workspace_bytes: scratch budget of the tiles (default: available memory / 16, clamped to
            [32 MiB, 256 MiB]).
        check_inputs: check label and domain-id ranges (one min/max reduction each, one host sync).
            Default: on for CPU.

    Returns:
        ``KDLossOutput``; ``loss`` is differentiable w.r.t. ``student_hidden``,
        ``student_weight`` and ``student_bias`` (one backward per forward on the chunked backend:
        its gradients are computed in the forward pass and scaled by ``grad_output``).

    Example:
        >>> import torch
        >>> from ddk.losses.fused import fused_linear_kd_loss
        >>> h = torch.randn(6, 8, requires_grad=True)
        >>> w = torch.randn(11, 8, requires_grad=True)
        >>> out = fused_linear_kd_loss(h, w, torch.tensor([1, 2, 3, -100, 4, 5]),
        ...                            teacher_hidden=torch.randn(6, 16), teacher_weight=torch.randn(13, 16))
        >>> out.loss.backward()
        >>> int(out.num_tokens), tuple(w.grad.shape)
        (5, (11, 8))
    """
    n, vocab = _validate(student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits, student_bias)
    validate_kd_options(
        _FN, gamma=gamma, temperature=temperature, divergence=divergence, beta=beta,
        num_domains=num_domains, normalizer=normalizer,
    )
    from ddk_kernels.fused_chunked import STRATEGIES

    if strategy not in STRATEGIES:
        raise ValueError(f"{_FN}: strategy must be one of {STRATEGIES}; got {strategy!r}.")
    if workspace_bytes is not None and (
        not isinstance(workspace_bytes, int) or isinstance(workspace_bytes, bool) or workspace_bytes < 1
    ):
        raise ValueError(f"{_FN}: workspace_bytes must be a positive int or None; got {workspace_bytes!r}.")
    dev = student_hidden.device
    if check_inputs is None:
        check_inputs = dev.type == "cpu"
    d = validate_labels_domains(_FN, n, vocab, labels, domain_ids, num_domains, ignore_index, dev, check_inputs)
    labels = labels.long()
    config = KDConfig(temperature=float(temperature), divergence=divergence, beta=float(beta), ignore_index=ignore_index)
    kd_scale = float(temperature) ** 2 if t2_scale else 1.0
    name = resolve_fused_backend(backend, dev)
    if teacher_weight is not None:
        teacher_weight = teacher_weight[:vocab]
    if teacher_logits is not None:  # a view: the backends copy only the V columns they read
        teacher_logits = teacher_logits[:, :vocab]
    if not torch.is_grad_enabled():
        # The chunked and Triton paths compute the gradients in the forward pass whenever an input
        # requires grad; under no_grad (evaluation) nobody can use them, so skip (V, Hs) of work.
        student_hidden, student_weight = student_hidden.detach(), student_weight.detach()
        student_bias = None if student_bias is None else student_bias.detach()
    args = (student_hidden, student_weight, labels, config)
    kwargs: dict[str, Any] = dict(
        teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, teacher_logits=teacher_logits,
        student_bias=student_bias, gamma=float(gamma), kd_scale=kd_scale, normalizer=normalizer,
    )
    if name == "reference":
        loss, ce, kd = _reference_rows(
            student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_logits,
            labels, config, float(gamma), kd_scale, normalizer,
        )
    elif name == "triton":
        from ddk_kernels.triton.fused_linear_kd import fused_linear_kd as triton_fused

        loss, ce, kd = triton_fused(*args, **kwargs)
    else:
        from ddk_kernels.fused_chunked import fused_linear_kd as chunked_fused

        loss, ce, kd = chunked_fused(*args, strategy=strategy, workspace_bytes=workspace_bytes, **kwargs)

    valid = labels != ignore_index
    d_ce, d_kd, d_tok = domain_sums(ce, kd, valid, domain_ids, d)
    return KDLossOutput(
        loss=loss,
        ce_sum=ce.sum(),
        kd_sum=kd.sum(),
        num_tokens=valid.sum(),
        domain_ce_sum=d_ce,
        domain_kd_sum=d_kd,
        domain_tokens=d_tok,
    )


class FusedLinearKDLoss(KDLossConfigModule):
    """``nn.Module`` wrapper of :func:`fused_linear_kd_loss` holding only its configuration.

    ``forward(student_hidden (N, Hs), student_weight (V, Hs), labels (N,), *, teacher_hidden=None,
    teacher_weight=None, teacher_logits=None, student_bias=None, domain_ids=None,
    normalizer=None) -> KDLossOutput``. Options as :class:`ddk.KDLoss`, plus ``strategy`` and
    ``workspace_bytes``.
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
        domain_ids: torch.Tensor | None = None,
        normalizer: float | torch.Tensor | None = None,
    ) -> KDLossOutput:
        return fused_linear_kd_loss(
            student_hidden, student_weight, labels,
            teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, teacher_logits=teacher_logits,
            student_bias=student_bias, domain_ids=domain_ids,
            num_domains=self.num_domains if domain_ids is not None else None,
            normalizer=normalizer, **self.options(),
        )



def _decoder_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Last hidden states ``(B, L, H)`` of a transformers causal LM, without its ``lm_head``."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    if decoder is None:
        raise TypeError(
            f"causal_lm_kd_loss: model must be a transformers causal LM with get_decoder() or .model; "
            f"got {type(model).__name__}."
        )
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def _output_layer(model: nn.Module, role: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    cfg = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale"):
        if cfg is not None and getattr(cfg, attr, None) not in (None, 1.0):
            raise ValueError(
                f"causal_lm_kd_loss: {role}_model must compute logits as lm_head(hidden) alone; "
                f"got config.{attr}={getattr(cfg, attr)!r}. Use kd_loss on its logits instead."
            )
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise TypeError(f"causal_lm_kd_loss: {role}_model must have an output embedding (lm_head); got None.")
    return head.weight, getattr(head, "bias", None)


def causal_lm_kd_loss(
    student_model: nn.Module,
    teacher_model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    **opts: Any,
) -> KDLossOutput:
    """Fused KD loss of a transformers causal-LM pair on one batch, never calling their ``lm_head``.

    Runs both decoders (``model.get_decoder()``; the teacher under ``torch.no_grad()``), shifts
    for next-token prediction (hidden state at position ``i`` predicts token ``i + 1``) and calls
    :func:`fused_linear_kd_loss` with the output-embedding weights (``get_output_embeddings()``).

    Args:
        student_model: e.g. ``LlamaForCausalLM``; its vocabulary ``V``.
        teacher_model: same tokenizer, vocabulary ``Vt >= V`` (extra rows are sliced off).
        batch: ``input_ids (B, L)``; optional ``attention_mask (B, L)``; optional ``labels (B, L)``
            (default: ``input_ids`` with padding set to ``ignore_index``; the usual
            transformers convention, unshifted); optional ``domain_ids (B,)`` (one domain per
            sequence, expanded to its tokens; needs ``num_domains=`` in ``opts``).
        **opts: keyword options of :func:`fused_linear_kd_loss` (gamma, temperature, divergence,
            num_domains, normalizer, backend, strategy, ...).

    Returns:
        ``KDLossOutput`` over the ``B * (L - 1)`` shifted positions.
    """
    input_ids = batch["input_ids"]
    attention_mask = batch.get("attention_mask")
    ignore_index = opts.get("ignore_index", -100)
    labels = batch.get("labels")
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, ignore_index)
    if labels.shape != input_ids.shape:
        raise ValueError(
            f"causal_lm_kd_loss: batch['labels'] must have the shape of input_ids {_shape(input_ids)}; got {_shape(labels)}."
        )
    s_weight, s_bias = _output_layer(student_model, "student")
    t_weight, _t_bias = _output_layer(teacher_model, "teacher")
    if _t_bias is not None:
        raise ValueError("causal_lm_kd_loss: teacher_model lm_head must have no bias; got a bias.")
    hs = _decoder_hidden(student_model, input_ids, attention_mask)
    with torch.no_grad():
        ht = _decoder_hidden(teacher_model, input_ids, attention_mask)
    b, seq = input_ids.shape
    hs = hs[:, :-1].reshape(b * (seq - 1), -1)
    ht = ht[:, :-1].reshape(b * (seq - 1), -1)
    shifted = labels[:, 1:].reshape(-1)
    domain_ids = batch.get("domain_ids")
    if domain_ids is not None:
        domain_ids = torch.as_tensor(domain_ids, device=input_ids.device).long().reshape(b, 1).expand(b, seq - 1).reshape(-1)
    if s_weight.dtype != hs.dtype:
        hs = hs.to(s_weight.dtype)
    if t_weight.dtype != ht.dtype:
        ht = ht.to(t_weight.dtype)
    return fused_linear_kd_loss(
        hs, s_weight, shifted, teacher_hidden=ht, teacher_weight=t_weight, student_bias=s_bias,
        domain_ids=domain_ids, **opts,
    )
