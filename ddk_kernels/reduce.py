"""Turning per-row CE and divergence into ``KDLossOutput`` without host syncs."""

from __future__ import annotations

import torch

from ddk_kernels.types import KDLossOutput


def domain_sums(
    ce: torch.Tensor,
    kd: torch.Tensor,
    valid: torch.Tensor,
    domain_ids: torch.Tensor | None,
    num_domains: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Detached ``(D,)`` per-domain sums of ``ce`` and ``kd`` and int64 valid-token counts.

    ``ce``, ``kd``: ``(N,)``, 0 on ignored rows; ``valid``: ``(N,)`` bool; ``domain_ids``: ``(N,)``
    in ``[0, num_domains)`` or None (every row in domain 0). index_add, no host sync.
    """
    if domain_ids is None:
        domain_ids = torch.zeros(ce.shape[0], dtype=torch.long, device=ce.device)
    domain_ids = domain_ids.long()
    d_ce = torch.zeros(num_domains, dtype=ce.dtype, device=ce.device).index_add_(0, domain_ids, ce.detach())
    d_kd = torch.zeros(num_domains, dtype=kd.dtype, device=kd.device).index_add_(0, domain_ids, kd.detach())
    d_tok = torch.zeros(num_domains, dtype=torch.long, device=ce.device).index_add_(0, domain_ids, valid.long())
    return d_ce, d_kd, d_tok


def reduce_kd_rows(
    ce: torch.Tensor,
    kd: torch.Tensor,
    valid: torch.Tensor,
    domain_ids: torch.Tensor | None,
    num_domains: int,
    gamma: float,
    kd_scale: float,
    normalizer: float | torch.Tensor | None,
) -> KDLossOutput:
    """Sum per-row losses into the scalar loss and per-domain sums.

    Args:
        ce: ``(N,)`` float32/float64 CE per row, differentiable, 0 on ignored rows.
        kd: ``(N,)`` divergence per row, same dtype, differentiable, 0 on ignored rows.
        valid: ``(N,)`` bool, False on ignored rows.
        domain_ids: ``(N,)`` int64 in ``[0, num_domains)`` or None (one domain).
        num_domains: D.
        gamma: weight of the divergence.
        kd_scale: extra factor of the divergence in the loss (``T**2`` or 1).
        normalizer: replaces the valid-token count as denominator when given.

    Returns:
        ``KDLossOutput`` with ``(D,)`` per-domain sums (index_add, no host sync).
    """
    num_tokens = valid.sum()
    if normalizer is None:
        norm = num_tokens.clamp(min=1).to(ce.dtype)
    else:
        norm = torch.as_tensor(normalizer, dtype=ce.dtype, device=ce.device)
    ce_sum = ce.sum()
    kd_sum = kd.sum()
    loss = (ce_sum + (gamma * kd_scale) * kd_sum) / norm
    d_ce, d_kd, d_tok = domain_sums(ce, kd, valid, domain_ids, num_domains)
    return KDLossOutput(
        loss=loss,
        ce_sum=ce_sum.detach(),
        kd_sum=kd_sum.detach(),
        num_tokens=num_tokens,
        domain_ce_sum=d_ce,
        domain_kd_sum=d_kd,
        domain_tokens=d_tok,
    )
