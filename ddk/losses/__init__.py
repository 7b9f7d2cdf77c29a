"""Public KD losses of DDK."""

from ddk.losses.kd import KDLoss, kd_loss
from ddk_kernels.types import KDLossOutput

__all__ = ["KDLoss", "KDLossOutput", "kd_loss"]
