"""Public KD loss on logits: ``kd_loss`` and its ``nn.Module`` wrapper ``KDLoss``, and the batch
convention shared by every DDK loss (:func:`flatten_for_loss`): rows ``(N, ...)`` or Hugging Face
style batches ``(B, L, ...)`` with unshifted ``(B, L)`` labels and domain ids ``(B,)`` / ``(B, L)``."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from ddk_kernels.dispatch import resolve
from ddk_kernels.reduce import reduce_kd_rows
from ddk_kernels.types import DIVERGENCES, FLOAT_DTYPES, Divergence, KDConfig, KDLossOutput, KDLossParams

_Choice = TypeVar("_Choice", bound=str)


def one_of(fn: str, arg: str, value: object, choices: tuple[_Choice, ...]) -> _Choice:
    """``value`` as the one of ``choices`` it equals (so typed as their ``Literal``), or a ValueError."""
    for choice in choices:
        if value == choice:
            return choice
    raise ValueError(f"{fn}: {arg} must be one of {choices}; got {value!r}.")


def shape_str(t: torch.Tensor) -> str:
    """The shape of a tensor as error messages print it: ``(2, 3)``."""
    return str(tuple(t.shape))


def got_str(t: Any) -> str:
    """The shape of a tensor, else the type name of what was passed instead (for error messages)."""
    return shape_str(t) if isinstance(t, torch.Tensor) else type(t).__name__


_LABELS_SHAPES = "labels must be (N,), or (B, L) with 3-D inputs"
_DOMAIN_SHAPES = "domain_ids must be (N,), or (B,) / (B, L) with 3-D inputs"


def flatten_labels_domains(
    labels: torch.Tensor,
    domain_ids: torch.Tensor | None,
    batch_shape: tuple[int, int],
    *,
    shift: bool = False,
    ignore_index: int = -100,
    fn: str = "flatten_labels_domains",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The label half of :func:`flatten_for_loss`: ``(B, L)`` labels and domain ids to ``(B * L,)`` rows.

    Args:
        labels: ``(B, L)`` integer labels, unshifted (Hugging Face convention).
        domain_ids: ``(B,)`` (one domain per sequence, expanded to its tokens), ``(B, L)`` (per
            token) integer domain ids, or None.
        batch_shape: ``(B, L)``.
        shift: next-token prediction: row ``(b, i)`` gets label ``(b, i + 1)`` (and, per token,
            domain ``(b, i + 1)``, the domain of the label token); the last row of each sequence
            gets ``ignore_index``.
        ignore_index: label of the rows that contribute nothing.
        fn: function name of the error messages.

    Returns:
        ``(labels (B * L,), domain_ids (B * L,) or None)`` in the input dtypes.

    Raises:
        ValueError: ``labels`` is not ``(B, L)`` or ``domain_ids`` neither ``(B,)`` nor ``(B, L)``.

    Examples:
        >>> import torch
        >>> from ddk.losses.kd import flatten_labels_domains
        >>> y, d = flatten_labels_domains(torch.tensor([[5, 6, 7]]), torch.tensor([2]), (1, 3), shift=True)
        >>> y.tolist(), d.tolist()
        ([6, 7, -100], [2, 2, 2])
    """
    b, seq = batch_shape
    where = f" with (B, L)=({b}, {seq})."
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (b, seq):
        raise ValueError(f"{fn}: {_LABELS_SHAPES}; got {got_str(labels)}{where}")
    if domain_ids is not None:
        if not isinstance(domain_ids, torch.Tensor) or tuple(domain_ids.shape) not in ((b,), (b, seq)):
            raise ValueError(f"{fn}: {_DOMAIN_SHAPES}; got {got_str(domain_ids)}{where}")
        if domain_ids.dim() == 1:
            domain_ids = domain_ids[:, None].expand(b, seq)
        elif shift:
            # the domain of the label token; the last column's rows are ignored (any valid id will do)
            domain_ids = domain_ids.roll(-1, dims=1)
        domain_ids = domain_ids.reshape(b * seq)
    if shift and seq > 0:
        labels = torch.cat([labels[:, 1:], labels.new_full((b, 1), ignore_index)], dim=1)
    return labels.reshape(b * seq), domain_ids


