"""``FactorSmoother``: per-domain perplexity ratios -> sampling weights over domains.

Eq. 1 (initial domain discrepancy factor): ``r_0 = softmax(ppl_S / ppl_T)``.
Eq. 2 (factor smooth updating): ``psi_i = r_t[i] * exp(ppl_S[i] / ppl_T[i])``,
``r_{t+1}[i] = alpha * psi_i / sum_j psi_j + (1 - alpha) / D``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ddk.schedule.base import WeightScheduler, check_num_domains, ratio_to_tensor

__all__ = ["SMOOTHER_INITS", "SMOOTHER_MODES", "FactorSmoother", "ratio_to_tensor"]

SMOOTHER_MODES: tuple[str, ...] = ("ddk", "no_smoothing", "uniform")
SMOOTHER_INITS: tuple[str, ...] = ("discrepancy", "uniform")


class FactorSmoother(WeightScheduler):
    """Turns per-domain ratios ``ppl_S / ppl_T`` into domain sampling weights.

    Modes (the paper's ablations):

    * ``"ddk"``: Eq. 2, ``r_{t+1} = alpha * softmax(log r_t + ratio) + (1 - alpha) / D``, computed
      in log space in float64 so huge ratios cannot overflow. After an update every weight lies in
      ``[(1 - alpha) / D, alpha + (1 - alpha) / D]``.
    * ``"no_smoothing"``: ``softmax(ratio)`` at every update (no history, no floor).
    * ``"uniform"``: always ``1 / D``.

    ``initialize`` applies Eq. 1, ``r_0 = softmax(ratio)`` (``1 / D`` when ``init="uniform"`` or
    ``mode="uniform"``).

    Underflow: weights are finite, sum to 1 and are either exactly 0 or normal float64 numbers; a
    weight that underflows to a denormal (below ~2.2e-308, e.g. a softmax over ratios more than
    ~708 apart) is set to 0 and the others are renormalised. A zero-weight domain is not sampled
    (``MixtureSampler`` accepts zeros, but not all zeros, which cannot occur here). In ``"ddk"`` mode
    with ``alpha < 1`` the floor ``(1 - alpha) / D`` keeps every weight positive after the first
    update; with ``alpha = 1`` a weight at 0 stays 0 (``psi`` is proportional to ``r_t``), and in
    ``"no_smoothing"`` mode it returns when the ratios come closer.

    Args:
        num_domains: D >= 1.
        alpha: smoothing weight in ``(0, 1]`` (paper default 0.5); ``alpha = 1`` removes the floor.
        mode: ``"ddk"``, ``"no_smoothing"`` or ``"uniform"``.
        init: ``"discrepancy"`` (Eq. 1) or ``"uniform"`` (the paper's pseudo-code).

    Examples:
        >>> s = FactorSmoother(2, alpha=0.5)
        >>> s.initialize([1.0, 1.0]).tolist()
        [0.5, 0.5]
        >>> [round(w, 4) for w in s.update([1.0, 2.0]).tolist()]
        [0.3845, 0.6155]
    """

    def __init__(
        self,
        num_domains: int,
        *,
        alpha: float = 0.5,
        mode: str = "ddk",
        init: str = "discrepancy",
    ) -> None:
        fn = "FactorSmoother"
        check_num_domains(fn, num_domains)
        if (
            not isinstance(alpha, (int, float))
            or isinstance(alpha, bool)
            or not math.isfinite(alpha)
            or not 0.0 < alpha <= 1.0
        ):
            raise ValueError(f"{fn}: alpha must be in (0, 1] (paper default 0.5); got {alpha!r}.")
        if mode not in SMOOTHER_MODES:
            raise ValueError(f"{fn}: mode must be one of {SMOOTHER_MODES}; got {mode!r}.")
        if init not in SMOOTHER_INITS:
            raise ValueError(f"{fn}: init must be one of {SMOOTHER_INITS}; got {init!r}.")
        super().__init__(num_domains)
        self.alpha = float(alpha)
        self.mode = mode
        self.init = init

    # ------------------------------------------------------------------ math
    def _settings(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "mode": self.mode, "init": self.init}

    def _initial_weights(self, ratio: torch.Tensor) -> torch.Tensor:
        """Eq. 1: ``r_0 = softmax(ratio)`` (uniform with ``init="uniform"`` or ``mode="uniform"``)."""
        if self.init == "uniform" or self.mode == "uniform":
            return self._uniform()
        return torch.softmax(ratio, dim=0)

    def _next_weights(self, ratio: torch.Tensor) -> torch.Tensor:
        """Eq. 2 (mode ``"ddk"``), plain softmax (``"no_smoothing"``) or uniform weights."""
        if self.mode == "uniform":
            return self._uniform()
        if self.mode == "no_smoothing":
            return torch.softmax(ratio, dim=0)
        assert self._weights is not None  # update() checks
        # psi = r_t * exp(ratio); psi / sum(psi) == softmax(log r_t + ratio). A zero r_t
        # (possible after Eq. 1 with enormous ratio gaps) gives log 0 = -inf -> psi = 0.
        psi = torch.softmax(torch.log(self._weights) + ratio, dim=0)
        w = self.alpha * psi + (1.0 - self.alpha) / self.num_domains
        return w / w.sum()

    def __repr__(self) -> str:
        return (
            f"FactorSmoother(num_domains={self.num_domains}, alpha={self.alpha}, mode={self.mode!r}, "
            f"init={self.init!r})"
        )
