"""Domain weights from discrepancy ratios: DDK's Eq. 1/2 (``FactorSmoother``), DoReMi's
exponentiated-gradient step (``DoReMiScheduler``), and their common base ``WeightScheduler``.

Which schedule each distillation method runs is the engine's method table (``ddk.engine.methods``)."""

from ddk.schedule.base import WeightScheduler, ratio_to_tensor
from ddk.schedule.doremi import DoReMiScheduler
from ddk.schedule.smoother import SMOOTHER_INITS, SMOOTHER_MODES, SMOOTHER_SIGNALS, FactorSmoother

__all__ = [
    "SMOOTHER_INITS",
    "SMOOTHER_MODES",
    "SMOOTHER_SIGNALS",
    "DoReMiScheduler",
    "FactorSmoother",
    "WeightScheduler",
    "ratio_to_tensor",
]
