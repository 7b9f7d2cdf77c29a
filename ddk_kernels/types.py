"""Parameter and result types shared by every backend of the KD loss.

Options travel as frozen dataclasses from the public functions through ``ddk_kernels.dispatch``
to the launchers and autograd Functions (parameters travel as objects):

* :class:`KDConfig`: what one row needs (temperature, divergence, beta, ignore_index);
* :class:`KDLossParams`: the whole loss (a ``KDConfig`` plus gamma, ``T**2`` scaling and the
  normaliser), turned into a scalar by ``ddk_kernels.reduce``;
* :class:`TeacherInputs`: the teacher side of the fused ``lm_head`` op (and :func:`softcap_`,
  :func:`softcap_grad` of a final logit softcap);
* :class:`SparseTeacher`: a cached top-k teacher (ids, log-probabilities, tail mass);
* :class:`RowKernels`: what a backend of the per-row op provides.

Examples:
    >>> params = KDLossParams(KDConfig(temperature=2.0, divergence="jsd", beta=0.0), gamma=0.5, t2_scale=True)
    >>> params.config.effective_divergence, params.config.code, params.kd_weight
    ('forward_kl', 0, 2.0)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
DIVERGENCES: tuple[Divergence, ...] = ("forward_kl", "reverse_kl", "jsd")
#: integer code of each divergence in the compiled ops ``ddk::kd_fwd`` / ``kd_bwd`` and the Triton kernels.
DIVERGENCE_CODES: dict[Divergence, int] = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}
#: input dtypes every backend accepts.
FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class KDConfig:
    """Per-row options of the KD loss, validated once by the public function.

    Attributes:
        temperature: ``T`` of the divergence; the CE term always uses ``T = 1``.
        divergence: ``"forward_kl"`` = KL(p_T || p_S), ``"reverse_kl"`` = KL(p_S || p_T),
            ``"jsd"`` = ``beta * KL(p_T || m) + (1 - beta) * KL(p_S || m)`` with
            ``m = beta * p_T + (1 - beta) * p_S``; ``beta = 0`` is forward KL and ``beta = 1``
            reverse KL exactly.
        beta: JSD mixing weight in ``[0, 1]`` (ignored by the KL divergences).
        ignore_index: label value of tokens that contribute nothing.
    """

    temperature: float = 1.0
    divergence: Divergence = "forward_kl"
    beta: float = 0.5
    ignore_index: int = -100

    @property
    def effective_divergence(self) -> Divergence:
        """The divergence actually computed: JSD at beta 0 / 1 is forward / reverse KL."""
        if self.divergence == "jsd":
            if self.beta == 0.0:
                return "forward_kl"
            if self.beta == 1.0:
                return "reverse_kl"
        return self.divergence

    @property
    def code(self) -> int:
        """Integer code of ``effective_divergence`` in the compiled and Triton kernels."""
        return DIVERGENCE_CODES[self.effective_divergence]


@dataclass(frozen=True)
class KDLossParams:
    """Options of the whole loss: ``(sum CE + gamma * s * sum KD) / normalizer``.

    Attributes:
        config: the per-row options.
        gamma: weight of the divergence (>= 0).
        t2_scale: ``s = T**2`` when True, else 1.
        normalizer: denominator of the loss; None means the number of valid tokens (at least 1).
            A number or a 0-dim tensor (e.g. a token count summed over ranks).
    """

    config: KDConfig = KDConfig()
    gamma: float = 0.2
    t2_scale: bool = False
    normalizer: float | torch.Tensor | None = None

    @property
    def kd_scale(self) -> float:
        """``s``: ``T**2`` with ``t2_scale``, else 1."""
        return float(self.config.temperature) ** 2 if self.t2_scale else 1.0

    @property
    def kd_weight(self) -> float:
        """``gamma * s``, the factor of the divergence sum in the loss."""
        return float(self.gamma) * self.kd_scale


@dataclass(frozen=True)
class TeacherInputs:
    """The teacher of the fused ``lm_head`` op: ``hidden (N, Ht)`` with ``weight (Vt, Ht)`` (and
    optionally ``bias (Vt,)`` and a final logit ``softcap``), or ``logits (N, Vt)``; ``Vt >= V``
    (rows or columns beyond V are never read). Never differentiated.

    ``softcap`` ``c`` maps the teacher's logits ``z = h W^T (+ b)`` to ``c * tanh(z / c)`` (Gemma2's
    ``final_logit_softcapping``); given ``logits`` are final and take no softcap."""

    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    softcap: float | None = None

    def detached(self) -> TeacherInputs:
        """The same tensors, detached from autograd."""

        def d(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach()

        return TeacherInputs(d(self.hidden), d(self.weight), d(self.logits), d(self.bias), self.softcap)


def softcap_(z: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap * tanh(z / cap)`` in place (``z`` itself when ``cap`` is None); returns ``z``."""
    if cap is None:
        return z
    return z.div_(cap).tanh_().mul_(cap)


