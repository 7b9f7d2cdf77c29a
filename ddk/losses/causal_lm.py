"""``causal_lm_kd_loss``: the KD loss of a transformers causal-LM pair on one batch, and the
model introspection it needs: the ``lm_head`` (output embedding) weights, the decoder's last hidden
states (through a data-parallel wrapper too), the ``.logits`` of the unfused path, and a cached
top-k teacher carried by the batch.

The losses themselves are :func:`ddk.losses.fused.fused_linear_kd_loss` (``loss="fused"``),
:func:`ddk.losses.kd.kd_loss` (``loss="logits"``) and, against a cached teacher, those of
:mod:`ddk.losses.sparse`; this module only reads the models and the batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ddk.distributed import full_tensor, is_fsdp_root
from ddk.losses.fused import fused_linear_kd_loss
from ddk.losses.kd import (
    autocast_dtype,
    flatten_labels_domains,
    got_str,
    kd_loss,
    shape_str,
    validate_kd_options,
    validate_labels_domains,
)
from ddk.losses.sparse import fused_linear_sparse_kd_loss, sparse_kd_loss
from ddk.zero3 import is_partitioned, whole_parameter, whole_shape
from ddk_kernels.types import KDLossOutput

__all__ = ["causal_lm_kd_loss", "check_fused_models"]

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


def _find_decoder(model: nn.Module) -> nn.Module | None:
    """The decoder of a transformers causal LM (``get_decoder()``, ``.base_model`` or ``.model``), or None."""
    decoder = None
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        decoder = get_decoder()
    if decoder is None or decoder is model:
        base = getattr(model, "base_model", None)
        decoder = base if base is not None and base is not model else getattr(model, "model", None)
    return decoder if isinstance(decoder, nn.Module) and decoder is not model else None


def _last_hidden(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def _decoder_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Last hidden states ``(B, L, H)`` of a transformers causal LM, without its ``lm_head`` work.

    A bare model runs its decoder. A model inside a data-parallel wrapper, or one sharded in place
    with FSDP2 (``fully_shard`` on the model itself), is called through its ``forward`` with an
    empty ``logits_to_keep`` (no logits are computed), because a wrapper synchronises gradients
    only of the forwards it sees and FSDP2 gathers the model's own parameters (embeddings, final
    norm, ``lm_head``) in its forward hooks; the decoder's output is taken by a forward hook on
    the decoder, so no layer's hidden states are kept beyond what autograd saves (a frozen
    teacher keeps none). A model without a decoder to hook returns them with
    ``output_hidden_states=True``.
    """
    inner = _unwrap(model)
    if inner is not model or is_fsdp_root(model):
        empty = torch.zeros(0, dtype=torch.long, device=input_ids.device)
        decoder = _find_decoder(inner)
        captured: list[torch.Tensor] = []
        handle = (
            decoder.register_forward_hook(lambda _m, _a, o: captured.append(_last_hidden(o)))
            if decoder is not None
            else None
        )
        try:
            out = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                use_cache=False,
                output_hidden_states=decoder is None,
                logits_to_keep=empty,
            )
        finally:
            if handle is not None:
                handle.remove()
        if captured:
            return captured[-1]
        hidden = getattr(out, "hidden_states", None)
        if not hidden:
            raise TypeError(
                f"{_CAUSAL}: a wrapped model must return hidden_states with output_hidden_states=True; got "
                f"{type(out).__name__} without them. Use loss='logits' for this model (ddk distill --loss logits; DDKConfig(loss='logits'))."
            )
        return hidden[-1]
    decoder = _find_decoder(model)
    if decoder is None:
        raise TypeError(
            f"{_CAUSAL}: model must be a transformers causal LM with get_decoder(), .base_model or .model; "
            f"got {type(model).__name__}. Use loss='logits' for other models (ddk distill --loss logits; DDKConfig(loss='logits'))."
        )
    return _last_hidden(decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False))


def _named(model: nn.Module) -> str:
    """`` 'path'`` of a model loaded from a folder or hub id, else ``""``."""
    name = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
    return f" {name!r}" if isinstance(name, str) and name else ""


def check_fused_models(student_model: nn.Module, teacher_model: nn.Module | None = None) -> None:
    """Raise now, before any step, what the fused path of :func:`causal_lm_kd_loss` would refuse:
    logits that are not ``softcap(lm_head(hidden))`` (a logit scale, e.g. ``config.logit_scale``
    or ``config.logits_scaling``) on either model, a model without an output embedding. The
    message names the model, the attribute and the option that works (``loss='logits'``,
    ``ddk distill --loss logits``). Soft-capping (``config.final_logit_softcapping``) and an
    ``lm_head`` bias are computed inside the fused tiles."""
    _output_layer(student_model, "student")
    if teacher_model is not None:
        _output_layer(teacher_model, "teacher")


