"""``FactorSmoother``: per-domain perplexity ratios -> sampling weights over domains.

Eq. 1 (initial domain discrepancy factor): ``r_0 = softmax(ppl_S / ppl_T)``.
Eq. 2 (factor smooth updating): ``psi_i = r_t[i] * exp(ppl_S[i] / ppl_T[i])``,
``r_{t+1}[i] = alpha * psi_i / sum_j psi_j + (1 - alpha) / D``.

Options beyond the paper (each one setting; the defaults are the paper's form): the floor of
Eq. 2 applied to ``r_0`` too (``init="floored"``), the signal in the exponent (``signal``: the
ratio, its logarithm, or a gain-aware signal) and a softmax temperature. ``docs/results.md``
measures them where one domain is nearly unseen.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ddk.schedule.base import WeightScheduler, check_num_domains, ratio_to_tensor

__all__ = ["GAIN_CAP", "SMOOTHER_INITS", "SMOOTHER_MODES", "SMOOTHER_SIGNALS", "FactorSmoother", "ratio_to_tensor"]

SMOOTHER_MODES: tuple[str, ...] = ("ddk", "no_smoothing", "uniform")
SMOOTHER_INITS: tuple[str, ...] = ("discrepancy", "uniform", "floored")
SMOOTHER_SIGNALS: tuple[str, ...] = ("ratio", "log_ratio", "gain")
_TINY_SHARE = 1e-300
GAIN_CAP = 2.0  # the "gain" signal scales a domain's gap by at most this (its learnability / the mean)


class FactorSmoother(WeightScheduler):
    """Turns per-domain ratios ``ppl_S / ppl_T`` into domain sampling weights.

    Modes (the paper's ablations):

    * ``"ddk"``: Eq. 2, ``r_{t+1} = alpha * softmax(log r_t + ratio) + (1 - alpha) / D``, computed
      in log space in float64 so huge ratios cannot overflow. After an update every weight lies in
      ``[(1 - alpha) / D, alpha + (1 - alpha) / D]``.
    * ``"no_smoothing"``: ``softmax(ratio)`` at every update (no history, no floor).
    * ``"uniform"``: always ``1 / D``.

    ``initialize`` applies Eq. 1, ``r_0 = softmax(ratio)`` (``1 / D`` when ``init="uniform"`` or
    ``mode="uniform"``; ``alpha * softmax(ratio) + (1 - alpha) / D``, Eq. 2's floor on Eq. 1, when
    ``init="floored"``).

    The signal ``x`` that takes the ratio's place in both equations (``softmax(x / temperature)``,
    ``psi_i = r_t[i] * exp(x_i / temperature)``):

    * ``"ratio"`` (the paper): ``x = ppl_S / ppl_T``;
    * ``"log_ratio"``: ``x = log(ppl_S / ppl_T)``, the gap in nats per token (a student far behind
      on one domain gets ``e^gap`` times the weight, not ``e^ratio``);
    * ``"gain"``: the gap scaled by how fast the domain closed it per sample it got in the last
      interval. With ``g`` the gaps now, ``g'`` at the previous update and ``w`` the weights of
      the interval between, a domain's closing rate is ``c_i = (g'_i - g_i) / (D * w_i)`` (nats
      per uniform share of samples) and ``x_i = g_i * min(max(c_i, 0) / mean(max(c, 0)),
      GAIN_CAP)``: a lagging domain that is also learnable keeps more data, one whose gap stopped
      closing (or that regressed) falls back towards the floor. Where no domain closed its gap, or
      at Eq. 1 (no previous update), ``x = g``.

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
        init: ``"discrepancy"`` (Eq. 1), ``"uniform"`` (the paper's pseudo-code) or ``"floored"``.
        signal: ``"ratio"`` (the paper), ``"log_ratio"`` or ``"gain"`` (see above).
        temperature: divides the signal in both softmaxes, > 0 (paper: 1).

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
        signal: str = "ratio",
        temperature: float = 1.0,
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
        if signal not in SMOOTHER_SIGNALS:
            raise ValueError(f"{fn}: signal must be one of {SMOOTHER_SIGNALS}; got {signal!r}.")
        if (
            not isinstance(temperature, (int, float))
            or isinstance(temperature, bool)
            or not math.isfinite(temperature)
            or not temperature > 0
        ):
            raise ValueError(f"{fn}: temperature must be a finite number > 0 (paper: 1); got {temperature!r}.")
        super().__init__(num_domains)
        self.alpha = float(alpha)
        self.mode = mode
        self.init = init
        self.signal = signal
        self.temperature = float(temperature)

    # ------------------------------------------------------------------ math
    def _settings(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "mode": self.mode,
            "init": self.init,
            "signal": self.signal,
            "temperature": self.temperature,
        }

    def _signal(self, ratio: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        """The exponent ``x / temperature`` of both equations (see the class doc); ``previous``: the
        ratios of the last initialize/update (None at Eq. 1)."""
        if self.signal == "ratio":
            x = ratio
        else:
            x = torch.log(ratio)
            if self.signal == "gain" and previous is not None and self._weights is not None:
                closed = torch.log(previous) - x  # nats each domain's gap closed over the interval
                # per uniform share of samples (a zero weight got no sample: no evidence, rate 0)
                share = self._weights * self.num_domains
                rate = torch.where(share > 0, closed / share.clamp_min(_TINY_SHARE), torch.zeros_like(closed))
                rate = rate.clamp_min(0.0)
                if bool(rate.sum() > 0):
                    x = x * (rate / rate.mean()).clamp_max(GAIN_CAP)
        return x / self.temperature

    def _previous_ratio(self) -> torch.Tensor | None:
        return torch.tensor(self._history[-1]["ratio"], dtype=torch.float64) if self._history else None

    def _initial_weights(self, ratio: torch.Tensor) -> torch.Tensor:
        """Eq. 1: ``r_0 = softmax(x)`` (uniform with ``init="uniform"`` or ``mode="uniform"``; with
        Eq. 2's floor when ``init="floored"``)."""
        if self.init == "uniform" or self.mode == "uniform":
            return self._uniform()
        w = torch.softmax(self._signal(ratio, None), dim=0)
        if self.init == "floored":
            w = self.alpha * w + (1.0 - self.alpha) / self.num_domains
            w = w / w.sum()
        return w

    def _next_weights(self, ratio: torch.Tensor) -> torch.Tensor:
        """Eq. 2 (mode ``"ddk"``), plain softmax (``"no_smoothing"``) or uniform weights."""
        if self.mode == "uniform":
            return self._uniform()
        x = self._signal(ratio, self._previous_ratio())
        if self.mode == "no_smoothing":
            return torch.softmax(x, dim=0)
        assert self._weights is not None  # update() checks
        # psi = r_t * exp(x); psi / sum(psi) == softmax(log r_t + x). A zero r_t
        # (possible after Eq. 1 with enormous ratio gaps) gives log 0 = -inf -> psi = 0.
        psi = torch.softmax(torch.log(self._weights) + x, dim=0)
        w = self.alpha * psi + (1.0 - self.alpha) / self.num_domains
        return w / w.sum()

    def __repr__(self) -> str:
        extra = "".join(
            f", {k}={v!r}"
            for k, v, default in (("signal", self.signal, "ratio"), ("temperature", self.temperature, 1.0))
            if v != default
        )
        return (
            f"FactorSmoother(num_domains={self.num_domains}, alpha={self.alpha}, mode={self.mode!r}, "
            f"init={self.init!r}{extra})"
        )
