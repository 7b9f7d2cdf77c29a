"""Fused ``lm_head`` + KD loss: ``fused_linear_kd_loss``, its module ``FusedLinearKDLoss`` and the
transformers helper ``causal_lm_kd_loss``.

The loss is the one of ``ddk.kd_loss`` on the logits ``zS = h W^T (+ b)`` and
``zT = h_T W_T[:V]^T`` (or given teacher logits), computed without ever allocating an ``(N, V)``
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

import dataclasses
from collections.abc import Mapping
from typing import Any, overload

import torch
from torch import nn

from ddk.losses.kd import (
    KDLossConfigModule,
    autocast_dtype,
    autocast_off,
    flatten_for_loss,
    flatten_labels_domains,
    kd_loss,
    loss_params,
    one_of,
    validate_kd_options,
    validate_labels_domains,
)
from ddk_kernels.dispatch import resolve
from ddk_kernels.fused_plan import STRATEGIES, FusedOptions
from ddk_kernels.reduce import kd_output
from ddk_kernels.types import FLOAT_DTYPES, KDLossOutput, TeacherInputs

__all__ = [
    "fused_linear_kd_loss",
    "FusedLinearKDLoss",
    "causal_lm_kd_loss",
]


def __getattr__(name: str) -> Any:
    """Deprecated names of the fused backends (dispatch now holds one table for every op)."""
    import warnings

    from ddk_kernels import dispatch

    if name == "FUSED_BACKENDS":
        warnings.warn(
            "ddk.losses.fused.FUSED_BACKENDS is deprecated; use ddk_kernels.dispatch.TABLE['fused_linear_kd']",
            DeprecationWarning,
            stacklevel=2,
        )
        return ("auto", *dispatch.TABLE["fused_linear_kd"])
    if name == "resolve_fused_backend":
        warnings.warn(
            "ddk.losses.fused.resolve_fused_backend is deprecated; use "
            "ddk_kernels.dispatch.resolve_backend(backend, device, op='fused_linear_kd')",
            DeprecationWarning,
            stacklevel=2,
        )
        return lambda backend, device: dispatch.resolve_backend(backend, device, op="fused_linear_kd")
    raise AttributeError(f"module 'ddk.losses.fused' has no attribute {name!r}")


_FN = "fused_linear_kd_loss"


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def _got(t: Any) -> str:
    """The shape of a tensor, else the type name of what was passed instead."""
    return _shape(t) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_2d(name: str, t: Any, allow_none: bool = False) -> None:
    if t is None and allow_none:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{_FN}: {name} must be a torch.Tensor; got {type(t).__name__}.")
    if t.dim() != 2 or t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{_FN}: {name} must be a 2-D float tensor; got shape {_shape(t)} and dtype {t.dtype}.")


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
            raise ValueError(
                f"{_FN}: teacher_hidden must have N={n} rows like student_hidden; got {_shape(teacher_hidden)}."
            )
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
        teachers: tuple[tuple[str, torch.Tensor], ...] = (
            ("teacher_hidden", teacher_hidden),
            ("teacher_weight", teacher_weight),
        )
    else:
        _check_2d("teacher_logits", teacher_logits)
        assert teacher_logits is not None
        if teacher_logits.shape[0] != n:
            raise ValueError(
                f"{_FN}: teacher_logits must have N={n} rows like student_hidden; got {_shape(teacher_logits)}."
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

    Same loss as ``ddk.kd_loss(h @ W.T + b, teacher_logits, labels, ...)``:
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
            f"got shape {_shape(student_hidden)} and dtype {student_hidden.dtype}."
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
        student_bias, teacher_hidden, teacher_weight = (
            _to_autocast(t, amp) for t in (student_bias, teacher_hidden, teacher_weight)
        )
    n, vocab = _validate(student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits, student_bias)
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
    if teacher_logits is not None:  # a view: the backends copy only the V columns they read
        teacher_logits = teacher_logits[:, :vocab]
    if not torch.is_grad_enabled():
        # The chunked path computes the gradients in the forward pass whenever an input requires
        # grad; under no_grad (evaluation) nobody can use them, so skip (V, Hs) of work.
        student_hidden, student_weight = student_hidden.detach(), student_weight.detach()
        student_bias = None if student_bias is None else student_bias.detach()
    teacher = TeacherInputs(teacher_hidden, teacher_weight, teacher_logits)
    options = FusedOptions(strategy=plan_strategy, workspace_bytes=workspace_bytes)
    with autocast_off(dev):
        loss, ce, kd = fused(
            student_hidden, student_weight, labels, teacher, params, student_bias=student_bias, options=options
        )
        return kd_output(loss, ce, kd, labels != ignore_index, domain_ids, d)


class FusedLinearKDLoss(KDLossConfigModule):
    """``nn.Module`` wrapper of :func:`fused_linear_kd_loss` holding only its configuration.

    ``forward(student_hidden (N, Hs) | (B, L, Hs), student_weight (V, Hs), labels (N,) | (B, L), *,
    teacher_hidden=None, teacher_weight=None, teacher_logits=None, student_bias=None,
    domain_ids=None, normalizer=None, shift=False) -> KDLossOutput``. Options as
    :class:`ddk.KDLoss`, plus ``strategy`` and ``workspace_bytes``.
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
            domain_ids=domain_ids,
            num_domains=self.num_domains if domain_ids is not None else None,
            normalizer=normalizer,
            shift=shift,
            **self.options(),
        )