#: config attributes that change logits beyond ``lm_head(hidden)`` in a way the fused path does not
#: compute, with the value that means "no change"
_UNFUSED_CONFIG: dict[str, float] = {"logit_scale": 1.0, "logits_scaling": 1.0}


class _Head:
    """A model's output layer as the fused loss reads it: ``weight (V, H)``, ``bias (V,)`` or None,
    and ``softcap`` (``config.final_logit_softcapping``) or None."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None) -> None:
        self.weight, self.bias, self.softcap = weight, bias, softcap


def _output_layer(model: nn.Module, role: str, *, gather: bool = True) -> _Head:
    """The model's ``lm_head`` weight, bias and final logit softcap, or an error naming what the
    fused path cannot compute. ``gather=False`` leaves a sharded weight as it is (FSDP2's
    ``shape`` is the whole one; ZeRO-3's is ``whole_shape``)."""
    model = _unwrap(model)
    cfg = getattr(model, "config", None)
    for attr, identity in _UNFUSED_CONFIG.items():
        value = getattr(cfg, attr, None) if cfg is not None else None
        if value is not None and value != identity:
            raise ValueError(
                f"{_CAUSAL}: {role}_model{_named(model)} scales its logits by config.{attr}={value!r}, which the "
                f"fused loss does not compute (it computes softcap(lm_head(hidden)) only). Use loss='logits' for "
                "this model (ddk distill --loss logits; DDKConfig(loss='logits'))."
            )
    softcap = getattr(cfg, "final_logit_softcapping", None) if cfg is not None else None
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not softcap > 0):
        raise ValueError(
            f"{_CAUSAL}: {role}_model{_named(model)} config.final_logit_softcapping must be a number > 0 or None; "
            f"got {softcap!r}."
        )
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise TypeError(
            f"{_CAUSAL}: {role}_model must have an output embedding (lm_head, from get_output_embeddings()); "
            f"got {type(model).__name__} without one. Pass the ...ForCausalLM model, not its bare decoder."
        )
    weight, bias = head.weight, getattr(head, "bias", None)
    if gather:  # a sharded output layer (read outside the model's forward) is gathered whole, once per call
        weight, bias = _whole(weight), None if bias is None else _whole(bias)
    return _Head(weight, bias, None if softcap is None else float(softcap))


