"""Kernels of the DDK loss: the float64 oracle, pure-torch chunked paths, and optional compiled
(C++/CUDA) and Triton backends, all chosen in ``ddk_kernels.dispatch``.

Layout: ``types`` (parameter objects and results), ``dispatch`` (the table of ops and backends),
``reduce`` (the loss formula), ``reference`` (the oracle), ``chunked`` / ``cpp`` / ``triton`` (the
per-row op ``kd_rows``), ``fused_plan`` / ``fused_rows`` / ``fused_gemm`` / ``fused_chunked`` (the
fused ``lm_head`` op ``fused_linear_kd``). Depends on torch only; Triton and the compiled extension
are imported lazily.
"""

from ddk_kernels.dispatch import available_backends, resolve, resolve_backend
from ddk_kernels.types import KDConfig, KDLossOutput, KDLossParams

__all__ = ["KDConfig", "KDLossOutput", "KDLossParams", "available_backends", "resolve", "resolve_backend"]
