"""DeepSpeed ZeRO-3 for ``DDKTrainer``: the frozen teacher as a sharded inference engine.

Under ZeRO-3 (``DDKConfig(deepspeed=...)`` with ``zero_optimization.stage`` 3) the student is a
DeepSpeed engine built by accelerate; :func:`prepare_zero3_teacher` makes the teacher one too, of
the student's configuration without optimizer, so each rank holds ``1/R`` of it. The fused loss
reads both output layers whole through ``ddk.zero3.whole_parameter``.

``deepspeed`` is imported only by :func:`prepare_zero3_teacher`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from torch import nn

__all__ = ["prepare_zero3_teacher", "zero3_enabled", "zero3_teacher_config"]

#: ``zero_optimization`` fields whose ``"auto"`` transformers derives from the model's hidden size
#: (``HfTrainerDeepSpeedConfig.trainer_config_finalize``, which runs for the student only, at ``train()``)
_HIDDEN_SIZE_AUTO = {
    "reduce_bucket_size": lambda h: h * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
}


def zero3_enabled(accelerator: Any) -> bool:
    """True when ``accelerator`` (accelerate's) runs DeepSpeed with ZeRO stage 3."""
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    return plugin is not None and getattr(plugin, "zero_stage", None) == 3


def _hidden_size(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    sizes = getattr(cfg, "hidden_sizes", None)
    if sizes:
        return int(max(sizes))
    size = getattr(cfg, "hidden_size", None)
    return int(size) if isinstance(size, int) else None


def _drop_auto(section: dict[str, Any]) -> dict[str, Any]:
    """``section`` without the ``"auto"`` values left (DeepSpeed's defaults apply), recursively."""
    return {k: _drop_auto(v) if isinstance(v, dict) else v for k, v in section.items() if v != "auto"}


def zero3_teacher_config(config: Mapping[str, Any], teacher: nn.Module) -> dict[str, Any]:
    """The DeepSpeed configuration of the frozen teacher's inference engine, from the student's.

    The student's ZeRO-3 configuration (batch sizes, precision, ``zero_optimization``), without its
    ``optimizer`` and ``scheduler`` and without ``offload_optimizer`` (the teacher has no optimizer
    state); the ``zero_optimization`` sizes left ``"auto"`` that transformers derives from the
    hidden size are derived from the teacher's (``hidden_size`` x ``hidden_size`` bucket,
    0.9 x that prefetch, ``10 * hidden_size`` persistence threshold); any other ``"auto"`` left
    is dropped, so DeepSpeed's default applies.

    Args:
        config: the student's DeepSpeed configuration (``accelerator.state.deepspeed_plugin.deepspeed_config``).
        teacher: the teacher model (its ``config.hidden_size`` or ``hidden_sizes``).

    Returns:
        A new dict; ``config`` is not changed.

    Examples:
        >>> import transformers
        >>> cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        ...                                num_attention_heads=2, num_key_value_heads=2, vocab_size=64)
        >>> student_cfg = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW"},
        ...                "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto",
        ...                                      "offload_optimizer": {"device": "cpu"}}}
        >>> zero3_teacher_config(student_cfg, transformers.LlamaForCausalLM(cfg))
        {'train_micro_batch_size_per_gpu': 2, 'zero_optimization': {'stage': 3, 'reduce_bucket_size': 256}}
    """
    cfg = copy.deepcopy(dict(config))
    for key in ("optimizer", "scheduler"):
        cfg.pop(key, None)
    zero = dict(cfg.get("zero_optimization") or {})
    zero.pop("offload_optimizer", None)
    hidden = _hidden_size(teacher)
    if hidden is not None:
        for key, size in _HIDDEN_SIZE_AUTO.items():
            if zero.get(key) == "auto":
                zero[key] = size(hidden)
    cfg["zero_optimization"] = zero
    return _drop_auto(cfg)


def prepare_zero3_teacher(teacher: nn.Module, accelerator: Any) -> nn.Module:
    """The frozen ``teacher`` as a DeepSpeed ZeRO-3 inference engine, sharded over the ranks; eval mode.

    The engine has no optimizer: each rank holds ``1/R`` of the teacher's parameters, and each
    forward gathers one module's parameters at a time and frees them after it. A teacher loaded
    under ``deepspeed.zero.Init`` (``from_pretrained`` once a ZeRO-3 ``DDKConfig`` exists) is never
    whole on any rank. Every rank must run the same number of teacher forwards (the trainer's
    steps do; the estimator pads uneven validation shards with forwards whose result it drops).

    Args:
        teacher: the teacher; frozen (``requires_grad_(False)``) and put in eval mode here.
        accelerator: the trainer's accelerate ``Accelerator`` running DeepSpeed ZeRO-3.

    Returns:
        The ``deepspeed.DeepSpeedEngine`` wrapping ``teacher`` (the model is its ``.module``).
    """
    import deepspeed

    teacher.requires_grad_(False)
    config = zero3_teacher_config(accelerator.state.deepspeed_plugin.deepspeed_config, teacher)
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    return engine
