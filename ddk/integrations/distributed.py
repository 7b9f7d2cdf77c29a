"""Small ``torch.distributed`` helpers; every one is a no-op without an initialised process group."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when not distributed."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def collective_device(preferred: torch.device | str | None = None) -> torch.device:
    """The device a tensor must live on to take part in a collective of the default group.

    Args:
        preferred: the device to use when the backend accepts it (any device for gloo).

    Returns:
        ``preferred`` (CPU when None) unless the backend is NCCL, which needs the current CUDA
        device.
    """
    if is_distributed() and dist.get_backend() == "nccl":
        if preferred is not None and torch.device(preferred).type == "cuda":
            return torch.device(preferred)
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(preferred) if preferred is not None else torch.device("cpu")


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (no-op when not distributed) and return it.

    Every rank must call it with a tensor of the same shape and dtype, or the ranks deadlock.

    Args:
        tensor: any shape and dtype the backend supports (float64 works with gloo and NCCL).

    Returns:
        The same tensor object, now holding the sum over ranks.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"all_reduce_sum_: tensor must be a torch.Tensor; got {type(tensor).__name__}.")
    if is_distributed() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
