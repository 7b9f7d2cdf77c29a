"""Parameter and result types of ddk_kernels (``ddk_kernels/types.py``)."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import torch

from ddk_kernels.types import (
    DIVERGENCE_CODES,
    DIVERGENCES,
    Divergence,
    KDConfig,
    KDLossParams,
    TeacherInputs,
    acc_dtype,
)


def test_divergence_literal_lists_the_divergences() -> None:
    assert typing.get_args(Divergence) == DIVERGENCES == tuple(DIVERGENCE_CODES)
    assert sorted(DIVERGENCE_CODES.values()) == [0, 1, 2]


@pytest.mark.parametrize(
    ("divergence", "beta", "effective", "code"),
    [
        ("forward_kl", 0.0, "forward_kl", 0),
        ("reverse_kl", 1.0, "reverse_kl", 1),
        ("jsd", 0.5, "jsd", 2),
        ("jsd", 0.0, "forward_kl", 0),
        ("jsd", 1.0, "reverse_kl", 1),
        ("jsd", 1e-12, "jsd", 2),
    ],
)
def test_kd_config_effective_divergence_and_code(
    divergence: Divergence, beta: float, effective: str, code: int
) -> None:
    cfg = KDConfig(divergence=divergence, beta=beta)
    assert cfg.effective_divergence == effective and cfg.code == code


def test_kd_config_and_params_are_frozen_and_hashable() -> None:
    cfg = KDConfig(temperature=2.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.temperature = 1.0  # type: ignore[misc]
    params = KDLossParams(cfg, gamma=0.3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.gamma = 1.0  # type: ignore[misc]
    assert hash(cfg) == hash(KDConfig(temperature=2.0)) and params == KDLossParams(KDConfig(temperature=2.0), gamma=0.3)


@pytest.mark.parametrize(("t2_scale", "scale"), [(False, 1.0), (True, 6.25)])
def test_kd_loss_params_kd_scale_and_weight(t2_scale: bool, scale: float) -> None:
    params = KDLossParams(KDConfig(temperature=2.5), gamma=0.4, t2_scale=t2_scale)
    assert params.kd_scale == scale
    assert params.kd_weight == pytest.approx(0.4 * scale)
    assert KDLossParams().kd_weight == 0.2 and KDLossParams().normalizer is None


def test_teacher_inputs_detached_drops_autograd_not_data() -> None:
    h = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(5, 4, requires_grad=True)
    t = TeacherInputs(hidden=h * 2, weight=w).detached()
    assert t.logits is None and not t.hidden.requires_grad and not t.weight.requires_grad
    assert t.weight.data_ptr() == w.data_ptr()
    torch.testing.assert_close(t.hidden, (h * 2).detach())


@pytest.mark.parametrize(
    ("dtype", "acc"),
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float64, torch.float64),
    ],
)
def test_acc_dtype(dtype: torch.dtype, acc: torch.dtype) -> None:
    assert acc_dtype(dtype) == acc
