"""Public KD loss on logits: ``kd_loss`` and its ``nn.Module`` wrapper ``KDLoss``."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ddk_kernels.dispatch import get_row_losses
from ddk_kernels.reduce import reduce_kd_rows
from ddk_kernels.types import DIVERGENCES, KDConfig, KDLossOutput

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def validate_kd_options(
    fn: str,
    *,
    gamma: float,
    temperature: float,
    divergence: str,
    beta: float,
    num_domains: int | None,
    normalizer: float | torch.Tensor | None,
) -> None:
    """Check the scalar options shared by ``kd_loss`` and ``fused_linear_kd_loss``."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"{fn}: divergence must be one of {DIVERGENCES}; got {divergence!r}.")
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"{fn}: gamma must be a finite number >= 0; got {gamma!r}.")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{fn}: temperature must be a finite number > 0; got {temperature!r}.")
    if not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):
        raise ValueError(f"{fn}: beta must be in [0, 1]; got {beta!r}.")
    if num_domains is not None and (not isinstance(num_domains, int) or isinstance(num_domains, bool) or num_domains < 1):
        raise ValueError(f"{fn}: num_domains must be an int >= 1; got {num_domains!r}.")
    if normalizer is not None and not isinstance(normalizer, torch.Tensor):
        if not (isinstance(normalizer, (int, float)) and normalizer > 0):
            raise ValueError(f"{fn}: normalizer must be > 0 (e.g. the token count of the whole accumulated batch); got {normalizer!r}.")


def validate_labels_domains(
    fn: str,
    n: int,
    vocab: int,
    labels: torch.Tensor,
    domain_ids: torch.Tensor | None,
    num_domains: int | None,
    ignore_index: int,
    device: torch.device,
    check_values: bool = True,
) -> int:
    """Check labels and domain ids against N, V and D; return D.

    Shapes, dtypes and devices are always checked; the values (label and domain-id ranges)
    only when ``check_values`` (one min/max reduction per tensor and one host sync in all).
    """
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != n:
        got = _shape(labels) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"{fn}: labels must be a 1-D tensor of length N={n}; got {got}.")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{fn}: labels must be int64 or int32; got {labels.dtype}.")
    if labels.device != device:
        raise ValueError(f"{fn}: labels must be on {device}; got {labels.device}.")
    if domain_ids is None:
        if num_domains not in (None, 1):
            raise ValueError(f"{fn}: num_domains={num_domains} needs domain_ids; got domain_ids=None.")
        if check_values and n:
            _check_ranges(fn, vocab, labels, None, 1, ignore_index)
        return 1
    if not isinstance(domain_ids, torch.Tensor) or domain_ids.dim() != 1 or domain_ids.shape[0] != n:
        got = _shape(domain_ids) if isinstance(domain_ids, torch.Tensor) else type(domain_ids).__name__
        raise ValueError(f"{fn}: domain_ids must be a 1-D tensor of length N={n}; got {got}.")
    if domain_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{fn}: domain_ids must be int64 or int32; got {domain_ids.dtype}.")
    if domain_ids.device != device:
        raise ValueError(f"{fn}: domain_ids must be on {device}; got {domain_ids.device}.")
    if num_domains is None:
        raise ValueError(f"{fn}: num_domains must be given with domain_ids (the length of the per-domain sums); got None.")
    if check_values and n:
        _check_ranges(fn, vocab, labels, domain_ids, num_domains, ignore_index)
    return num_domains


