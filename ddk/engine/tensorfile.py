"""safetensors files written one tensor at a time: the header from the shapes and dtypes first,
then each tensor's bytes straight from its memory (no copy of the whole file's contents, no
restriction on tensors that share memory). Used for the shards of a sharded checkpoint and for
the student streamed out of FSDP2 (``ddk.engine.sharded``, ``ddk.engine.export``); read back by
``safetensors`` itself."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import torch

from ddk._io import open_nofollow

__all__ = ["DTYPES", "header", "write_tensor", "write_tensors"]

#: safetensors' name of each dtype it stores
DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def header(specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length and the JSON header (padded with spaces to 8 bytes) of tensors ``(name,
    dtype, shape)`` laid out one after the other in that order."""
    head: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    start = 0
    for name, dtype, shape in specs:
        size = torch.empty(0, dtype=dtype).element_size()
        for n in shape:
            size *= int(n)
        head[name] = {"dtype": DTYPES[dtype], "shape": [int(n) for n in shape], "data_offsets": [start, start + size]}
        start += size
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_tensor(f: IO[bytes], t: torch.Tensor) -> None:
    """Append the bytes of ``t`` (a copy only when it is not contiguous or not on the CPU)."""
    t = t.detach().cpu().contiguous()
    f.write(t.reshape(-1).view(torch.uint8).numpy().data)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """``path`` holding ``tensors`` in their order, ``fsync``-ed (a link at ``path`` is an error)."""
    with open_nofollow(path, "wb", fn="write_tensors") as f:
        f.write(header(((k, v.dtype, tuple(v.shape)) for k, v in tensors.items()), metadata))
        for t in tensors.values():
            write_tensor(f, t)
        f.flush()
        os.fsync(f.fileno())
