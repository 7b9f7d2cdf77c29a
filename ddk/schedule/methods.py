"""The distillation methods by name, and the weight schedule each one runs behind ``DDKController``.

One table shared by ``ddk distill`` and ``DDKTrainer``:

* ``cpt``: the student alone (CE, no teacher), uniform mixture;
* ``kd``: ``CE + gamma * KL``, uniform mixture;
* ``ddk``: KD with DDK's mixture (Eq. 1, then Eq. 2 every interval);
* ``ddk-no-smoothing``: the weights are ``softmax(ratio)`` at every update;
* ``ddk-online``: ``ddk`` with the discrepancy from the training batches;
* ``kd-doremi``: KD with DoReMi's exponentiated-gradient reweighting (``DoReMiScheduler``).
"""

from __future__ import annotations

from ddk.schedule.base import WeightScheduler
from ddk.schedule.doremi import DoReMiScheduler
from ddk.schedule.smoother import FactorSmoother

__all__ = ["ADAPTIVE_METHODS", "METHODS", "make_scheduler"]

METHODS: tuple[str, ...] = ("cpt", "kd", "ddk", "ddk-no-smoothing", "ddk-online", "kd-doremi")
ADAPTIVE_METHODS: tuple[str, ...] = ("ddk", "ddk-no-smoothing", "ddk-online", "kd-doremi")  # mixture changes
_SMOOTHER_MODE = {
    "cpt": "uniform",
    "kd": "uniform",
    "ddk": "ddk",
    "ddk-no-smoothing": "no_smoothing",
    "ddk-online": "ddk",
}


def make_scheduler(
    method: str,
    num_domains: int,
    *,
    alpha: float = 0.5,
    init: str = "discrepancy",
    step_size: float = 1.0,
    smoothing: float = 1e-3,
) -> WeightScheduler:
    """The weight schedule of ``method`` over ``num_domains`` domains.

    Args:
        method: one of ``METHODS``.
        num_domains: D >= 1.
        alpha: ``FactorSmoother``'s smoothing weight (DDK methods).
        init: ``FactorSmoother``'s first weights, ``"discrepancy"`` or ``"uniform"`` (DDK methods).
        step_size: ``DoReMiScheduler``'s eta (``kd-doremi``).
        smoothing: ``DoReMiScheduler``'s c (``kd-doremi``).

    Examples:
        >>> make_scheduler("ddk-no-smoothing", 3)
        FactorSmoother(num_domains=3, alpha=0.5, mode='no_smoothing', init='discrepancy')
        >>> make_scheduler("kd-doremi", 3)
        DoReMiScheduler(num_domains=3, step_size=1.0, smoothing=0.001)
    """
    if method == "kd-doremi":
        return DoReMiScheduler(num_domains, step_size=step_size, smoothing=smoothing)
    if method not in _SMOOTHER_MODE:
        raise ValueError(f"make_scheduler: method must be one of {METHODS}; got {method!r}.")
    return FactorSmoother(num_domains, alpha=alpha, mode=_SMOOTHER_MODE[method], init=init)