def softcap_grad(capped: torch.Tensor, cap: float) -> torch.Tensor:
    """``d capped / d z = 1 - tanh(z / cap)**2``, a new tensor from the capped logits (as autograd's
    ``tanh`` backward forms it from its output)."""
    t = capped / cap
    return t.mul_(t).neg_().add_(1.0)


@dataclass(frozen=True)
class SparseTeacher:
    """A cached top-k teacher for the sparse KD loss (``ddk_kernels.sparse``).

    Attributes:
        ids: ``(N, k)`` int32/int64 token ids of the teacher's k most likely tokens per row, distinct
            within a row, in ``[0, V)``.
        logprobs: ``(N, k)`` float16/float32/float64 teacher log-probabilities of those ids at the
            temperature T of the divergence.
        tail: ``(N,)`` teacher probability mass outside ``ids``, or None for ``1 - sum(exp(logprobs))``.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail: torch.Tensor | None = None


@dataclass(frozen=True)
class KDLossOutput:
    """What every KD loss entry point returns.

    Attributes:
        loss: scalar, differentiable: ``(ce_sum + gamma * s * kd_sum) / normalizer`` where
            ``s = T**2`` if ``t2_scale`` else 1 and ``normalizer`` defaults to ``num_tokens``
            (at least 1, so an all-ignored batch gives 0). float32 (float64 for float64 inputs).
        ce_sum: scalar, detached: sum over valid tokens of the student's CE at ``T = 1``.
        kd_sum: scalar, detached: sum over valid tokens of the divergence at ``T``
            (without the ``T**2`` factor).
        num_tokens: scalar int64: number of valid (non-ignored) tokens.
        domain_ce_sum: ``(D,)`` detached per-domain sums of the CE.
        domain_kd_sum: ``(D,)`` detached per-domain sums of the divergence.
        domain_tokens: ``(D,)`` int64 per-domain valid-token counts.
    """

    loss: torch.Tensor
    ce_sum: torch.Tensor
    kd_sum: torch.Tensor
    num_tokens: torch.Tensor
    domain_ce_sum: torch.Tensor
    domain_kd_sum: torch.Tensor
    domain_tokens: torch.Tensor


RowLosses = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, KDConfig], "tuple[torch.Tensor, torch.Tensor]"]
RowForward = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, KDConfig], "tuple[torch.Tensor, torch.Tensor, torch.Tensor]"
]
RowBackward = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, KDConfig], torch.Tensor
]


@dataclass(frozen=True)
class RowKernels:
    """One backend of the per-row op ``kd_rows`` (see ``ddk_kernels.dispatch``).

    Attributes:
        row_losses: ``(student (N, V), teacher (N, V), labels (N,), config) -> (ce (N,), kd (N,))``,
            differentiable w.r.t. ``student``; float32 results (float64 for float64 inputs), zero
            on ignored rows; ``teacher`` may be a column slice of a wider tensor.
        forward: the launcher without autograd: ``-> (ce, kd, stats)``; ``stats`` is whatever
            the backend's ``backward`` needs (``(N, 4)`` float64 row statistics for the kernels).
        backward: ``(student, teacher, labels, stats, grad_ce (N,), grad_kd (N,), config) ->
            (N, V)`` gradient of ``sum(grad_ce * ce + grad_kd * kd)`` w.r.t. ``student``, in its dtype.
    """

    row_losses: RowLosses
    forward: RowForward
    backward: RowBackward


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the KD math for inputs of ``dtype``: float64 for float64, else float32.

    Examples:
        >>> acc_dtype(torch.bfloat16), acc_dtype(torch.float64)
        (torch.float32, torch.float64)
    """
    return torch.float64 if dtype == torch.float64 else torch.float32
