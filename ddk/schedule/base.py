"""``WeightScheduler``: the interface of the per-domain weight schedules behind ``DDKController``.

A scheduler turns per-domain perplexity ratios ``ppl_S / ppl_T`` (or a ``DomainDiscrepancy``)
into sampling weights on the simplex: ``initialize`` once, ``update`` at every interval. This base
class keeps the weights, the history and the checkpoint state; a subclass supplies the two rules
(``_initial_weights``, ``_next_weights``) and its settings. ``FactorSmoother`` (DDK's Eq. 1/2) and
``DoReMiScheduler`` (DoReMi's exponentiated-gradient step) are the two in the library.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

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


def check_num_domains(fn: str, num_domains: Any) -> int:
    """``num_domains`` as an int >= 1, else the house-format ``ValueError``."""
    if not isinstance(num_domains, int) or isinstance(num_domains, bool) or num_domains < 1:
        raise ValueError(f"{fn}: num_domains must be an int >= 1; got {num_domains!r}.")
    return num_domains


class WeightScheduler:
    """Base class of the domain-weight schedules: weights, history and checkpoint state.

    Subclasses implement ``_initial_weights(ratio)`` and ``_next_weights(ratio)`` (``(D,)``
    float64 in, ``(D,)`` float64 on the simplex out) and ``_settings()`` (the JSON-serialisable
    constructor settings written into ``state_dict``). Weights that underflow to a denormal are
    flushed to exactly 0 and the rest renormalised.

    Args:
        num_domains: D >= 1.
    """

    def __init__(self, num_domains: int) -> None:
        self.num_domains = check_num_domains(type(self).__name__, num_domains)
        self._weights: torch.Tensor | None = None
        self._history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ the two rules
    def _initial_weights(self, ratio: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _next_weights(self, ratio: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _settings(self) -> dict[str, Any]:
        return {}

    def initialize(self, ratio: Any) -> torch.Tensor:
        """The first weights from the ratios measured before training.

        Args:
            ratio: ``(D,)`` ``ppl_S / ppl_T`` per domain (sequence, ndarray, tensor or
                ``DomainDiscrepancy``), finite and > 0.

        Returns:
            ``(D,)`` float64 CPU weights summing to 1.
        """
        r = ratio_to_tensor(f"{type(self).__name__}.initialize", ratio, self.num_domains)
        return self._record("init", r, self._initial_weights(r))

    def update(self, ratio: Any) -> torch.Tensor:
        """The next weights from the current ones and the ratios measured now.

        Args:
            ratio: ``(D,)`` ``ppl_S / ppl_T`` per domain, finite and > 0.

        Returns:
            ``(D,)`` float64 CPU weights summing to 1.
        """
        fn = f"{type(self).__name__}.update"
        if self._weights is None:
            raise RuntimeError(
                f"{fn}: the scheduler must be initialised first; call initialize(ratio) "
                "(or DDKController.start(student)) before update."
            )
        r = ratio_to_tensor(fn, ratio, self.num_domains)
        return self._record("update", r, self._next_weights(r))

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
                f"{type(self).__name__}.weights: the scheduler must be initialised first; call "
                f"{type(self).__name__}.initialize(ratio)."
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

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: configuration, current weights and history."""
        return {
            "num_domains": self.num_domains,
            **self._settings(),
            "weights": None if self._weights is None else self._weights.tolist(),
            "history": self.history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore weights and history saved by ``state_dict``.

        The settings (e.g. ``alpha``) stay those given to the constructor (so a resumed run may
        change them); ``num_domains`` must match. The state is validated whole first
        (:meth:`check_state_dict`); a rejected state changes nothing.
        """
        self._commit_state(self.check_state_dict(state))

    def _commit_state(self, parsed: tuple[torch.Tensor | None, list[dict[str, Any]]]) -> None:
        """Apply a state parsed by :meth:`check_state_dict` (cannot fail)."""
        self._weights, self._history = parsed

    def check_state_dict(self, state: dict[str, Any], fn: str = "") -> tuple[torch.Tensor | None, list[dict[str, Any]]]:
        """Validate a ``state_dict()`` without changing anything; return ``(weights, history)``.

        ``weights``: ``None`` or ``num_domains`` finite numbers >= 0 summing to 1 (equal to the last
        history entry's); ``history``: entries ``{"kind": "init" | "update", "ratio": D finite
        numbers, "weights": D finite numbers >= 0 summing to 1}``.

        Raises:
            TypeError: not a dict from ``state_dict()``.
            ValueError: the first invalid field, named.
        """
        name = type(self).__name__
        fn = fn or f"{name}.load_state_dict"
        if not isinstance(state, dict) or "weights" not in state or "history" not in state:
            raise TypeError(f"{fn}: state must be a dict from {name}.state_dict(); got {type(state).__name__}.")
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
