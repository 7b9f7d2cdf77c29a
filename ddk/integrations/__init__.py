"""Integrations of DDK with training stacks.

``ddk.distributed`` holds the small ``torch.distributed`` helpers the estimator, the
controller and ``ddk distill`` use; the collective ones are no-ops when no process group is
initialised.
"""

from ddk.distributed import (
    all_reduce_sum_,
    barrier,
    broadcast_object,
    check_same_across_ranks,
    collective_device,
    global_token_normalizer,
    init_from_env,
    is_distributed,
    is_fsdp,
    rank_world,
    rank_zero_first,
    tensor_checksum,
    unsharded,
)

__all__ = [
    "all_reduce_sum_",
    "barrier",
    "broadcast_object",
    "check_same_across_ranks",
    "collective_device",
    "global_token_normalizer",
    "init_from_env",
    "is_distributed",
    "is_fsdp",
    "rank_world",
    "rank_zero_first",
    "tensor_checksum",
    "unsharded",
]
