"""Tests of ddk/integrations/distributed.py (multi-rank use is covered by the estimator's gloo test)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist

from ddk.integrations import all_reduce_sum_, collective_device, is_distributed, rank_world


def test_distributed_helpers_without_process_group() -> None:
    assert not is_distributed()
    assert rank_world() == (0, 1)
    t = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert all_reduce_sum_(t) is t and t.tolist() == [1.0, 2.0]
    assert collective_device() == torch.device("cpu")
    assert collective_device("cpu") == torch.device("cpu")


def test_all_reduce_sum_rejects_non_tensor() -> None:
    with pytest.raises(TypeError, match=r"all_reduce_sum_: tensor must be a torch.Tensor; got list\."):
        all_reduce_sum_([1.0])  # type: ignore[arg-type]


def test_distributed_helpers_single_rank_gloo_group() -> None:
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        assert is_distributed()
        assert rank_world() == (0, 1)
        t = torch.ones(2, 2, dtype=torch.float64)
        assert all_reduce_sum_(t) is t and t.sum().item() == 4.0
        assert collective_device(None) == torch.device("cpu")
    finally:
        dist.destroy_process_group()
    assert not is_distributed()
