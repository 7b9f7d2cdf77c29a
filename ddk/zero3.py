"""DeepSpeed ZeRO-3 partitioned parameters as the losses and the estimator read them.

Under ZeRO-3 each of the ``R`` ranks holds ``1/R`` of every parameter (``param.ds_tensor``). Hooks
around each module's forward (and backward) gather its parameters and free them afterwards, so
outside a forward a parameter's ``data`` is empty and its whole shape is ``param.ds_shape``
(parameters below ``stage3_param_persistence_threshold`` stay whole). The fused loss reads the
``lm_head`` weight after the model's forward (it never calls the ``lm_head`` on the hidden
states), so :func:`whole_parameter` gathers it: once per loss call, as a copy that lives until
the loss's backward. For a trained model (the student) the copy is differentiable back to the
partitioned parameter, which is gathered again just before its gradient is accumulated, so
ZeRO-3's own hook reduce-scatters that gradient as it does any other.

The FSDP2 counterparts are in ``ddk.distributed``; preparing a model with DeepSpeed is
``ddk.integrations.deepspeed``. ``deepspeed`` is imported only to gather: telling whether a tensor
or a model is ZeRO-3 partitioned does not import it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["is_partitioned", "is_zero3", "whole_parameter", "whole_shape"]


def is_partitioned(tensor: Any) -> bool:
    """True for a parameter managed by ZeRO-3 (it carries ``ds_id``), whole or partitioned right now."""
    return isinstance(tensor, torch.Tensor) and hasattr(tensor, "ds_id")


def is_zero3(module: nn.Module) -> bool:
    """True when ``module`` (a model or a DeepSpeed engine) holds ZeRO-3 managed parameters."""
    return any(is_partitioned(p) for p in module.parameters())


def whole_shape(tensor: torch.Tensor) -> torch.Size:
    """The whole shape of ``tensor``: ``ds_shape`` for a ZeRO-3 parameter (whose ``shape`` is empty
    while it is partitioned), else ``tensor.shape``."""
    return torch.Size(tensor.ds_shape) if is_partitioned(tensor) else tensor.shape  # type: ignore[attr-defined]


def _available(param: torch.Tensor) -> bool:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return param.ds_status == ZeroParamStatus.AVAILABLE  # type: ignore[attr-defined]


@contextlib.contextmanager
def _gathered(param: torch.Tensor) -> Iterator[None]:
    """``param`` whole inside (gathered on entry, freed on exit); a parameter whole already (in use
    by a forward, or persistent) is left as it is."""
    if _available(param):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([param]):
        yield


def _repartition(param: torch.Tensor) -> None:
    """Post-accumulate-grad hook (after ZeRO-3's reducing one): free a parameter that
    :class:`_ZeroWholeParameterFunction` gathered for the accumulation of its gradient."""
    if not getattr(param, "_ddk_repartition", False):
        return
    param._ddk_repartition = False  # type: ignore[attr-defined]
    # a module's backward may have gathered it too (a tied weight); ZeRO-3 frees it then
    if _available(param) and not param.ds_active_sub_modules:  # type: ignore[attr-defined]
        param.partition(param_list=[param], has_been_updated=False)  # type: ignore[attr-defined]


class _ZeroWholeParameterFunction(torch.autograd.Function):
    """``whole = gather(param)``, differentiable: the gradient of ``whole`` is ``param``'s.

    Backward gathers ``param`` before returning the gradient: autograd accumulates a gradient into
    a tensor of the parameter's current shape, and a partitioned one has none. The parameter is
    freed again after the accumulation, by :func:`_repartition`, registered after ZeRO-3's own hook
    (which reduce-scatters the gradient), so it runs after it.
    """

    @staticmethod
    def forward(ctx: Any, param: torch.Tensor) -> torch.Tensor:  # applied while param is whole
        ctx.param = param
        return param.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        param = ctx.param
        if not _available(param):
            param.all_gather(param_list=[param])
            param._ddk_repartition = True
            if not hasattr(param, "_ddk_repartition_hook"):
                param._ddk_repartition_hook = param.register_post_accumulate_grad_hook(_repartition)
        return grad


def whole_parameter(param: torch.Tensor) -> torch.Tensor:
    """The whole of a ZeRO-3 parameter, gathered once, as a new tensor of shape ``whole_shape(param)``.

    With gradients enabled and ``param.requires_grad`` (the student's output layer in training),
    the result is differentiable: its gradient reaches ``param`` and ZeRO-3 reduce-scatters it.
    Otherwise (the teacher; evaluation) it is a detached copy. Every rank must call it together
    (an all-gather). A tensor that is not a ZeRO-3 parameter is returned as it is.
    """
    if not is_partitioned(param):
        return param
    # applied while whole: autograd checks the gradient against the shape the input had then
    with _gathered(param):
        if torch.is_grad_enabled() and param.requires_grad:
            return _ZeroWholeParameterFunction.apply(param)
        return param.detach().clone()