# -- transformers helper ----------------------------------------------------------------------

_CAUSAL = "causal_lm_kd_loss"
_LOSS_PATHS: tuple[str, ...] = ("fused", "logits")
#: keyword options ``causal_lm_kd_loss`` forwards to the loss of each path
_PATH_OPTIONS: dict[str, tuple[str, ...]] = {
    "fused": (
        "gamma",
        "temperature",
        "divergence",
        "beta",
        "ignore_index",
        "t2_scale",
        "backend",
        "strategy",
        "workspace_bytes",
        "check_inputs",
    ),
    "logits": ("gamma", "temperature", "divergence", "beta", "ignore_index", "t2_scale", "backend", "check_inputs"),
}


def _unwrap(model: nn.Module) -> nn.Module:
    """The causal LM inside a data-parallel wrapper (``DistributedDataParallel``, ``DataParallel``,
    accelerate's or DeepSpeed's engines hold it as ``.module``), or ``model`` itself."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module) or callable(getattr(model, "get_output_embeddings", None)):
            return model
        model = inner


def _decoder_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Last hidden states ``(B, L, H)`` of a transformers causal LM, without its ``lm_head`` work.

    A bare model runs its decoder. A model inside a data-parallel wrapper is called through the
    wrapper (``output_hidden_states=True`` and an empty ``logits_to_keep``, so no logits are
    computed), because a wrapper synchronises gradients only of the forwards it sees.
    """
    inner = _unwrap(model)
    if inner is not model:
        empty = torch.zeros(0, dtype=torch.long, device=input_ids.device)
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=False,
            output_hidden_states=True,
            logits_to_keep=empty,
        )
        hidden = getattr(out, "hidden_states", None)
        if not hidden:
            raise TypeError(
                f"{_CAUSAL}: a wrapped model must return hidden_states with output_hidden_states=True; got "
                f"{type(out).__name__} without them. Use loss='logits' for this model."
            )
        return hidden[-1]
    decoder = None
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        decoder = get_decoder()
    if decoder is None or decoder is model:
        base = getattr(model, "base_model", None)
        decoder = base if base is not None and base is not model else getattr(model, "model", None)
    if decoder is None:
        raise TypeError(
            f"{_CAUSAL}: model must be a transformers causal LM with get_decoder(), .base_model or .model; "
            f"got {type(model).__name__}. Use loss='logits' for other models."
        )
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def _output_layer(model: nn.Module, role: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight (V, H), bias (V,) or None)`` of the model's ``lm_head``."""
    model = _unwrap(model)
    cfg = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale"):
        if cfg is not None and getattr(cfg, attr, None) not in (None, 1.0):
            raise ValueError(
                f"{_CAUSAL}: {role}_model must compute logits as lm_head(hidden) alone; "
                f"got config.{attr}={getattr(cfg, attr)!r}. Use loss='logits' for this model."
            )
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise TypeError(
            f"{_CAUSAL}: {role}_model must have an output embedding (lm_head, from get_output_embeddings()); "
            f"got {type(model).__name__} without one. Pass the ...ForCausalLM model, not its bare decoder."
        )
    return head.weight, getattr(head, "bias", None)


