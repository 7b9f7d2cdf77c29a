"""Devices and many processes for ``ddk distill``: the device of a rank, DDP / FSDP2 wrapping of the
training step, full (unsharded) train state for checkpoints, sums over ranks for the logs."""

from __future__ import annotations

import inspect
from typing import Any, cast

import torch
import torch.distributed as dist

from ddk.distributed import all_reduce_sum_, is_distributed, rank_world
from ddk.engine.config import RunConfig

__all__ = [
    "device_for",
    "full_student_state",
    "global_sums",
    "load_train_state",
    "parallelize",
    "shard_teacher",
    "train_state",
]


def device_for(cfg: RunConfig) -> torch.device:
    """Where this process distills: ``cuda:<LOCAL_RANK>`` under an NCCL process group, the CPU
    under a gloo one; one process follows ``cfg.device`` (``auto``: ``cuda:0`` when CUDA is
    available, else the CPU)."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "distill: device must be 'cpu' or 'auto' without a CUDA device; got 'cuda' "
            "(torch.cuda.is_available() is False)."
        )
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", 0)
    return torch.device("cpu")


def _decoder_layers(model: torch.nn.Module, role: str = "student") -> list[torch.nn.Module]:
    """The repeated blocks of a transformers causal LM (``model.layers``, GPT-2's ``transformer.h``)."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else model
    for name in ("layers", "h", "blocks"):
        layers = getattr(decoder, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return list(layers)
    raise ValueError(
        f"distill: fsdp needs the {role}'s decoder blocks (decoder.layers or .h); got none in "
        f"{type(model).__name__}. Drop --fsdp to use DDP."
    )


def _fully_shard() -> Any:
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as exc:  # pragma: no cover - torch < 2.6
        raise ValueError(
            f"distill: fsdp needs torch.distributed.fsdp.fully_shard (FSDP2, torch >= 2.6); "
            f"got torch {torch.__version__} without it ({exc}). Drop --fsdp to use DDP."
        ) from None
    return fully_shard


def shard_teacher(teacher: torch.nn.Module, offload: bool = False) -> torch.nn.Module:
    """Shard the frozen teacher over the ranks with FSDP2, in place; return it.

    Every decoder block is its own group, gathered for its forward and freed after it, so a rank
    holds ``1/R`` of the teacher plus one block at a time. The root group (embeddings, final
    norm, output layer) is gathered by the teacher's forward and kept until the loss has read the
    output layer; ``ddk.losses.causal_lm`` frees it after each call (one gather per step). No
    gradients, no optimizer state. Every rank must run the same number of teacher forwards (the
    estimator pads uneven validation shards with forwards whose result it drops).

    Args:
        teacher: the frozen teacher (a transformers causal LM with ``decoder.layers`` or ``.h``).
        offload: FSDP2's ``CPUOffloadPolicy`` on every group: each rank's shards (``1/R`` of the
            teacher) stay in host memory, pinned when the ranks train on CUDA (NCCL), and each
            group's shard is copied to the device when the group is gathered; the device then holds
            only the gathered groups. Pass the teacher still in host memory: FSDP2 moves one group
            at a time to the device while it shards it (a teacher placed on the GPU first would
            have to fit there whole). The gathered weights, and so the results, are the same.
    """
    fully_shard = _fully_shard()
    kw: dict[str, Any] = {}
    if offload:
        from torch.distributed.fsdp import CPUOffloadPolicy

        pin = torch.cuda.is_available() and dist.get_backend() == "nccl"  # pinned memory needs CUDA
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=pin)
    for layer in _decoder_layers(teacher, "teacher"):
        fully_shard(layer, reshard_after_forward=True, **kw)
    fully_shard(teacher, reshard_after_forward=False, **kw)
    return teacher


def parallelize(
    step: torch.nn.Module,
    student: torch.nn.Module,
    cfg: RunConfig,
    device: torch.device,
    teacher: torch.nn.Module | None = None,
) -> torch.nn.Module:
    """Prepare the training step module for torch.distributed; return the module the loop calls.

    ``step`` holds the student as a submodule (and the teacher outside its parameters), so one
    forward of ``step`` touches every student parameter, ``lm_head`` included, which DDP and FSDP2
    need to reduce the gradients of a loss that reads the ``lm_head`` weight directly.

    * one process: ``step`` itself;
    * ``cfg.fsdp``: FSDP2 in place (``fully_shard`` on every decoder block, then on ``step``, the
      root, with ``reshard_after_forward=True``), and the ``teacher``, when given, sharded too
      (:func:`shard_teacher`; its shards in host memory with ``cfg.teacher_offload == "cpu"``);
    * else DDP without buffer syncs in forward (the student's buffers are constants, and the
      estimator runs uneven numbers of forwards on the bare student, which must start no collective),
      its gradients views into its all-reduce buckets (no second copy of the gradients).

    DDP and FSDP2 average the gradients over the ranks; the loop scales each rank's loss to match.
    """
    _, world = rank_world()
    if cfg.fsdp:
        fully_shard = _fully_shard()
        for layer in _decoder_layers(student):
            fully_shard(layer, reshard_after_forward=True)
        fully_shard(step, reshard_after_forward=True)
        if teacher is not None:
            shard_teacher(teacher, offload=cfg.teacher_offload == "cpu")
        return step
    if world == 1:
        return step
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:  # newer torch
        return DistributedDataParallel(step, device_ids=ids, forward_sync_buffers=False, gradient_as_bucket_view=True)
    return DistributedDataParallel(step, device_ids=ids, broadcast_buffers=False, gradient_as_bucket_view=True)


def train_state(
    step: torch.nn.Module, student: torch.nn.Module, opt: torch.optim.Optimizer, fsdp: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(student state, optimizer state)`` to checkpoint; with FSDP2 the full (unsharded) ones, on rank 0 (a collective)."""
    if not fsdp:
        return student.state_dict(), opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(step, options=options), get_optimizer_state_dict(step, opt, options=options)


def load_train_state(
    step: torch.nn.Module, student: torch.nn.Module, opt: torch.optim.Optimizer, ck: dict[str, Any], fsdp: bool
) -> None:
    """Inverse of :func:`train_state` (with FSDP2 every rank reads the full state and keeps its shard)."""
    if not fsdp:
        student.load_state_dict(ck["student"])
        opt.load_state_dict(ck["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(step, ck["student"], options=options)
    set_optimizer_state_dict(step, opt, ck["optimizer"], options=options)


def full_student_state(step: torch.nn.Module, student: torch.nn.Module, fsdp: bool) -> dict[str, torch.Tensor] | None:
    """The student's full state dict (keys of ``student.state_dict()``), on rank 0; None on the others.

    With FSDP2 every rank must call it (the full state is gathered)."""
    rank, _ = rank_world()
    if not fsdp:
        return student.state_dict() if rank == 0 else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(step, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return None
    prefix = "student."
    # full_state_dict (gathered, cpu-offloaded) holds the plain tensors of the model, no DTensors
    return {k[len(prefix) :]: cast(torch.Tensor, v) for k, v in state.items() if k.startswith(prefix)}


def global_sums(lo: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ce_sum, kd_sum, num_tokens, domain_tokens (D,))`` of a ``KDLossOutput``, summed over ranks (for the logs)."""
    if rank_world()[1] == 1:
        return lo.ce_sum, lo.kd_sum, lo.num_tokens, lo.domain_tokens
    v = torch.cat(
        [torch.stack([lo.ce_sum.double(), lo.kd_sum.double(), lo.num_tokens.double()]), lo.domain_tokens.double()]
    )
    all_reduce_sum_(v)
    return v[0], v[1], v[2], v[3:].round().long()
