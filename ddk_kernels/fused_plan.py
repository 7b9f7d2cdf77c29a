"""How the fused ``lm_head`` + KD loss is tiled: memory probing, the options and the tiling plan.

Strategies (``plan_fused``):

* ``"token_chunks"``: the vocabulary tile is the whole vocabulary, so each chunk's ``(chunk, V)``
  logits are computed once and serve every sweep (no recompute); memory
  ``~ 8 * chunk * V * 4`` bytes.
* ``"recompute"``: vocabulary tiles of at most 2048 columns, recomputed in each sweep (student and
  teacher matmuls run 2x, 3x for JSD); memory ``~ 8 * chunk * tile * 4`` bytes.
* ``"gemm"``: token chunks whose logits are computed by one matmul each in the input dtype, then
  the per-row kernels of the logits backends (``ddk_kernels.fused_gemm``); memory
  ``~ 3 * chunk * V * elem`` bytes; the workspace is ``min(max(available / 16, 64 MiB), 1 GiB)``.
* ``"auto"``: ``gemm`` on CUDA when hidden and weight share a dtype; else ``token_chunks`` when a
  workspace of ``min(max(available / 16, 32 MiB), 256 MiB)`` (available = ``/proc/meminfo``
  MemAvailable on CPU, ``torch.cuda.mem_get_info`` free on GPU) holds chunks of at least 32 tokens
  (or all tokens); ``recompute`` otherwise. On CPU the recompute sweeps cost +50% matmul FLOPs
  while token_chunks at 32 rows costs only the extra read-modify-write of ``d weight`` per chunk,
  so recompute is kept for tight memory.

Examples:
    >>> plan_fused(50, 128256, workspace_bytes=256 << 20)
    FusedPlan(strategy='token_chunks', token_chunk=50, vocab_tile=128256)
    >>> plan_fused(4096, 128256, workspace_bytes=32 << 20).strategy
    'recompute'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "STRATEGIES",
    "FusedOptions",
    "FusedPlan",
    "Strategy",
    "available_memory_bytes",
    "default_workspace_bytes",
    "gemm_workspace_bytes",
    "plan_fused",
]

Strategy = Literal["auto", "recompute", "token_chunks", "gemm"]
STRATEGIES: tuple[Strategy, ...] = ("auto", "recompute", "token_chunks", "gemm")

_MiB = 1 << 20
_TC_BUFFERS = 8  # live (chunk, V) float buffers of the token_chunks strategy (measured: <= 8)
_RC_BUFFERS = 8  # live (chunk, tile) buffers of the recompute strategy
_RC_VOCAB_TILE = 2048  # vocabulary tile of the recompute strategy
_MIN_TC_ROWS = 32  # below this many rows per chunk the thin matmuls and dW traffic cost more than recompute
_GEMM_BUFFERS = 3  # live (chunk, V) buffers of the gemm strategy: zS, zT, d zS
_GEMM_MAX_WORKSPACE = 1 << 30
_GEMM_MIN_WORKSPACE = 64 * _MiB
_GEMM_ROW_ALIGN = 64  # chunks are multiples of this many rows (matmul tiles) when more fit


@dataclass(frozen=True)
class FusedPlan:
    """How one call is tiled.

    Attributes:
        strategy: ``"token_chunks"`` (vocab tile = V, logits computed once per chunk),
            ``"recompute"`` (vocab tiles recomputed in every sweep) or ``"gemm"`` (vocab tile =
            V, logits in the input dtype, per-row kernels of the logits backends).
        token_chunk: tokens per chunk (>= 1).
        vocab_tile: vocabulary columns per tile (== V for token_chunks and gemm).
    """

    strategy: Strategy
    token_chunk: int
    vocab_tile: int


@dataclass(frozen=True)
class FusedOptions:
    """Tiling options of the fused backends (validated by ``fused_linear_kd_loss``).

    Attributes:
        strategy: see ``plan_fused``.
        workspace_bytes: scratch budget of the tiles; None: ``default_workspace_bytes`` (or
            ``gemm_workspace_bytes`` for ``gemm``) of the device.
        plan: an explicit tiling (tests); overrides ``strategy`` and ``workspace_bytes``.
        tile_observer: called with the ``(rows, columns)`` shape of every logits tile the fused
            path allocates (tests check that no ``(N, V)`` tile exists).
    """

    strategy: Strategy = "auto"
    workspace_bytes: int | None = None
    plan: FusedPlan | None = None
    tile_observer: Callable[[tuple[int, int]], None] | None = None


def available_memory_bytes(device: torch.device | str) -> int | None:
    """Free memory of ``device``: ``MemAvailable`` of ``/proc/meminfo`` on CPU, free bytes of
    ``torch.cuda.mem_get_info`` on CUDA, None when unknown."""
    device = torch.device(device)
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cpu":
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
    except (OSError, RuntimeError, ValueError):
        return None
    return None


def default_workspace_bytes(device: torch.device | str) -> int:
    """Scratch memory the fused path may use: ``available / 16`` clamped to [32 MiB, 256 MiB]."""
    avail = available_memory_bytes(device)
    if avail is None:
        return 256 * _MiB
    return int(min(max(avail // 16, 32 * _MiB), 256 * _MiB))


def gemm_workspace_bytes(device: torch.device | str) -> int:
    """Scratch memory of the ``gemm`` strategy: ``available / 16`` clamped to [64 MiB, 1 GiB]."""
    avail = available_memory_bytes(device)
    if avail is None:
        return _GEMM_MAX_WORKSPACE // 4
    return int(min(max(avail // 16, _GEMM_MIN_WORKSPACE), _GEMM_MAX_WORKSPACE))


def plan_fused(
    num_tokens: int,
    vocab: int,
    *,
    compute_bytes: int = 4,
    strategy: Strategy = "auto",
    workspace_bytes: int | None = None,
    device: torch.device | str = "cpu",
    input_bytes: int | None = None,
    gemm_ok: bool = False,
) -> FusedPlan:
    """Choose strategy, token chunk and vocabulary tile (the heuristic of the module docstring).

    Args:
        num_tokens: valid (non-ignored) tokens N.
        vocab: student vocabulary V.
        compute_bytes: bytes per element of the compute dtype (4, or 8 for float64).
        strategy: ``"auto"``, ``"recompute"``, ``"token_chunks"`` or ``"gemm"``.
        workspace_bytes: scratch budget; default ``default_workspace_bytes(device)``
            (``gemm_workspace_bytes(device)`` for ``gemm``).
        device: where the budget is measured; ``"auto"`` picks ``gemm`` on CUDA.
        input_bytes: bytes per element of the inputs (the ``gemm`` logits); default
            ``compute_bytes``.
        gemm_ok: whether ``gemm`` can run (hidden and weight share a dtype); ``"auto"`` only
            picks it then.

    Returns:
        ``FusedPlan``; ``token_chunk * vocab_tile * compute_bytes * 8 <= workspace`` whenever the
        budget allows one row (an explicit ``"token_chunks"`` always gets at least one row).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"fused_linear_kd_loss: strategy must be one of {STRATEGIES}; got {strategy!r}.")
    n = max(1, num_tokens)
    if strategy == "auto" and gemm_ok and torch.device(device).type == "cuda":
        strategy = "gemm"
    if strategy == "gemm":
        ws = int(workspace_bytes) if workspace_bytes is not None else gemm_workspace_bytes(device)
        rows = ws // (_GEMM_BUFFERS * vocab * (input_bytes or compute_bytes))
        if rows >= 2 * _GEMM_ROW_ALIGN:
            rows -= rows % _GEMM_ROW_ALIGN
        return FusedPlan("gemm", max(1, min(n, rows)), vocab)
    ws = int(workspace_bytes) if workspace_bytes is not None else default_workspace_bytes(device)
    tc_rows = ws // (_TC_BUFFERS * vocab * compute_bytes)
    if strategy == "auto":
        strategy = "token_chunks" if tc_rows >= min(n, _MIN_TC_ROWS) else "recompute"
    if strategy == "token_chunks":
        return FusedPlan("token_chunks", max(1, min(n, tc_rows)), vocab)
    tile = min(vocab, _RC_VOCAB_TILE)
    rows = ws // (_RC_BUFFERS * tile * compute_bytes)
    if rows < 16 and tile > 16:  # tiny budget: narrower tiles rather than single-token chunks
        tile = max(16, ws // (_RC_BUFFERS * 16 * compute_bytes))
        tile = min(vocab, tile)
        rows = ws // (_RC_BUFFERS * tile * compute_bytes)
    return FusedPlan("recompute", max(1, min(n, rows)), tile)