def flatten_for_loss(
    inputs: Sequence[torch.Tensor | None],
    labels: torch.Tensor,
    domain_ids: torch.Tensor | None = None,
    *,
    shift: bool = False,
    ignore_index: int = -100,
    names: Sequence[str] | None = None,
    fn: str = "flatten_for_loss",
) -> tuple[tuple[Any, ...], torch.Tensor, torch.Tensor | None]:
    """The batch convention of every DDK loss: ``(B, L, ...)`` per-token tensors to ``(N, ...)`` rows.

    2-D inputs ``(N, X)`` (labels and domain ids ``(N,)``) pass through unchanged. 3-D inputs
    ``(B, L, X)`` (every tensor with the same ``B`` and ``L``; labels ``(B, L)``; domain ids ``(B,)``
    per sequence or ``(B, L)`` per token) become ``N = B * L`` rows: views of the inputs, no copy for
    contiguous ones. With ``shift=True`` (3-D only), position ``i`` predicts label ``i + 1``: the
    shift is applied to the labels (and per-token domain ids: the domain of the label token), and
    the last position of each sequence, which predicts nothing, gets ``ignore_index``. So the
    loss, sums and counts are exactly those over the ``B * (L - 1)`` shifted tokens while the
    inputs are never sliced or copied.

    Args:
        inputs: the per-token float tensors, first the one that decides the layout (e.g. student
            logits ``(N, V)`` / ``(B, L, V)``); None and non-tensors pass through.
        labels: ``(N,)`` or ``(B, L)`` integer labels, unshifted.
        domain_ids: ``(N,)``, or ``(B,)`` / ``(B, L)`` with 3-D inputs; or None.
        shift: next-token shift (3-D inputs only).
        ignore_index: label of the rows that contribute nothing.
        names: argument names of ``inputs`` for the error messages.
        fn: function name of the error messages.

    Returns:
        ``(inputs as (N, X) rows, labels (N,), domain_ids (N,) or None)``; labels and domain ids
        keep their dtypes (checked by the losses).

    Raises:
        ValueError: shapes that do not fit the convention (each message names the accepted shapes
            and the actual one), or ``shift=True`` with 2-D inputs.

    Examples:
        >>> import torch
        >>> from ddk.losses.kd import flatten_for_loss
        >>> (rows,), y, d = flatten_for_loss([torch.zeros(2, 3, 5)], torch.tensor([[1, 2, 3], [4, 5, 6]]),
        ...                                   torch.tensor([0, 1]), shift=True)
        >>> tuple(rows.shape), y.tolist(), d.tolist()
        ((6, 5), [2, 3, -100, 5, 6, -100], [0, 0, 0, 1, 1, 1])
    """
    names = tuple(names) if names is not None else tuple(f"inputs[{i}]" for i in range(len(inputs)))
    first = inputs[0]
    if not isinstance(first, torch.Tensor) or first.dim() != 3:
        if shift and isinstance(first, torch.Tensor):
            raise ValueError(
                f"{fn}: shift=True needs 3-D inputs ({names[0]} (B, L, ...) and labels (B, L)) to shift within "
                f"each sequence; got {names[0]} of shape {shape_str(first)}. Pass (B, L, ...) inputs, or shift the "
                "labels yourself and keep shift=False."
            )
        return tuple(inputs), labels, domain_ids
    b, seq = first.shape[0], first.shape[1]
    for name, t in zip(names[1:], inputs[1:]):
        if isinstance(t, torch.Tensor) and (t.dim() != 3 or tuple(t.shape[:2]) != (b, seq)):
            raise ValueError(
                f"{fn}: {name} must be 3-D (B, L, ...) like {names[0]}; got {shape_str(t)} with (B, L)=({b}, {seq})."
            )
    labels, domain_ids = flatten_labels_domains(
        labels, domain_ids, (b, seq), shift=shift, ignore_index=ignore_index, fn=fn
    )
    rows = tuple(t.reshape(b * seq, t.shape[2]) if isinstance(t, torch.Tensor) else t for t in inputs)
    return rows, labels, domain_ids


