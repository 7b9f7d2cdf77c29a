"""Small ``torch.distributed`` helpers.

The collective helpers are no-ops without an initialised process group (or with one rank), so
the same code runs in one process and under ``torchrun``. ``init_from_env`` starts the group from
``torchrun``'s environment; ``unsharded`` lets FSDP2 modules run uneven evaluation shards;
``tensor_checksum`` + ``check_same_across_ranks`` are the debug check that replicas agree.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "all_reduce_sum_",
    "barrier",
    "broadcast_object",
    "check_same_across_ranks",
    "collective_device",
    "full_tensor",
    "global_token_normalizer",
    "init_from_env",
    "is_distributed",
    "is_fsdp",
    "is_fsdp_root",
    "local_bytes",
    "rank_world",
    "rank_zero_first",
    "tensor_checksum",
    "unsharded",
]


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


def global_token_normalizer(num_valid: torch.Tensor) -> torch.Tensor | None:
    """The ``normalizer=`` of ``kd_loss`` that makes R data-parallel ranks equal one process.

    Rank r has the loss sum ``S_r`` over its ``n_r`` valid tokens; the one-process loss over the
    global batch is ``sum_r S_r / N`` with ``N = sum_r n_r``. With ``normalizer = N / R`` the rank's
    loss is ``R S_r / N``, and DDP/FSDP, which average the gradients over the R ranks, apply
    ``(1/R) sum_r R grad(S_r) / N = grad(sum_r S_r) / N``: exactly the one-process gradient, also
    when the ranks hold different numbers of valid tokens (padding, ignored labels). Dividing by
    the local ``n_r`` instead would weight the tokens of a rank with fewer of them more.

    Every rank must call it (one all-reduce of one number; no host sync).

    Args:
        num_valid: this rank's number of valid (non-ignored) tokens, a scalar tensor of any
            numeric dtype, on the device of the loss.

    Returns:
        ``N / R`` as a float64 scalar tensor on ``num_valid``'s device, or None when not
        distributed or with one rank (``kd_loss`` then divides by the local count, which is ``N``).
    """
    if not isinstance(num_valid, torch.Tensor) or num_valid.numel() != 1:
        got = tuple(num_valid.shape) if isinstance(num_valid, torch.Tensor) else type(num_valid).__name__
        raise TypeError(
            f"global_token_normalizer: num_valid must be a one-element tensor (this rank's valid-token "
            f"count); got {got}."
        )
    if not is_distributed() or dist.get_world_size() == 1:
        return None
    total = (
        num_valid.detach().reshape(()).to(device=collective_device(num_valid.device), dtype=torch.float64, copy=True)
    )
    return (all_reduce_sum_(total) / dist.get_world_size()).to(num_valid.device)


# ---------------------------------------------------------------------------- launching
DIST_BACKENDS: tuple[str, ...] = ("auto", "gloo", "nccl")


def launched_by_torchrun() -> bool:
    """True when the ``torchrun`` environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) is set."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset or not an int)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_from_env(backend: str = "auto", *, force: bool = False) -> bool:
    """Initialise the default process group from ``torchrun``'s environment, if it asks for one.

    Does nothing when a group is already initialised, or when ``WORLD_SIZE <= 1`` (unless
    ``force``, which also initialises a 1-process group under ``torchrun --nproc_per_node=1``).

    Args:
        backend: ``"auto"`` (NCCL when CUDA is available, else gloo), ``"gloo"`` or ``"nccl"``.
            With NCCL the current CUDA device is set to ``LOCAL_RANK``. The collective timeout is
            ``DDK_DIST_TIMEOUT_MIN`` minutes (default 180), as rank 0 may build caches or train a
            teacher alone while the other ranks wait.
        force: initialise even when ``WORLD_SIZE`` is 1 (FSDP needs a process group).

    Returns:
        True when this call initialised the group (the caller then owns it and should call
        ``dist.destroy_process_group()``), else False.
    """
    fn = "init_from_env"
    if backend not in DIST_BACKENDS:
        raise ValueError(f"{fn}: backend must be one of {DIST_BACKENDS}; got {backend!r}.")
    if is_distributed() or not launched_by_torchrun() or (env_world_size() <= 1 and not force):
        return False
    if not dist.is_available():
        raise RuntimeError(
            f"{fn}: torch.distributed must be available to run under torchrun; got a torch build without it."
        )
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError(f"{fn}: backend 'nccl' needs CUDA; got no CUDA device (use --dist-backend gloo on CPU).")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # rank 0 may build caches or train a teacher alone while the others wait in a barrier: the
    # default collective timeout (10 min for NCCL) would kill such a run
    minutes = float(os.environ.get("DDK_DIST_TIMEOUT_MIN", "180"))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=minutes))
    return True


