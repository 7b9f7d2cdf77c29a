"""Domain weights from discrepancy ratios: DDK's Eq. 1/2 (``FactorSmoother``), DoReMi's
exponentiated-gradient step (``DoReMiScheduler``), and their common base ``WeightScheduler``; ``make_scheduler`` maps a method name to its schedule."""

from ddk.schedule.base import WeightScheduler, ratio_to_tensor
from ddk.schedule.doremi import DoReMiScheduler
from ddk.schedule.methods import ADAPTIVE_METHODS, METHODS, make_scheduler
from ddk.schedule.smoother import SMOOTHER_INITS, SMOOTHER_MODES, FactorSmoother

__all__ = [
    "ADAPTIVE_METHODS",
    "METHODS",
    "SMOOTHER_INITS",
    "SMOOTHER_MODES",
    "DoReMiScheduler",
    "FactorSmoother",
    "WeightScheduler",
    "make_scheduler",
    "ratio_to_tensor",
]
