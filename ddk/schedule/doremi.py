"""``DoReMiScheduler``: DoReMi's domain reweighting inside KD, the teacher as the reference model.

DoReMi (Xie et al., 2023) reweights domains by the *excess loss* of a proxy model over a
reference model with an exponentiated-gradient step. Inside distillation the student is the
proxy and the teacher the reference, so with ``gap_i = CE_S[i] - CE_T[i] = log(ppl_S / ppl_T)``:

``lambda_i = max(gap_i, 0)``,
``alpha'_i = alpha_{t-1}[i] * exp(eta * lambda_i)``,
``alpha_t = (1 - c) * alpha' / sum(alpha') + c / D``.

Defaults are DoReMi's: step size ``eta = 1``, smoothing ``c = 1e-3``, uniform start. Two
differences from DoReMi's own setting, both forced by what the controller measures: the excess
loss is clipped per domain (on the domain's mean CE) rather than per token, and the step is
taken once per interval K on validation CE rather than at every training step on the batch.
Against DDK's Eq. 2 (``exp(ppl_S / ppl_T)``, floor ``(1 - alpha) / D``), the step is linear in
the gap, domains the student already matches (gap <= 0) get no push, and the floor is far lower.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ddk.schedule.base import WeightScheduler, check_num_domains

__all__ = ["DoReMiScheduler"]


def _check_number(fn: str, name: str, value: Any, low: float, high: float, hint: str) -> float:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        raise ValueError(f"{fn}: {name} must be a number in {hint}; got {value!r}.")
    return float(value)


class DoReMiScheduler(WeightScheduler):
    """Domain weights by DoReMi's exponentiated-gradient step on the student's excess CE.

    A drop-in for ``FactorSmoother`` behind ``DDKController`` (the same ``initialize`` /
    ``update`` / ``state_dict`` interface): ``initialize`` returns the uniform mixture, each
    ``update(ratio)`` takes one step with ``lambda = max(log ratio, 0)``. After an update every
    weight is at least ``smoothing / D``.

    Args:
        num_domains: D >= 1.
        step_size: ``eta`` > 0 (DoReMi: 1.0).
        smoothing: ``c`` in ``[0, 1]``, the weight of the uniform mixture mixed in (DoReMi: 1e-3).

    Examples:
        >>> s = DoReMiScheduler(2)
        >>> s.initialize([3.0, 1.5]).tolist()
        [0.5, 0.5]
        >>> [round(w, 4) for w in s.update([math.e, 0.5]).tolist()]
        [0.7308, 0.2692]
    """

    def __init__(self, num_domains: int, *, step_size: float = 1.0, smoothing: float = 1e-3) -> None:
        fn = "DoReMiScheduler"
        check_num_domains(fn, num_domains)
        step_size = _check_number(fn, "step_size", step_size, 0.0, math.inf, "(0, inf) (DoReMi: 1.0)")
        if step_size == 0.0:
            raise ValueError(f"{fn}: step_size must be a number in (0, inf) (DoReMi: 1.0); got {step_size!r}.")
        super().__init__(num_domains)
        self.step_size = step_size
        self.smoothing = _check_number(fn, "smoothing", smoothing, 0.0, 1.0, "[0, 1] (DoReMi: 1e-3)")

    def _settings(self) -> dict[str, Any]:
        return {"step_size": self.step_size, "smoothing": self.smoothing}

    def _initial_weights(self, ratio: torch.Tensor) -> torch.Tensor:
        return self._uniform()

    def _next_weights(self, ratio: torch.Tensor) -> torch.Tensor:
        assert self._weights is not None  # update() checks
        excess = torch.log(ratio).clamp_min(0.0)  # lambda = max(CE_S - CE_T, 0), nats/token
        w = torch.softmax(torch.log(self._weights) + self.step_size * excess, dim=0)
        w = (1.0 - self.smoothing) * w + self.smoothing / self.num_domains
        return w / w.sum()

    def __repr__(self) -> str:
        return (
            f"DoReMiScheduler(num_domains={self.num_domains}, step_size={self.step_size}, smoothing={self.smoothing})"
        )