def barrier() -> None:
    """``dist.barrier()`` when distributed with more than one rank, else nothing."""
    if is_distributed() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled; small objects only); ``obj`` itself when not distributed."""
    if not is_distributed() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=collective_device() if dist.get_backend() == "nccl" else None)
    return box[0]


@contextmanager
def rank_zero_first() -> Iterator[None]:
    """Run the body on rank 0 first, then on the other ranks (e.g. building a shared cache once).

    Without a process group (or with one rank) it simply runs the body. If rank 0 fails inside
    the body, the other ranks wait at the barrier until the launcher stops them (``torchrun``
    does when one worker exits with an error).
    """
    rank, world = rank_world()
    if world > 1 and rank != 0:
        dist.barrier()
    yield
    if world > 1 and rank == 0:
        dist.barrier()


# ---------------------------------------------------------------------------- FSDP2
def is_fsdp(module: torch.nn.Module) -> bool:
    """True when ``module`` (or a submodule) was sharded with ``torch.distributed.fsdp.fully_shard``."""
    if not is_distributed():
        return False
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - old torch
        return False
    return any(isinstance(m, FSDPModule) for m in module.modules())


def is_fsdp_root(module: torch.nn.Module) -> bool:
    """True when ``fully_shard`` was applied to ``module`` itself (its own parameters are sharded
    and gathered by its forward hooks, so it must be called through ``forward``)."""
    if not is_distributed():
        return False
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - old torch
        return False
    return isinstance(module, FSDPModule)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or for a sharded ``DTensor`` the whole tensor (an all-gather on every rank)."""
    gather = getattr(t, "full_tensor", None)
    return gather() if callable(gather) else t


def local_bytes(module: torch.nn.Module) -> int:
    """Bytes of ``module``'s parameters held by this rank (a sharded ``DTensor`` counts its local shard)."""
    total = 0
    for p in module.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