def _check_ranges(
    fn: str, vocab: int, labels: torch.Tensor, domain_ids: torch.Tensor | None, num_domains: int, ignore_index: int
) -> None:
    """Label and domain-id ranges with one min/max reduction each and a single host sync.

    Ignored labels are replaced by 0 before the reduction, so ``ignore_index`` may lie anywhere.
    The slow search for the first offending value runs only when a range is violated.
    """
    lab = labels.masked_fill(labels == ignore_index, 0)
    parts = list(torch.aminmax(lab))
    if domain_ids is not None:
        parts += list(torch.aminmax(domain_ids.to(lab.dtype)))
    bounds = torch.stack(parts).tolist()  # the one host sync
    if bounds[0] < 0 or bounds[1] >= vocab:
        first = int(lab[(lab < 0) | (lab >= vocab)][0])
        raise ValueError(
            f"{fn}: labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; got {first}. "
            "Labels come from the student's tokenizer: check that teacher, student and data share it."
        )
    if domain_ids is not None and (bounds[2] < 0 or bounds[3] >= num_domains):
        bad_id = int(domain_ids[(domain_ids < 0) | (domain_ids >= num_domains)][0])
        raise ValueError(f"{fn}: domain_ids must be in [0, {num_domains}); got {bad_id}.")


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
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
) -> KDLossOutput:
    """DDK's distillation objective on given logits: ``CE(student, labels) + gamma * D(p_T, p_S)``.

    The divergence ``D`` is taken between ``p_T = softmax(teacher_logits / T)`` and
    ``p_S = softmax(student_logits / T)``: ``"forward_kl"`` is KL(p_T || p_S) (the default, as
    ``F.kl_div(log_softmax(zS/T), softmax(zT/T))``), ``"reverse_kl"`` is KL(p_S || p_T), ``"jsd"``
    is ``beta * KL(p_T || m) + (1 - beta) * KL(p_S || m)`` with ``m = beta p_T + (1 - beta) p_S``
    (``beta = 0``: forward KL, ``beta = 1``: reverse KL). The CE term always uses temperature 1.

    Args:
        student_logits: ``(N, V)`` float32/bfloat16/float16/float64, requires grad as needed.
        teacher_logits: ``(N, Vt)`` same device, ``Vt >= V``; extra teacher columns (padding
            rows of a larger embedding) are sliced off. Never differentiated.
        labels: ``(N,)`` int64 in ``[0, V)`` or ``ignore_index``.
        domain_ids: ``(N,)`` int64 in ``[0, num_domains)``; None puts every token in domain 0.
        num_domains: D, required with ``domain_ids``.
        gamma: weight of the divergence (paper default 0.2).
        temperature: T of the divergence (paper default 1.0).
        divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``.
        beta: JSD weight in ``[0, 1]``.
        ignore_index: label of tokens that contribute nothing.
        t2_scale: multiply the divergence by ``T**2`` in the loss.
        normalizer: denominator of the loss instead of this batch's valid-token count (for
            gradient accumulation or multi-rank sums: pass the global token count).
        backend: ``"auto"``, ``"reference"``, ``"chunked"``, ``"cpp"`` or ``"triton"``.
        check_inputs: check label and domain-id ranges (one min/max reduction each, one host sync).
            Default: on for CPU tensors, off on accelerators so the training step never waits on the
            host (pass True to check there too: unchecked out-of-range labels give a NaN loss on
            Triton, which ``ddk.reliability.NonFiniteGuard`` catches, or a device-side error).

    Returns:
        ``KDLossOutput``: differentiable scalar ``loss`` (float32; float64 for float64 inputs)
        and detached sums, counts and ``(D,)`` per-domain sums.

    Example:
        >>> import torch, ddk
        >>> zs = torch.randn(6, 11, requires_grad=True)
        >>> zt = torch.randn(6, 11)
        >>> labels = torch.tensor([1, 2, 3, -100, 4, 5])
        >>> out = ddk.kd_loss(zs, zt, labels, domain_ids=torch.tensor([0, 1, 1, 0, 2, 2]), num_domains=3)
        >>> out.loss.backward()
        >>> out.domain_tokens.tolist()
        [1, 2, 2]
    """
    fn = "kd_loss"
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor; got {type(t).__name__}.")
        if t.dim() != 2 or t.dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"{fn}: {name} must be a 2-D float tensor (N, V); got shape {_shape(t)} and dtype {t.dtype}."
            )
    n, vocab = student_logits.shape
    if teacher_logits.shape[0] != n:
        raise ValueError(
            f"{fn}: teacher_logits must have N={n} rows like student_logits; got shape {_shape(teacher_logits)}."
        )
    if teacher_logits.shape[1] < vocab:
        raise ValueError(
            f"{fn}: teacher_logits must have at least the student's V={vocab} columns (a larger teacher "
            f"vocabulary is sliced); got {teacher_logits.shape[1]}. Teacher and student must share a tokenizer."
        )
    if vocab == 0:
        raise ValueError(f"{fn}: student_logits must have V >= 1 columns; got shape {_shape(student_logits)}.")
    if teacher_logits.device != student_logits.device:
        raise ValueError(
            f"{fn}: teacher_logits must be on the student's device {student_logits.device}; got {teacher_logits.device}."
        )
    validate_kd_options(
        fn, gamma=gamma, temperature=temperature, divergence=divergence, beta=beta,
        num_domains=num_domains, normalizer=normalizer,
    )
    if check_inputs is None:
        check_inputs = student_logits.device.type == "cpu"
    d = validate_labels_domains(
        fn, n, vocab, labels, domain_ids, num_domains, ignore_index, student_logits.device, check_inputs
    )
    labels = labels.long()
    config = KDConfig(temperature=float(temperature), divergence=divergence, beta=float(beta), ignore_index=ignore_index)
    row_losses = get_row_losses(backend, student_logits.device)
    teacher = teacher_logits[:, :vocab].detach()
    if teacher.stride(-1) != 1:
        teacher = teacher.contiguous()
    if student_logits.stride(-1) != 1:
        student_logits = student_logits.contiguous()
    ce, kd = row_losses(student_logits, teacher, labels, config)
    return reduce_kd_rows(
        ce,
        kd,
        labels != ignore_index,
        domain_ids,
        d,
        float(gamma),
        float(temperature) ** 2 if t2_scale else 1.0,
        normalizer,
    )