def check_softcap(fn: str, name: str, value: object) -> float | None:
    """``value`` as a float when it is a final logit softcap (a finite number > 0), None for None;
    else ``ValueError`` naming ``name``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{fn}: {name} must be a finite number > 0 (logits c * tanh(z / c)) or None; got {value!r}.")
    return float(value)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype ``torch.autocast`` casts matmul inputs to on ``device``, None when it is off there."""
    try:
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
    except (RuntimeError, TypeError, AttributeError):  # a device type autocast does not know
        return None
    return None


@contextlib.contextmanager
def autocast_off(device: torch.device) -> Iterator[None]:
    """Disable autocast on ``device`` inside the loss: its kernels choose their own precision."""
    if autocast_dtype(device) is None:
        yield
        return
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def validate_kd_options(
    fn: str,
    *,
    gamma: float,
    temperature: float,
    divergence: str,
    beta: float,
    num_domains: int | None,
    normalizer: float | torch.Tensor | None,
) -> Divergence:
    """Check the scalar options shared by ``kd_loss`` and ``fused_linear_kd_loss``; return
    ``divergence`` as a ``Divergence``."""
    checked = one_of(fn, "divergence", divergence, DIVERGENCES)
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"{fn}: gamma must be a finite number >= 0; got {gamma!r}.")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{fn}: temperature must be a finite number > 0; got {temperature!r}.")
    if not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):
        raise ValueError(f"{fn}: beta must be in [0, 1]; got {beta!r}.")
    if num_domains is not None and (
        not isinstance(num_domains, int) or isinstance(num_domains, bool) or num_domains < 1
    ):
        raise ValueError(f"{fn}: num_domains must be an int >= 1; got {num_domains!r}.")
    if normalizer is not None:
        validate_normalizer(fn, normalizer)
    return checked


def loss_params(
    fn: str,
    *,
    gamma: float,
    temperature: float,
    divergence: str,
    beta: float,
    num_domains: int | None,
    normalizer: float | torch.Tensor | None,
    ignore_index: int,
    t2_scale: bool,
) -> KDLossParams:
    """The scalar options of every public loss, checked (``validate_kd_options``), as ``KDLossParams``."""
    kind = validate_kd_options(
        fn,
        gamma=gamma,
        temperature=temperature,
        divergence=divergence,
        beta=beta,
        num_domains=num_domains,
        normalizer=normalizer,
    )
    config = KDConfig(temperature=float(temperature), divergence=kind, beta=float(beta), ignore_index=ignore_index)
    return KDLossParams(config, gamma=float(gamma), t2_scale=bool(t2_scale), normalizer=normalizer)