@contextmanager
def unsharded(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Hold the full parameters of an FSDP2 module on every rank inside the body.

    Inside, forward passes run no collective, so ranks may run different numbers of them (the
    estimator's validation shards are uneven). Every rank must enter and leave together: the
    entry all-gathers, the exit frees the gathered parameters. The body leaves no trace in
    FSDP2's state: every group gets back the ``reshard_after_forward`` it had (``ddk distill
    --fsdp``'s groups all reshard; accelerate's FSDP2 keeps its output-layer group and its root
    gathered after the forward, where the fused loss reads the output layer), and the forwards of
    the body are dropped from the forward order FSDP2 prefetches the next backward by (uneven
    counts there would make the ranks' backward collectives differ). A ``module`` sharded itself
    (the root, as under accelerate) is set up as its first forward would set it up before
    anything is gathered (set up inside the body, the next backward crashed). A module without
    FSDP2 is yielded unchanged.

    Args:
        module: the model (``fully_shard`` applied to its blocks and to itself, or not at all).

    Yields:
        ``module``.
    """
    if not is_distributed():  # FSDP2 needs a process group; and the import below is not free
        yield module
        return
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - old torch
        yield module
        return
    mods = [m for m in module.modules() if isinstance(m, FSDPModule)]
    if not mods:
        yield module
        return
    if isinstance(module, FSDPModule):  # the root (accelerate's): set up as its first forward would, before any gather
        state = module._get_fsdp_state()
        if getattr(state, "_is_root", False) is None and callable(getattr(state, "_lazy_init", None)):
            state._lazy_init()
    restore = _fsdp_snapshot(mods)
    for m in mods:  # unshard() is not recursive: gather every sharded block, in the same order on every rank
        m.unshard()
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield module
    finally:
        for m in mods:
            m.reshard()
        if restore is not None:
            restore()
        else:  # a torch whose FSDP2 state is laid out otherwise: every group reshards, as ddk distill's
            for m in mods:
                m.set_reshard_after_forward(True, recurse=False)


def _fsdp_snapshot(mods: Sequence[Any]) -> Callable[[], None] | None:
    """A function putting back what FSDP2 (torch 2.13's private fields; there is no public getter)
    keeps of ``mods`` that forwards change: each state's reshard-after-forward (the root's automatic
    choice and every group's post-forward mesh) and the forward order recorded for the next
    backward's prefetches (each group's indices, each shared context's order). None when the state
    has no such fields. Modules sharded together (``fully_shard([a, b])``, as accelerate's
    output-layer group) share one state, taken once."""
    states: list[Any] = []
    for m in mods:
        state = m._get_fsdp_state()
        if all(state is not s for s in states):
            states.append(state)
    groups = [g for s in states for g in getattr(s, "_fsdp_param_groups", None) or ()]
    fields = ("post_forward_mesh_info", "_post_forward_indices", "comm_ctx")
    if not all(
        hasattr(s, "_auto_reshard_after_forward") and isinstance(getattr(s, "_fsdp_param_groups", None), list)
        for s in states
    ):
        return None
    if not all(all(hasattr(g, f) for f in fields) for g in groups):
        return None
    contexts: list[Any] = []
    for g in groups:
        if all(g.comm_ctx is not c for c in contexts):
            contexts.append(g.comm_ctx)
    if not all(isinstance(getattr(c, "post_forward_order", None), list) for c in contexts):
        return None
    autos = [s._auto_reshard_after_forward for s in states]
    meshes = [g.post_forward_mesh_info for g in groups]
    indices = [len(g._post_forward_indices) for g in groups]
    orders = [len(c.post_forward_order) for c in contexts]

    def restore() -> None:
        for g, mesh, n in zip(groups, meshes, indices):
            g.post_forward_mesh_info = mesh
            del g._post_forward_indices[n:]
        for s, auto in zip(states, autos):
            s._auto_reshard_after_forward = auto
            # the root's automatic choice, which its first forward makes (maybe one inside the body)
            if auto and getattr(s, "_is_root", None):
                for g in s._fsdp_param_groups:
                    g.post_forward_mesh_info = None
        for c, n in zip(contexts, orders):
            del c.post_forward_order[n:]

    return restore


# ---------------------------------------------------------------------------- debug checksums
def tensor_checksum(tensors: Iterable[torch.Tensor]) -> int:
    """A 63-bit hash of the bytes (and shapes and dtypes) of ``tensors``, in order.

    Bit-exact: two ranks get the same value only if every element is bitwise equal. It copies
    each tensor to the host (a sync): for debug checks, not for hot paths.

    Args:
        tensors: any shapes and dtypes (DTensors are hashed by their local shard).

    Returns:
        An int in ``[0, 2**63)``.
    """
    h = hashlib.blake2b(digest_size=8)
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor_checksum: tensors must hold torch.Tensor; got {type(t).__name__}.")
        local = t.to_local() if hasattr(t, "to_local") else t
        local = local.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{tuple(t.shape)}{t.dtype};".encode())
        h.update(local.view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def check_same_across_ranks(checksums: Mapping[str, int], *, where: str) -> None:
    """All-gather named checksums and raise if any rank's value differs from rank 0's.

    Every rank must call it with the same names in the same order (a no-op when not
    distributed).

    Args:
        checksums: ``name -> int`` (e.g. from ``tensor_checksum``), e.g. ``{"domain weights": ...}``.
        where: what the caller is doing, for the message (e.g. ``"distill step 50"``).

    Raises:
        RuntimeError: naming each quantity and the ranks whose value differs from rank 0's.
    """
    fn = "check_same_across_ranks"
    names = list(checksums)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in checksums.values()):
        raise TypeError(f"{fn}: checksums must map names to ints; got {checksums!r}.")
    if not is_distributed() or dist.get_world_size() == 1 or not names:
        return
    world = dist.get_world_size()
    local = torch.tensor([checksums[n] for n in names], dtype=torch.int64, device=collective_device())
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    table = torch.stack(gathered).cpu()  # (world, len(names))
    bad = []
    for j, name in enumerate(names):
        ranks = [r for r in range(world) if table[r, j] != table[0, j]]
        if ranks:
            bad.append(f"{name} differ on ranks {ranks} from rank 0")
    if bad:
        raise RuntimeError(
            f"{fn}: every rank must hold identical replicated state at {where}; got "
            + "; ".join(bad)
            + ". The ranks have diverged (a rank-dependent seed, data or code path); rerun with the same "
            "config on every rank and look for what the named ranks do differently."
        )