def _model_logits(
    model: nn.Module, role: str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """``model(input_ids=..., attention_mask=...).logits``, checked to be ``(B, L, V)``."""
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    logits = getattr(out, "logits", None)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise TypeError(
            f"{_CAUSAL}: {role}_model must return .logits of shape (B, L, V) with (B, L)={tuple(input_ids.shape)}; "
            f"got {type(model).__name__} returning {_got(logits) if logits is not None else type(out).__name__}."
        )
    return logits


def _check_teacher_vocab(student_vocab: int, teacher_vocab: int) -> None:
    if teacher_vocab < student_vocab:
        raise ValueError(
            f"{_CAUSAL}: teacher_model must have a vocabulary of at least the student's V={student_vocab} "
            f"(a larger teacher vocabulary is sliced); got {teacher_vocab}. Teacher and student must share a tokenizer."
        )


def _read_batch(
    batch: Mapping[str, Any], domain_ids: Any, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """``(input_ids, attention_mask, labels, domain_ids)`` of a batch, shapes checked."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"{_CAUSAL}: batch must be a mapping with 'input_ids'; got {type(batch).__name__}.")
    if "input_ids" not in batch:
        raise ValueError(f"{_CAUSAL}: batch must hold 'input_ids' (B, L); got keys {sorted(batch)}.")
    input_ids = batch["input_ids"]
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        got = f"{_got(input_ids)} {input_ids.dtype}" if isinstance(input_ids, torch.Tensor) else _got(input_ids)
        raise ValueError(f"{_CAUSAL}: batch['input_ids'] must be a (B, L) integer tensor; got {got}.")
    attention_mask = batch.get("attention_mask")
    if attention_mask is not None and (
        not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape
    ):
        raise ValueError(
            f"{_CAUSAL}: batch['attention_mask'] must have the shape of input_ids {_shape(input_ids)}; "
            f"got {_got(attention_mask)}."
        )
    labels = batch.get("labels")
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, ignore_index)
    if not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape:
        raise ValueError(
            f"{_CAUSAL}: batch['labels'] must have the shape of input_ids {_shape(input_ids)} (unshifted: the "
            f"shift happens inside); got {_got(labels)}."
        )
    batch_domains = batch.get("domain_ids")
    if domain_ids is not None and batch_domains is not None:
        raise ValueError(
            f"{_CAUSAL}: domain_ids must be given once, as the keyword or as batch['domain_ids']; got both."
        )
    if domain_ids is None:
        domain_ids = batch_domains
    if domain_ids is not None:
        domain_ids = torch.as_tensor(domain_ids, device=input_ids.device)
    return input_ids, attention_mask, labels, domain_ids


def causal_lm_kd_loss(
    student_model: nn.Module,
    teacher_model: nn.Module | None,
    batch: Mapping[str, torch.Tensor],
    *,
    domain_ids: torch.Tensor | None = None,
    num_domains: int | None = None,
    loss: str = "fused",
    normalizer: float | torch.Tensor | None = None,
    **opts: Any,
) -> KDLossOutput:
    """KD loss of a transformers causal-LM pair on one batch: ``CE + gamma * D(p_T, p_S)``.

    Position ``i`` predicts token ``i + 1`` (labels are given unshifted and shifted inside);
    ``D`` is forward KL(p_T || p_S) by default (``divergence=`` as :func:`ddk.kd_loss`). The
    teacher runs under ``torch.no_grad()`` and is never differentiated.

    * ``loss="fused"`` (default): runs both decoders (``model.get_decoder()``) and calls
      :func:`fused_linear_kd_loss` on the hidden states with the output-embedding weights
      (``get_output_embeddings()``, tied ones included), never calling the ``lm_head``: no
      ``(B * L, V)`` logits of either model exist. Decoders whose logits are ``lm_head(hidden)``
      alone only.
    * ``loss="logits"``: calls ``model(input_ids=..., attention_mask=...).logits`` of both models
      and :func:`ddk.kd_loss` with ``shift=True``; the same numbers, for any model with ``.logits``
      (logit soft-capping, scaled heads), at the memory of two ``(B, L, V)`` logits.

    Autocast: under ``torch.autocast(device, dtype=torch.bfloat16)`` (CPU or CUDA, the same code)
    the decoders run in autocast, the ``lm_head`` matmul runs in the autocast dtype as
    ``model(...).logits`` would (see :mod:`ddk.losses.fused`), and the row statistics stay float32
    (float64 for float64 models); autocast is disabled inside the loss kernels.

    Args:
        student_model: e.g. ``LlamaForCausalLM``; its vocabulary ``V``.
        teacher_model: same tokenizer, vocabulary ``Vt >= V`` (extra rows are sliced off); or None
            with a cached teacher in ``batch`` (below: the sparse loss of
            :func:`ddk.fused_linear_sparse_kd_loss` / :func:`ddk.sparse_kd_loss`, no teacher
            forward); or None without one for continued pretraining: CE only (``gamma`` must be
            0 or not given), ``kd_sum`` and ``domain_kd_sum`` are 0.
        batch: ``input_ids (B, L)`` integer; optional ``attention_mask (B, L)``; optional
            ``labels (B, L)`` int64 (default: ``input_ids`` with padding set to ``ignore_index``;
            the transformers convention, unshifted); optional ``domain_ids`` (read when the
            keyword is not given; kept for older callers); a cached teacher
            (``ddk.data.TeacherCacheCollator``): ``teacher_topk_ids (B, L, k)``,
            ``teacher_topk_logprobs (B, L, k)`` and optionally ``teacher_tail (B, L)``.
        domain_ids: ``(B,)`` (one domain per sequence, expanded to its tokens) or ``(B, L)`` (per
            token: the domain of the label token counts) int64 in ``[0, num_domains)``; given here
            or in ``batch``, not both. None puts every token in domain 0.
        num_domains: D, required with domain ids.
        loss: ``"fused"`` or ``"logits"``.
        normalizer: denominator of the loss instead of the batch's valid-token count.
        **opts: keyword options of the loss: ``gamma``, ``temperature``, ``divergence``, ``beta``,
            ``ignore_index``, ``t2_scale``, ``backend``, ``check_inputs``; with ``loss="fused"``
            also ``strategy`` and ``workspace_bytes``.

    Returns:
        ``KDLossOutput`` over the ``B * (L - 1)`` shifted positions (those with a label).

    Raises:
        TypeError: a model without an ``lm_head`` (fused) or ``.logits`` (logits), an unknown option.
        ValueError: labels or domain ids of another shape, both domain-id sources, a teacher
            vocabulary smaller than the student's, ``gamma > 0`` without a teacher, bad options.

    Examples:
        >>> import torch, transformers
        >>> from ddk.losses.fused import causal_lm_kd_loss
        >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
        ...                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
        >>> student, teacher = transformers.LlamaForCausalLM(cfg), transformers.LlamaForCausalLM(cfg)
        >>> batch = {"input_ids": torch.randint(0, 64, (2, 8))}
        >>> out = causal_lm_kd_loss(student, teacher, batch, domain_ids=torch.tensor([0, 1]), num_domains=2)
        >>> out.loss.backward()
        >>> out.domain_tokens.tolist()
        [7, 7]
    """
    fn = _CAUSAL
    if loss not in _LOSS_PATHS:
        raise ValueError(f"{fn}: loss must be one of {_LOSS_PATHS}; got {loss!r}.")
    for key in opts:
        if key not in _PATH_OPTIONS[loss]:
            raise TypeError(f"{fn}: options must be among {_PATH_OPTIONS[loss]} with loss={loss!r}; got {key!r}.")
    cached = _cached_teacher(batch)
    if cached is not None:
        if teacher_model is not None:
            raise ValueError(
                f"{fn}: the teacher must be given once, as teacher_model or as a cached teacher in batch "
                "('teacher_topk_ids', 'teacher_topk_logprobs'); got both."
            )
        return _cached_kd_loss(student_model, batch, cached, domain_ids, num_domains, loss, normalizer, opts)
    if teacher_model is None:
        gamma = opts.get("gamma", 0.0)
        if not (isinstance(gamma, (int, float)) and not isinstance(gamma, bool) and gamma == 0):
            raise ValueError(
                f"{fn}: gamma must be 0 or not given when teacher_model is None (continued pretraining: "
                f"CE only); got {gamma!r}."
            )
        opts["gamma"] = 0.0
    ignore_index = opts.get("ignore_index", -100)
    validate_kd_options(
        fn,
        gamma=opts.get("gamma", 0.2),
        temperature=opts.get("temperature", 1.0),
        divergence=opts.get("divergence", "forward_kl"),
        beta=opts.get("beta", 0.5),
        num_domains=num_domains,
        normalizer=normalizer,
    )
    input_ids, attention_mask, labels, domain_ids = _read_batch(batch, domain_ids, ignore_index)
    b, seq = input_ids.shape
    # The convention of every loss (flatten_for_loss), checked here once under this function's name
    # and before any model runs; the loss below repeats the shape checks (no host sync) but not
    # the range checks.
    flat_labels, flat_domains = flatten_labels_domains(
        labels, domain_ids, (b, seq), shift=True, ignore_index=ignore_index, fn=fn
    )
    check = opts.pop("check_inputs", None)
    if check is None:
        check = input_ids.device.type == "cpu"

    def validate(vocab: int) -> None:
        validate_labels_domains(
            fn, b * seq, vocab, flat_labels, flat_domains, num_domains, ignore_index, input_ids.device, bool(check)
        )

    common: dict[str, Any] = dict(
        domain_ids=domain_ids, num_domains=num_domains, normalizer=normalizer, shift=True, check_inputs=False, **opts
    )
    if loss == "fused":
        s_weight, s_bias = _output_layer(student_model, "student")
        if teacher_model is not None:
            t_weight, t_bias = _output_layer(teacher_model, "teacher")
            if t_bias is not None:
                raise ValueError(f"{fn}: teacher_model lm_head must have no bias; got a bias.")
            _check_teacher_vocab(s_weight.shape[0], t_weight.shape[0])
        validate(s_weight.shape[0])
        hs = _decoder_hidden(student_model, input_ids, attention_mask)
        if autocast_dtype(hs.device) is None and s_weight.dtype != hs.dtype:
            hs = hs.to(s_weight.dtype)  # (under autocast fused_linear_kd_loss casts both to its dtype)
        if teacher_model is not None:
            with torch.no_grad():
                ht = _decoder_hidden(teacher_model, input_ids, attention_mask)
            if autocast_dtype(ht.device) is None and t_weight.dtype != ht.dtype:
                ht = ht.to(t_weight.dtype)
        else:
            # No teacher: the fused kernels need one, so the student's own detached hidden states
            # and weight stand in with gamma 0. Its divergence to itself is computed (one extra
            # lm_head-sized matmul per tile) and never enters the loss or its gradients; the
            # reported divergence sums are set to 0 below.
            ht, t_weight = hs.detach(), s_weight.detach()
        out = fused_linear_kd_loss(
            hs, s_weight, labels, teacher_hidden=ht, teacher_weight=t_weight, student_bias=s_bias, **common
        )
    else:
        zs = _model_logits(student_model, "student", input_ids, attention_mask)
        if teacher_model is not None:
            with torch.no_grad():
                zt = _model_logits(teacher_model, "teacher", input_ids, attention_mask)
            _check_teacher_vocab(zs.shape[-1], zt.shape[-1])
        else:
            # No teacher: the student's detached logits (a view, no copy) stand in with gamma 0; the
            # row kernels compute its divergence to itself alongside the CE, which never enters the
            # loss; the reported divergence sums are set to 0 below.
            zt = zs.detach()
        validate(zs.shape[-1])
        out = kd_loss(zs, zt, labels, **common)
    if teacher_model is None:
        out = dataclasses.replace(
            out, kd_sum=torch.zeros_like(out.kd_sum), domain_kd_sum=torch.zeros_like(out.domain_kd_sum)
        )
    return out


_CACHED_KEYS = ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail")


def _cached_teacher(batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """``(ids, logprobs, tail)`` of a cached teacher in ``batch``, or None when it holds none."""
    if not isinstance(batch, Mapping) or "teacher_topk_ids" not in batch:
        return None
    if "teacher_topk_logprobs" not in batch:
        raise ValueError(
            f"{_CAUSAL}: batch['teacher_topk_ids'] needs batch['teacher_topk_logprobs'] (a cached teacher); got "
            f"keys {sorted(batch)}."
        )
    return batch["teacher_topk_ids"], batch["teacher_topk_logprobs"], batch.get("teacher_tail")


def _cached_kd_loss(
    student_model: nn.Module,
    batch: Mapping[str, Any],
    cached: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    domain_ids: Any,
    num_domains: int | None,
    loss: str,
    normalizer: float | torch.Tensor | None,
    opts: dict[str, Any],
) -> KDLossOutput:
    """``causal_lm_kd_loss`` against a cached top-k teacher: the sparse loss, fused or on logits."""
    from ddk.losses.sparse import fused_linear_sparse_kd_loss, sparse_kd_loss

    ignore_index = opts.get("ignore_index", -100)
    opts = {k: v for k, v in opts.items() if k != "strategy"}  # the sparse fused loss has one strategy
    input_ids, attention_mask, labels, domain_ids = _read_batch(batch, domain_ids, ignore_index)
    ids, logprobs, tail = (None if t is None else t.to(input_ids.device) for t in cached)
    assert ids is not None and logprobs is not None
    common: dict[str, Any] = dict(
        teacher_tail=tail, domain_ids=domain_ids, num_domains=num_domains, normalizer=normalizer, shift=True, **opts
    )
    if loss == "fused":
        weight, bias = _output_layer(student_model, "student")
        hs = _decoder_hidden(student_model, input_ids, attention_mask)
        if autocast_dtype(hs.device) is None and weight.dtype != hs.dtype:
            hs = hs.to(weight.dtype)
        return fused_linear_sparse_kd_loss(hs, weight, ids, logprobs, labels, student_bias=bias, **common)
    zs = _model_logits(student_model, "student", input_ids, attention_mask)
    common.pop("workspace_bytes", None)
    return sparse_kd_loss(zs, ids, logprobs, labels, **common)