class KDLossConfigModule(nn.Module):
    """Base of the loss modules: holds and validates the options shared by every KD loss.

    Subclasses add their own options and implement ``forward``; ``options()`` gives the keyword
    arguments of the loss function (without tensors and without ``num_domains``).
    """

    def __init__(
        self,
        *,
        num_domains: int | None = None,
        gamma: float = 0.2,
        temperature: float = 1.0,
        divergence: str = "forward_kl",
        beta: float = 0.5,
        ignore_index: int = -100,
        t2_scale: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        validate_kd_options(
            type(self).__name__, gamma=gamma, temperature=temperature, divergence=divergence, beta=beta,
            num_domains=num_domains, normalizer=None,
        )
        self.num_domains = num_domains
        self.gamma = gamma
        self.temperature = temperature
        self.divergence = divergence
        self.beta = beta
        self.ignore_index = ignore_index
        self.t2_scale = t2_scale
        self.backend = backend

    def options(self) -> dict[str, Any]:
        """The keyword options of the loss function (without tensors and ``num_domains``)."""
        return dict(
            gamma=self.gamma, temperature=self.temperature, divergence=self.divergence, beta=self.beta,
            ignore_index=self.ignore_index, t2_scale=self.t2_scale, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options().items())


class KDLoss(KDLossConfigModule):
    """``nn.Module`` wrapper of :func:`kd_loss` holding only its configuration.

    ``forward(student_logits (N, V), teacher_logits (N, Vt), labels (N,), domain_ids=None,
    normalizer=None) -> KDLossOutput``.
    """

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor,
        domain_ids: torch.Tensor | None = None,
        normalizer: float | torch.Tensor | None = None,
    ) -> KDLossOutput:
        return kd_loss(
            student_logits, teacher_logits, labels,
            domain_ids=domain_ids,
            num_domains=self.num_domains if domain_ids is not None else None,
            normalizer=normalizer, **self.options(),
        )