def validate_normalizer(fn: str, normalizer: float | torch.Tensor) -> None:
    """``normalizer`` must be one finite number > 0: a Python number, or a one-element tensor.

    A tensor's shape is always checked; its value only on the CPU (reading a CUDA tensor's value
    would be a host sync on the hot path; there a bad value gives an inf/NaN loss, which
    ``NonFiniteGuard`` reports).
    """
    hint = "(e.g. the token count of the whole accumulated batch)"
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1 or normalizer.dim() > 1:
            raise ValueError(
                f"{fn}: normalizer must be a scalar {hint}; got a tensor of shape {tuple(normalizer.shape)}."
            )
        if normalizer.dtype == torch.bool or normalizer.is_complex():
            raise TypeError(f"{fn}: normalizer must be a real number {hint}; got dtype {normalizer.dtype}.")
        if normalizer.device.type != "cpu":
            return
        value: float = float(normalizer.detach().reshape(()))
        shown: object = value
    elif isinstance(normalizer, (int, float)) and not isinstance(normalizer, bool):
        value, shown = float(normalizer), normalizer
    else:
        raise TypeError(
            f"{fn}: normalizer must be a number or a one-element tensor {hint}; got {type(normalizer).__name__}."
        )
    if not math.isfinite(value):
        raise ValueError(f"{fn}: normalizer must be finite {hint}; got {shown!r}.")
    if not value > 0:
        raise ValueError(f"{fn}: normalizer must be > 0 {hint}; got {shown!r}.")


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
        raise ValueError(f"{fn}: {_LABELS_SHAPES}; got {got_str(labels)} with N={n}.")
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
        raise ValueError(f"{fn}: {_DOMAIN_SHAPES}; got {got_str(domain_ids)} with N={n}.")
    if domain_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{fn}: domain_ids must be int64 or int32; got {domain_ids.dtype}.")
    if domain_ids.device != device:
        raise ValueError(f"{fn}: domain_ids must be on {device}; got {domain_ids.device}.")
    if num_domains is None:
        raise ValueError(
            f"{fn}: num_domains must be given with domain_ids (the length of the per-domain sums); got None."
        )
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
    shift: bool = False,
) -> KDLossOutput:
    """DDK's distillation objective on given logits: ``CE(student, labels) + gamma * D(p_T, p_S)``.

    The divergence ``D`` is taken between ``p_T = softmax(teacher_logits / T)`` and
    ``p_S = softmax(student_logits / T)``: ``"forward_kl"`` is KL(p_T || p_S) (the default, as
    ``F.kl_div(log_softmax(zS/T), softmax(zT/T))``), ``"reverse_kl"`` is KL(p_S || p_T), ``"jsd"``
    is ``beta * KL(p_T || m) + (1 - beta) * KL(p_S || m)`` with ``m = beta p_T + (1 - beta) p_S``
    (``beta = 0``: forward KL, ``beta = 1``: reverse KL). The CE term always uses temperature 1.

    Inputs are rows ``(N, V)`` or batches ``(B, L, V)`` (see :func:`flatten_for_loss`); with
    ``shift=True`` position ``i`` of a sequence predicts label ``i + 1``, as in a causal LM.
    The row math runs in float32 (float64 for float64 logits) whatever the input dtype; autocast is
    disabled inside the loss, so under ``torch.autocast`` bfloat16 logits are used as they are.

    Args:
        student_logits: ``(N, V)`` or ``(B, L, V)`` float32/bfloat16/float16/float64, requires
            grad as needed.
        teacher_logits: ``(N, Vt)`` or ``(B, L, Vt)`` (the leading dims of ``student_logits``),
            any float dtype, same device, ``Vt >= V``; extra teacher columns (padding rows of a
            larger embedding) are sliced off. Never differentiated.
        labels: ``(N,)`` or ``(B, L)`` int64/int32 in ``[0, V)`` or ``ignore_index``; unshifted
            with ``shift=True``.
        domain_ids: ``(N,)``, or with 3-D inputs ``(B,)`` (one domain per sequence) or ``(B, L)``
            (per token; with ``shift=True`` the domain of the label token counts), int64/int32 in
            ``[0, num_domains)``; None puts every token in domain 0.
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
        shift: next-token shift inside the loss (3-D inputs only): the last position of the
            logits and the first label of every sequence are dropped.

    Returns:
        ``KDLossOutput``: differentiable scalar ``loss`` (float32; float64 for float64 inputs)
        and detached sums, counts and ``(D,)`` per-domain sums over the (shifted) tokens.

    Raises:
        TypeError, ValueError: bad input, named in the message with the expected shape or value.

    Examples:
        >>> import torch, ddk
        >>> zs = torch.randn(2, 4, 11, requires_grad=True)
        >>> zt = torch.randn(2, 4, 13)
        >>> labels = torch.tensor([[1, 2, 3, -100], [4, 5, 6, 7]])
        >>> out = ddk.kd_loss(zs, zt, labels, domain_ids=torch.tensor([0, 2]), num_domains=3, shift=True)
        >>> out.loss.backward()
        >>> out.domain_tokens.tolist()
        [2, 0, 3]
    """
    fn = "kd_loss"
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor; got {type(t).__name__}.")
    if student_logits.dim() not in (2, 3) or student_logits.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{fn}: student_logits must be a 2-D (N, V) or 3-D (B, L, V) float tensor; "
            f"got shape {shape_str(student_logits)} and dtype {student_logits.dtype}."
        )
    if teacher_logits.dim() != student_logits.dim() or teacher_logits.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{fn}: teacher_logits must be a {student_logits.dim()}-D float tensor like student_logits; "
            f"got shape {shape_str(teacher_logits)} and dtype {teacher_logits.dtype}."
        )
    (student_logits, teacher_logits), labels, domain_ids = flatten_for_loss(
        (student_logits, teacher_logits),
        labels,
        domain_ids,
        shift=shift,
        ignore_index=ignore_index,
        names=("student_logits", "teacher_logits"),
        fn=fn,
    )
    n, vocab = student_logits.shape
    if teacher_logits.shape[0] != n:
        raise ValueError(
            f"{fn}: teacher_logits must have N={n} rows like student_logits; got shape {shape_str(teacher_logits)}."
        )
    if teacher_logits.shape[1] < vocab:
        raise ValueError(
            f"{fn}: teacher_logits must have at least the student's V={vocab} columns (a larger teacher "
            f"vocabulary is sliced); got {teacher_logits.shape[1]}. Teacher and student must share a tokenizer."
        )
    if vocab == 0:
        raise ValueError(f"{fn}: student_logits must have V >= 1 columns; got shape {shape_str(student_logits)}.")
    if teacher_logits.device != student_logits.device:
        raise ValueError(
            f"{fn}: teacher_logits must be on the student's device {student_logits.device}; got {teacher_logits.device}."
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
    config = params.config
    if check_inputs is None:
        check_inputs = student_logits.device.type == "cpu"
    d = validate_labels_domains(
        fn, n, vocab, labels, domain_ids, num_domains, ignore_index, student_logits.device, check_inputs
    )
    labels = labels.long()
    rows = resolve("kd_rows", backend, student_logits.device)
    teacher = teacher_logits[:, :vocab].detach()
    if teacher.stride(-1) != 1:
        teacher = teacher.contiguous()
    if student_logits.stride(-1) != 1:
        student_logits = student_logits.contiguous()
    with autocast_off(student_logits.device):
        ce, kd = rows.row_losses(student_logits, teacher, labels, config)
        return reduce_kd_rows(ce, kd, labels != ignore_index, domain_ids, d, params)


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
            type(self).__name__,
            gamma=gamma,
            temperature=temperature,
            divergence=divergence,
            beta=beta,
            num_domains=num_domains,
            normalizer=None,
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
            gamma=self.gamma,
            temperature=self.temperature,
            divergence=self.divergence,
            beta=self.beta,
            ignore_index=self.ignore_index,
            t2_scale=self.t2_scale,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options().items())


class KDLoss(KDLossConfigModule):
    """``nn.Module`` wrapper of :func:`kd_loss` holding only its configuration.

    ``forward(student_logits (N, V) | (B, L, V), teacher_logits (N, Vt) | (B, L, Vt), labels
    (N,) | (B, L), domain_ids=None, normalizer=None, *, shift=False) -> KDLossOutput``.
    """

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor,
        domain_ids: torch.Tensor | None = None,
        normalizer: float | torch.Tensor | None = None,
        *,
        shift: bool = False,
    ) -> KDLossOutput:
        return kd_loss(
            student_logits,
            teacher_logits,
            labels,
            domain_ids=domain_ids,
            num_domains=self.num_domains if domain_ids is not None else None,
            normalizer=normalizer,
            shift=shift,
            **self.options(),
        )
