"""Triton backend of the KD loss (GPU; on CPU only under ``TRITON_INTERPRET=1``, for tests).

Importing this package never imports Triton: it only says where the backend runs
(``is_available``); the kernels live in ``ddk_kernels.triton.kd_loss``, which
``ddk_kernels.dispatch`` imports on first use. ``TRITON_INTERPRET`` is read by Triton when a
kernel is decorated, so on CPU it must be set before that import (tests/conftest.py sets it).
"""

from __future__ import annotations

import importlib.util
import os

import torch

__all__ = ["is_available"]


def is_available(device: torch.device | str) -> tuple[bool, str]:
    """``(True, "")`` if the Triton backend runs on ``device``, else ``(False, reason)``.

    Runs when Triton is importable and either ``device`` is CUDA or it is the CPU with
    ``TRITON_INTERPRET=1`` (Triton's interpreter, slow, for tests only).
    """
    device = torch.device(device)
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install 'ddk[triton]')"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "torch has no usable CUDA device"
        return True, ""
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return True, ""
        return False, "on CPU only under TRITON_INTERPRET=1 (Triton's interpreter, for tests)"
    return False, f"device type {device.type!r} is not supported (CUDA only)"
