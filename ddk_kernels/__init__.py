"""Kernels of the DDK loss: the float64 oracle, a pure-torch chunked path, and optional
compiled (C++/CUDA) and Triton backends, all chosen in ``ddk_kernels.dispatch``.

Depends on torch only; Triton and the compiled extension are imported lazily.
"""

from ddk_kernels.dispatch import available_backends, resolve_backend
from ddk_kernels.types import KDConfig, KDLossOutput

__all__ = ["KDConfig", "KDLossOutput", "available_backends", "resolve_backend"]