def _whole(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole: an FSDP2 ``DTensor`` all-gathered (differentiable), a ZeRO-3 parameter gathered
    (``ddk.zero3.whole_parameter``: differentiable for the student, its gradient
    reduce-scattered by ZeRO-3), any other tensor as it is."""
    return whole_parameter(t) if is_partitioned(t) else full_tensor(t)


def _vocab(model: nn.Module, role: str) -> int:
    """Rows ``V`` of the model's output layer (checked as :func:`_output_layer` does; nothing gathered)."""
    return int(whole_shape(_output_layer(model, role, gather=False).weight)[0])


def _release(model: nn.Module | None) -> None:
    """Free the parameters a frozen FSDP2-sharded model (the teacher) gathered for this call: its
    own group (embeddings, final norm, output layer) stays gathered after its forward until here."""
    if model is not None and is_fsdp_root(model) and not any(p.requires_grad for p in model.parameters()):
        model.reshard()  # type: ignore[operator]


def _model_logits(
    model: nn.Module, role: str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """``model(input_ids=..., attention_mask=...).logits``, checked to be ``(B, L, V)``."""
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    logits = getattr(out, "logits", None)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise TypeError(
            f"{_CAUSAL}: {role}_model must return .logits of shape (B, L, V) with (B, L)={tuple(input_ids.shape)}; "
            f"got {type(model).__name__} returning {got_str(logits) if logits is not None else type(out).__name__}."
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
        got = f"{got_str(input_ids)} {input_ids.dtype}" if isinstance(input_ids, torch.Tensor) else got_str(input_ids)
        raise ValueError(f"{_CAUSAL}: batch['input_ids'] must be a (B, L) integer tensor; got {got}.")
    attention_mask = batch.get("attention_mask")
    if attention_mask is not None and (
        not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape
    ):
        raise ValueError(
            f"{_CAUSAL}: batch['attention_mask'] must have the shape of input_ids {shape_str(input_ids)}; "
            f"got {got_str(attention_mask)}."
        )
    labels = batch.get("labels")
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, ignore_index)
    if not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape:
        raise ValueError(
            f"{_CAUSAL}: batch['labels'] must have the shape of input_ids {shape_str(input_ids)} (unshifted: the "
            f"shift happens inside); got {got_str(labels)}."
        )
    if "domain_ids" in batch:
        raise ValueError(
            f"{_CAUSAL}: batch must not carry 'domain_ids'; pass domain_ids= (with num_domains=) as keywords, "
            f"e.g. domain_ids=batch.pop('domain_ids'); got batch keys {sorted(batch)}."
        )
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
      ``(B * L, V)`` logits of either model exist. Logits ``softcap(lm_head(hidden))``: an
      ``lm_head`` bias (Phi) and ``config.final_logit_softcapping`` (Gemma2) on either model are
      computed inside the fused tiles; a logit scale (``config.logit_scale``,
      ``config.logits_scaling``) is refused, naming ``loss="logits"``.
    * ``loss="logits"``: calls ``model(input_ids=..., attention_mask=...).logits`` of both models
      and :func:`ddk.kd_loss` with ``shift=True``; the same numbers, for any model with ``.logits``
      (scaled heads too), at the memory of two ``(B, L, V)`` logits.

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
            the transformers convention, unshifted); a cached teacher
            (``ddk.data.TeacherCacheCollator``): ``teacher_topk_ids (B, L, k)``,
            ``teacher_topk_logprobs (B, L, k)`` and optionally ``teacher_tail (B, L)``. Not
            ``domain_ids``: the collators' ``batch["domain_ids"]`` is passed as the keyword.
        domain_ids: ``(B,)`` (one domain per sequence, expanded to its tokens) or ``(B, L)`` (per
            token: the domain of the label token counts) int64 in ``[0, num_domains)``. None puts
            every token in domain 0.
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
        ValueError: labels or domain ids of another shape, a batch carrying ``domain_ids``, a teacher
            vocabulary smaller than the student's, ``gamma > 0`` without a teacher, bad options.

    Examples:
        >>> import torch, transformers
        >>> from ddk.losses.causal_lm import causal_lm_kd_loss
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
        vocab = _vocab(student_model, "student")
        if teacher_model is not None:
            _check_teacher_vocab(vocab, _vocab(teacher_model, "teacher"))
        validate(vocab)
        hs = _decoder_hidden(student_model, input_ids, attention_mask)
        s_head = _output_layer(student_model, "student")  # after the forward (FSDP2 gathers it there)
        s_weight = s_head.weight
        if autocast_dtype(hs.device) is None and s_weight.dtype != hs.dtype:
            hs = hs.to(s_weight.dtype)  # (under autocast fused_linear_kd_loss casts both to its dtype)
        if teacher_model is not None:
            with torch.no_grad():
                ht = _decoder_hidden(teacher_model, input_ids, attention_mask)
                t_head = _output_layer(teacher_model, "teacher")
            t_weight = t_head.weight
            if autocast_dtype(ht.device) is None and t_weight.dtype != ht.dtype:
                ht = ht.to(t_weight.dtype)
        else:
            # No teacher: the fused kernels need one, so the student's own detached hidden states
            # and weight stand in with gamma 0. Its divergence to itself is computed (one extra
            # lm_head-sized matmul per tile) and never enters the loss or its gradients; the
            # reported divergence sums are set to 0 below.
            ht, t_weight = hs.detach(), s_weight.detach()
            t_head = _Head(t_weight, None if s_head.bias is None else s_head.bias.detach(), s_head.softcap)
        out = fused_linear_kd_loss(
            hs,
            s_weight,
            labels,
            teacher_hidden=ht,
            teacher_weight=t_weight,
            student_bias=s_head.bias,
            teacher_bias=t_head.bias,
            student_softcap=s_head.softcap,
            teacher_softcap=t_head.softcap,
            **common,
        )
        del t_head, t_weight
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
    _release(teacher_model)
    _release(student_model)  # a frozen model scored alone (a teacher's validation CE)
    if teacher_model is None:
        out = dataclasses.replace(
            out, kd_sum=torch.zeros_like(out.kd_sum), domain_kd_sum=torch.zeros_like(out.domain_kd_sum)
        )
    return out


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
    ignore_index = opts.get("ignore_index", -100)
    opts = {k: v for k, v in opts.items() if k != "strategy"}  # the sparse fused loss has one strategy
    input_ids, attention_mask, labels, domain_ids = _read_batch(batch, domain_ids, ignore_index)
    ids, logprobs, tail = (None if t is None else t.to(input_ids.device) for t in cached)
    assert ids is not None and logprobs is not None
    common: dict[str, Any] = dict(
        teacher_tail=tail, domain_ids=domain_ids, num_domains=num_domains, normalizer=normalizer, shift=True, **opts
    )
    if loss == "fused":
        head = _output_layer(student_model, "student")
        hs = _decoder_hidden(student_model, input_ids, attention_mask)
        if autocast_dtype(hs.device) is None and head.weight.dtype != hs.dtype:
            hs = hs.to(head.weight.dtype)
        return fused_linear_sparse_kd_loss(
            hs, head.weight, ids, logprobs, labels, student_bias=head.bias, student_softcap=head.softcap, **common
        )
    zs = _model_logits(student_model, "student", input_ids, attention_mask)
    common.pop("workspace_bytes", None)
    return sparse_kd_loss(zs, ids, logprobs, labels, **common)
