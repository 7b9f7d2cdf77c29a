"""Domain weights from discrepancy ratios: Eq. 1 (initial factor) and Eq. 2 (smoothed update)."""

from ddk.schedule.smoother import SMOOTHER_INITS, SMOOTHER_MODES, FactorSmoother, ratio_to_tensor

__all__ = ["SMOOTHER_INITS", "SMOOTHER_MODES", "FactorSmoother", "ratio_to_tensor"]
