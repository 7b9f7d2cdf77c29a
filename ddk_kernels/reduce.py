"""The formula of the KD loss, in one place: every backend's epilogue (and the oracle) uses it.

``loss = (sum CE + gamma * s * sum KD) / normalizer`` over valid tokens, with ``s = T**2`` when
``t2_scale`` and ``normalizer`` = the number of valid tokens (at least 1) unless given; the
per-domain sums of CE and KD and the per-domain token counts are detached. No host syncs.

Examples:
    >>> import torch
    >>> from ddk_kernels.types import KDLossParams
    >>> ce, kd = torch.tensor([1.0, 2.0, 0.0]), torch.tensor([0.5, 1.5, 0.0])
    >>> valid = torch.tensor([True, True, False])
    >>> out = reduce_kd_rows(ce, kd, valid, torch.tensor([0, 1, 1]), 2, KDLossParams(gamma=0.5))
    >>> float(out.loss), out.domain_ce_sum.tolist(), out.domain_tokens.tolist()
    (2.0, [1.0, 2.0], [1, 1])
"""

from __future__ import annotations

import torch

from ddk_kernels.types import KDLossOutput, KDLossParams


def denominator(params: KDLossParams, num_tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0-dim denominator of the loss in ``dtype``: ``params.normalizer`` or ``max(num_tokens, 1)``."""
    if params.normalizer is None:
        return num_tokens.clamp(min=1).to(dtype)
    if isinstance(params.normalizer, torch.Tensor):  # a 0-dim or one-element tensor
        return params.normalizer.detach().reshape(()).to(device=num_tokens.device, dtype=dtype)
    return torch.tensor(float(params.normalizer), dtype=dtype, device=num_tokens.device)


def combine(ce_sum: torch.Tensor, kd_sum: torch.Tensor, norm: torch.Tensor, params: KDLossParams) -> torch.Tensor:
    """The scalar loss ``(ce_sum + gamma * s * kd_sum) / norm``."""
    return (ce_sum + params.kd_weight * kd_sum) / norm


def gradient_weights(norm: torch.Tensor, params: KDLossParams) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_ce, w_kd) = (1 / norm, gamma * s / norm)``: d loss / d CE and d loss / d KD of every
    valid token (the fused backends fold them into their gradient tiles)."""
    return 1.0 / norm, params.kd_weight / norm


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


def kd_output(
    loss: torch.Tensor,
    ce: torch.Tensor,
    kd: torch.Tensor,
    valid: torch.Tensor,
    domain_ids: torch.Tensor | None,
    num_domains: int,
) -> KDLossOutput:
    """``KDLossOutput`` of a computed ``loss`` and its per-row ``ce``, ``kd`` (``(N,)``, 0 on ignored rows)."""
    d_ce, d_kd, d_tok = domain_sums(ce, kd, valid, domain_ids, num_domains)
    return KDLossOutput(
        loss=loss,
        ce_sum=ce.detach().sum(),
        kd_sum=kd.detach().sum(),
        num_tokens=valid.sum(),
        domain_ce_sum=d_ce,
        domain_kd_sum=d_kd,
        domain_tokens=d_tok,
    )


def reduce_kd_rows(
    ce: torch.Tensor,
    kd: torch.Tensor,
    valid: torch.Tensor,
    domain_ids: torch.Tensor | None,
    num_domains: int,
    params: KDLossParams,
) -> KDLossOutput:
    """Sum per-row losses into the scalar loss and per-domain sums.

    Args:
        ce: ``(N,)`` float32/float64 CE per row, differentiable, 0 on ignored rows.
        kd: ``(N,)`` divergence per row, same dtype, differentiable, 0 on ignored rows.
        valid: ``(N,)`` bool, False on ignored rows.
        domain_ids: ``(N,)`` int64 in ``[0, num_domains)`` or None (one domain).
        num_domains: D.
        params: gamma, ``T**2`` scaling and normaliser.

    Returns:
        ``KDLossOutput`` with ``(D,)`` per-domain sums (index_add, no host sync).
    """
    norm = denominator(params, valid.sum(), ce.dtype)
    loss = combine(ce.sum(), kd.sum(), norm, params)
    return kd_output(loss, ce, kd, valid, domain_ids, num_domains)
