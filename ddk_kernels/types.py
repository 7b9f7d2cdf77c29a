"""Result and configuration types shared by every backend of the KD loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
DIVERGENCES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd")
#: integer code of each divergence in the compiled ops ``ddk::kd_fwd`` / ``kd_bwd`` and the Triton kernels.
DIVERGENCE_CODES: dict[str, int] = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}


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
    divergence: str = "forward_kl"
    beta: float = 0.5
    ignore_index: int = -100

    @property
    def effective_divergence(self) -> str:
        """The divergence actually computed: JSD at beta 0 / 1 is forward / reverse KL."""
        if self.divergence == "jsd":
            if self.beta == 0.0:
                return "forward_kl"
            if self.beta == 1.0:
                return "reverse_kl"
        return self.divergence


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


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the KD math for inputs of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def divergence_code(config: KDConfig) -> int:
    """Integer code of ``config.effective_divergence`` (JSD at beta 0 / 1 is forward / reverse KL)."""
    return DIVERGENCE_CODES[config.effective_divergence]
