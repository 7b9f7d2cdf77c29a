"""ddk.zero3 without DeepSpeed: tensors and models that are not ZeRO-3 partitioned pass through
unchanged (the partitioned case runs in tests/ddk/integrations/test_deepspeed.py, 2 ranks)."""

from __future__ import annotations

import torch

from ddk.zero3 import is_partitioned, is_zero3, whole_parameter, whole_shape


def test_zero3_helpers_leave_a_plain_tensor_and_model_as_they_are():
    linear = torch.nn.Linear(5, 3)
    assert not is_partitioned(linear.weight) and not is_partitioned("weight")
    assert not is_zero3(linear)
    assert whole_shape(linear.weight) == torch.Size([3, 5])
    assert whole_parameter(linear.weight) is linear.weight
