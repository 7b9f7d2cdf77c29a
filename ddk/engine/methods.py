"""The distillation methods by name: the one table of what each method means.

Shared by ``ddk distill``, ``DDKTrainer``, the demo teacher's pretraining and the synthetic demo:

* ``cpt``: the student alone (CE, no teacher), uniform mixture;
* ``kd``: ``CE + gamma * KL``, uniform mixture;
* ``ddk``: KD with DDK's mixture (Eq. 1, then Eq. 2 every interval);
* ``ddk-no-smoothing``: the weights are ``softmax(ratio)`` at every update;
* ``ddk-online``: ``ddk`` with the discrepancy from the training batches;
* ``kd-doremi``: KD with DoReMi's exponentiated-gradient reweighting (``DoReMiScheduler``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ddk.schedule.base import WeightScheduler
from ddk.schedule.doremi import DoReMiScheduler
from ddk.schedule.smoother import FactorSmoother

__all__ = ["ADAPTIVE_METHODS", "METHODS", "MethodSpec", "make_scheduler", "method_spec"]


@dataclass(frozen=True)
class MethodSpec:
    """What one method means.

    Attributes:
        name: the method's name.
        teacher: True when the loss has a divergence term (a teacher model or a teacher cache).
        adaptive: True when the domain mixture changes during training.
        online: True when the discrepancy comes from the training batches, not validation passes.
        smoother_mode: ``FactorSmoother`` mode, or None for ``DoReMiScheduler``.
    """

    name: str
    teacher: bool
    adaptive: bool
    online: bool
    smoother_mode: str | None


_TABLE: dict[str, MethodSpec] = {
    s.name: s
    for s in (
        MethodSpec("cpt", teacher=False, adaptive=False, online=False, smoother_mode="uniform"),
        MethodSpec("kd", teacher=True, adaptive=False, online=False, smoother_mode="uniform"),
        MethodSpec("ddk", teacher=True, adaptive=True, online=False, smoother_mode="ddk"),
        MethodSpec("ddk-no-smoothing", teacher=True, adaptive=True, online=False, smoother_mode="no_smoothing"),
        MethodSpec("ddk-online", teacher=True, adaptive=True, online=True, smoother_mode="ddk"),
        MethodSpec("kd-doremi", teacher=True, adaptive=True, online=False, smoother_mode=None),
    )
}
METHODS: tuple[str, ...] = tuple(_TABLE)
ADAPTIVE_METHODS: tuple[str, ...] = tuple(n for n, s in _TABLE.items() if s.adaptive)


def method_spec(method: str, fn: str = "method_spec") -> MethodSpec:
    """The ``MethodSpec`` of ``method``; an unknown name is a ``ValueError`` listing the methods."""
    if method not in _TABLE:
        raise ValueError(f"{fn}: method must be one of {METHODS}; got {method!r}.")
    return _TABLE[method]


def make_scheduler(
    method: str,
    num_domains: int,
    *,
    alpha: float = 0.5,
    init: str = "discrepancy",
    signal: str = "ratio",
    temperature: float = 1.0,
    step_size: float = 1.0,
    smoothing: float = 1e-3,
) -> WeightScheduler:
    """The weight schedule of ``method`` over ``num_domains`` domains.

    Args:
        method: one of ``METHODS``.
        num_domains: D >= 1.
        alpha: ``FactorSmoother``'s smoothing weight (DDK methods).
        init: ``FactorSmoother``'s first weights, ``"discrepancy"``, ``"uniform"`` or ``"floored"`` (DDK methods).
        signal: ``FactorSmoother``'s signal, ``"ratio"``, ``"log_ratio"`` or ``"gain"`` (DDK methods).
        temperature: ``FactorSmoother``'s softmax temperature (DDK methods).
        step_size: ``DoReMiScheduler``'s eta (``kd-doremi``).
        smoothing: ``DoReMiScheduler``'s c (``kd-doremi``).

    Examples:
        >>> make_scheduler("ddk-no-smoothing", 3)
        FactorSmoother(num_domains=3, alpha=0.5, mode='no_smoothing', init='discrepancy')
        >>> make_scheduler("kd-doremi", 3)
        DoReMiScheduler(num_domains=3, step_size=1.0, smoothing=0.001)
    """
    spec = method_spec(method, "make_scheduler")
    if spec.smoother_mode is None:
        return DoReMiScheduler(num_domains, step_size=step_size, smoothing=smoothing)
    return FactorSmoother(
        num_domains, alpha=alpha, mode=spec.smoother_mode, init=init, signal=signal, temperature=temperature
    )
