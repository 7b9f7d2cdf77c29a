"""Integrations of DDK with training stacks.

``ddk.integrations.distributed`` holds the small ``torch.distributed`` helpers the estimator and
the controller use; they are no-ops when no process group is initialised.
"""

from ddk.integrations.distributed import all_reduce_sum_, collective_device, is_distributed, rank_world

__all__ = ["all_reduce_sum_", "collective_device", "is_distributed", "rank_world"]
