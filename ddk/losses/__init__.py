"""Public KD losses of DDK: on logits (``kd_loss``), fused with the ``lm_head``
(``fused_linear_kd_loss``, never materialising ``(N, V)`` logits) and on a transformers
causal-LM pair (``causal_lm_kd_loss``, in ``ddk.losses.causal_lm``); against a cached top-k
teacher (``sparse_kd_loss``, ``fused_linear_sparse_kd_loss``); all share one batch convention
(``flatten_for_loss``). Each returns a ``KDLossOutput`` (``ddk.KDLossOutput``)."""

from ddk.losses.causal_lm import causal_lm_kd_loss
from ddk.losses.fused import FusedLinearKDLoss, fused_linear_kd_loss
from ddk.losses.kd import KDLoss, flatten_for_loss, kd_loss
from ddk.losses.sparse import fused_linear_sparse_kd_loss, sparse_kd_loss

__all__ = [
    "FusedLinearKDLoss",
    "KDLoss",
    "causal_lm_kd_loss",
    "flatten_for_loss",
    "fused_linear_kd_loss",
    "fused_linear_sparse_kd_loss",
    "kd_loss",
    "sparse_kd_loss",
]
