"""DDK: domain-aware knowledge distillation of LLMs (arXiv 2407.16154).

Composable pieces for any training loop:

* :class:`DomainPartitioner` — examples -> domain ids, stable per-domain train/validation splits.
* :class:`DiscrepancyEstimator` — per-domain student/teacher CE -> perplexity ratios.
* :class:`FactorSmoother` — ratios -> domain weights (Eq. 1 and the smoothed update of Eq. 2).
* :class:`DoReMiScheduler` — the DoReMi baseline inside KD: exponentiated-gradient steps on the
  student's excess CE over the teacher (same interface, behind the same controller).
* :class:`MixtureSampler` — weights -> exact-count, resumable, rank-sliced batches of indices.
* :class:`DDKController` — ties the three to the distillation interval K.
* :func:`kd_loss` — ``CE + gamma * KL(p_T || p_S)`` with per-domain sums, on fast backends.
* :func:`fused_linear_kd_loss` — the same loss from hidden states and ``lm_head`` weights, tiled
  over the vocabulary so no ``(N, V)`` logits are ever allocated.
* :func:`sparse_kd_loss`, :func:`fused_linear_sparse_kd_loss` — the loss against a cached
  top-k teacher (``ddk teacher-cache``): k ids plus one tail bucket, no teacher model needed.
* :func:`causal_lm_kd_loss` — the fused loss of a transformers causal-LM pair on a batch
  (shifted inside; domain ids per sequence or per token).
* :class:`NonFiniteGuard` — NaN/inf loss or gradients: raise naming the step and the domains, or
  skip the batch and count it.
* :mod:`ddk.data` — users' corpora: ``load_records``, ``pack_domains``, ``DomainCollator``.
* :mod:`ddk.integrations.transformers` — ``DDKTrainer`` and ``DDKConfig`` for ``transformers.Trainer``.

The demo corpus builder, the demo teacher, the recipes and the ``ddk`` command live in
:mod:`ddk.recipes`, which depends on the library and is never imported by it.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ddk import data
    from ddk.controller import DDKController
    from ddk.discrepancy import DiscrepancyEstimator, DomainDiscrepancy
    from ddk.losses import (
        FusedLinearKDLoss,
        KDLoss,
        causal_lm_kd_loss,
        fused_linear_kd_loss,
        fused_linear_sparse_kd_loss,
        kd_loss,
        sparse_kd_loss,
    )
    from ddk.partition import DomainPartitioner, DomainSplits
    from ddk.reliability import NonFiniteError, NonFiniteGuard
    from ddk.sampling import MixtureSampler
    from ddk.schedule import DoReMiScheduler, FactorSmoother, WeightScheduler
    from ddk_kernels.types import KDLossOutput

# The names load on first use (PEP 562): ``import ddk`` stays light, so the ``ddk`` command can
# install its signal handlers before torch is imported (a SIGTERM then still exits 75).
_WHERE = {
    "data": "ddk.data",
    "DDKController": "ddk.controller",
    "DiscrepancyEstimator": "ddk.discrepancy",
    "DomainDiscrepancy": "ddk.discrepancy",
    "FusedLinearKDLoss": "ddk.losses",
    "KDLoss": "ddk.losses",
    "causal_lm_kd_loss": "ddk.losses",
    "fused_linear_kd_loss": "ddk.losses",
    "fused_linear_sparse_kd_loss": "ddk.losses",
    "kd_loss": "ddk.losses",
    "sparse_kd_loss": "ddk.losses",
    "DomainPartitioner": "ddk.partition",
    "DomainSplits": "ddk.partition",
    "NonFiniteError": "ddk.reliability",
    "NonFiniteGuard": "ddk.reliability",
    "MixtureSampler": "ddk.sampling",
    "DoReMiScheduler": "ddk.schedule",
    "FactorSmoother": "ddk.schedule",
    "WeightScheduler": "ddk.schedule",
    "KDLossOutput": "ddk_kernels.types",
}


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'ddk' has no attribute {name!r}")
    module = importlib.import_module(where)
    value = module if name == "data" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


__version__ = "0.1.0"

__all__ = [
    "DDKController",
    "DiscrepancyEstimator",
    "DoReMiScheduler",
    "DomainDiscrepancy",
    "DomainPartitioner",
    "DomainSplits",
    "FactorSmoother",
    "FusedLinearKDLoss",
    "KDLoss",
    "KDLossOutput",
    "MixtureSampler",
    "NonFiniteError",
    "NonFiniteGuard",
    "WeightScheduler",
    "causal_lm_kd_loss",
    "data",
    "fused_linear_kd_loss",
    "fused_linear_sparse_kd_loss",
    "kd_loss",
    "sparse_kd_loss",
    "__version__",
]
