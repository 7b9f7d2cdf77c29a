"""``FactorSmoother``: per-domain perplexity ratios -> sampling weights over domains.

Eq. 1 (initial domain discrepancy factor): ``r_0 = softmax(ppl_S / ppl_T)``.
Eq. 2 (factor smooth updating): ``psi_i = r_t[i] * exp(ppl_S[i] / ppl_T[i])``,
``r_{t+1}[i] = alpha * psi_i / sum_j psi_j + (1 - alpha) / D``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

SMOOTHER_MODES: tuple[str, ...] = ("ddk", "no_smoothing", "uniform")
SMOOTHER_INITS: tuple[str, ...] = ("discrepancy", "uniform")
_TINY = torch.finfo(torch.float64).tiny  # smallest normal float64, ~2.2e-308


def ratio_to_tensor(fn: str, ratio: Any, num_domains: int) -> torch.Tensor:
    """Validate per-domain ratios and return them as a CPU ``(D,)`` float64 tensor.

    Args:
        fn: name of the calling function, for the error message.
        ratio: ``(D,)`` sequence, ndarray or tensor of ``ppl_S / ppl_T``, or a ``DomainDiscrepancy``
            (its ``ratio`` is used).
        num_domains: D.

    Returns:
        ``(D,)`` float64 CPU tensor, finite and > 0.

    Raises:
        TypeError: ``ratio`` is not array-like.
        ValueError: wrong length, non-finite or non-positive values.
    """
    if hasattr(ratio, "ratio") and hasattr(ratio, "student_ce"):
        ratio = ratio.ratio
    try:
        if isinstance(ratio, torch.Tensor):
            t = ratio.detach().to(device="cpu", dtype=torch.float64)
        else:
            if isinstance(ratio, (str, bytes)) or not isinstance(ratio, (Sequence, np.ndarray)):
                raise TypeError
            t = torch.as_tensor(np.asarray(ratio, dtype=np.float64))
    except (TypeError, ValueError):
        raise TypeError(
            f"{fn}: ratio must be a sequence, ndarray, tensor or DomainDiscrepancy of {num_domains} "
            f"floats; got {type(ratio).__name__}."
        ) from None
    if t.dim() != 1 or t.shape[0] != num_domains:
        raise ValueError(f"{fn}: ratio must have shape ({num_domains},) (one value per domain); got {tuple(t.shape)}.")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{fn}: ratio must be finite; got {t.tolist()}.")
    if not bool((t > 0).all()):
        raise ValueError(f"{fn}: ratio must be > 0 (ppl_S / ppl_T); got {t.tolist()}.")
    return t.clone()


class FactorSmoother:
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
        if not isinstance(num_domains, int) or isinstance(num_domains, bool) or num_domains < 1:
            raise ValueError(f"{fn}: num_domains must be an int >= 1; got {num_domains!r}.")
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
        self.num_domains = num_domains
        self.alpha = float(alpha)
        self.mode = mode
        self.init = init
        self._weights: torch.Tensor | None = None
        self._history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ state
    @property
    def initialized(self) -> bool:
        """True once ``initialize`` (or ``load_state_dict`` of an initialised state) ran."""
        return self._weights is not None

    @property
    def weights(self) -> torch.Tensor:
        """Copy of the current ``(D,)`` float64 weights (on the simplex)."""
        if self._weights is None:
            raise RuntimeError(
                "FactorSmoother.weights: the smoother must be initialised first; call smoother.initialize(ratio)."
            )
        return self._weights.clone()

    @property
    def history(self) -> list[dict[str, Any]]:
        """One dict per ``initialize``/``update``: ``{"kind", "ratio", "weights"}`` (lists of floats)."""
        return [dict(h, ratio=list(h["ratio"]), weights=list(h["weights"])) for h in self._history]

    def _uniform(self) -> torch.Tensor:
        return torch.full((self.num_domains,), 1.0 / self.num_domains, dtype=torch.float64)

    def _record(self, kind: str, ratio: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        denormal = (weights > 0) & (weights < _TINY)
        if bool(denormal.any()):  # underflow: flush to exactly 0 and renormalise (see the class doc)
            weights = torch.where(denormal, torch.zeros_like(weights), weights)
            weights = weights / weights.sum()
        self._weights = weights
        self._history.append({"kind": kind, "ratio": ratio.tolist(), "weights": weights.tolist()})
        return weights.clone()

    # ------------------------------------------------------------------ math
    def initialize(self, ratio: Any) -> torch.Tensor:
        """Eq. 1: ``r_0 = softmax(ratio)`` (uniform with ``init="uniform"`` or ``mode="uniform"``).

        Args:
            ratio: ``(D,)`` ``ppl_S / ppl_T`` per domain (sequence, ndarray, tensor or
                ``DomainDiscrepancy``), finite and > 0.

        Returns:
            ``(D,)`` float64 CPU weights summing to 1.
        """
        r = ratio_to_tensor("FactorSmoother.initialize", ratio, self.num_domains)
        if self.init == "uniform" or self.mode == "uniform":
            w = self._uniform()
        else:
            w = torch.softmax(r, dim=0)
        return self._record("init", r, w)

    def update(self, ratio: Any) -> torch.Tensor:
        """Eq. 2 (mode ``"ddk"``), plain softmax (``"no_smoothing"``) or uniform weights.

        Args:
            ratio: ``(D,)`` ``ppl_S / ppl_T`` per domain, finite and > 0.

        Returns:
            ``(D,)`` float64 CPU weights summing to 1.
        """
        fn = "FactorSmoother.update"
        if self._weights is None:
            raise RuntimeError(
                f"{fn}: the smoother must be initialised first; call smoother.initialize(ratio) "
                "(or DDKController.start(student)) before update."
            )
        r = ratio_to_tensor(fn, ratio, self.num_domains)
        if self.mode == "uniform":
            w = self._uniform()
        elif self.mode == "no_smoothing":
            w = torch.softmax(r, dim=0)
        else:
            # psi = r_t * exp(ratio); psi / sum(psi) == softmax(log r_t + ratio). A zero r_t
            # (possible after Eq. 1 with enormous ratio gaps) gives log 0 = -inf -> psi = 0.
            psi = torch.softmax(torch.log(self._weights) + r, dim=0)
            w = self.alpha * psi + (1.0 - self.alpha) / self.num_domains
            w = w / w.sum()
        return self._record("update", r, w)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: configuration, current weights and history."""
        return {
            "num_domains": self.num_domains,
            "alpha": self.alpha,
            "mode": self.mode,
            "init": self.init,
            "weights": None if self._weights is None else self._weights.tolist(),
            "history": self.history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore weights and history saved by ``state_dict``.

        ``alpha``, ``mode`` and ``init`` stay those given to the constructor (so a resumed run may
        change them); ``num_domains`` must match. The state is validated whole first
        (:meth:`check_state_dict`); a rejected state changes nothing.
        """
        self._commit_state(self.check_state_dict(state))

    def _commit_state(self, parsed: tuple[torch.Tensor | None, list[dict[str, Any]]]) -> None:
        """Apply a state parsed by :meth:`check_state_dict` (cannot fail)."""
        self._weights, self._history = parsed

    def check_state_dict(
        self, state: dict[str, Any], fn: str = "FactorSmoother.load_state_dict"
    ) -> tuple[torch.Tensor | None, list[dict[str, Any]]]:
        """Validate a ``state_dict()`` without changing anything; return ``(weights, history)``.

        ``weights``: ``None`` or ``num_domains`` finite numbers >= 0 summing to 1 (equal to the last
        history entry's); ``history``: entries ``{"kind": "init" | "update", "ratio": D finite
        numbers, "weights": D finite numbers >= 0 summing to 1}``.

        Raises:
            TypeError: not a dict from ``state_dict()``.
            ValueError: the first invalid field, named.
        """
        if not isinstance(state, dict) or "weights" not in state or "history" not in state:
            raise TypeError(f"{fn}: state must be a dict from FactorSmoother.state_dict(); got {type(state).__name__}.")
        d = self.num_domains
        if state.get("num_domains") != d:
            raise ValueError(
                f"{fn}: state['num_domains'] must equal this smoother's num_domains={d}; "
                f"got {state.get('num_domains')!r}."
            )

        def numbers(where: str, value: Any, simplex: bool) -> list[float]:
            ok = (
                isinstance(value, (list, tuple))
                and len(value) == d
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in value)
            )
            if ok and simplex:
                ok = all(x >= 0 for x in value) and abs(math.fsum(value) - 1.0) <= 1e-6
            if not ok:
                what = "finite weights >= 0 summing to 1" if simplex else "finite numbers"
                raise ValueError(f"{fn}: {where} must be {d} {what}; got {value!r}.")
            return [float(x) for x in value]

        history = state["history"]
        if not isinstance(history, list):
            raise ValueError(f"{fn}: state['history'] must be a list of entries; got {type(history).__name__}.")
        parsed: list[dict[str, Any]] = []
        for i, h in enumerate(history):
            if not isinstance(h, dict) or h.get("kind") not in ("init", "update"):
                raise ValueError(
                    f"{fn}: state['history'][{i}] must be a dict with kind 'init' or 'update'; got {str(h)[:120]}."
                )
            parsed.append(
                {
                    "kind": h["kind"],
                    "ratio": numbers(f"state['history'][{i}]['ratio']", h.get("ratio"), False),
                    "weights": numbers(f"state['history'][{i}]['weights']", h.get("weights"), True),
                }
            )
        w = state["weights"]
        if w is None:
            return None, parsed
        t = torch.tensor(numbers("state['weights']", w, True), dtype=torch.float64)
        if parsed and t.tolist() != parsed[-1]["weights"]:
            raise ValueError(
                f"{fn}: state['weights'] must equal the last history entry's weights "
                f"{parsed[-1]['weights']}; got {w!r}."
            )
        return t, parsed

    def __repr__(self) -> str:
        return (
            f"FactorSmoother(num_domains={self.num_domains}, alpha={self.alpha}, mode={self.mode!r}, "
            f"init={self.init!r})"
        )
