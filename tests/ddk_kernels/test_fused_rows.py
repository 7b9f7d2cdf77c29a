"""The torch row implementation of the fused path (``ddk_kernels/fused_rows.py``): one code path
for any tiling, which reuses sweep 1's exponentials when one tile spans the vocabulary."""

from __future__ import annotations

import pytest
import torch
from fused_cases import make_case
from kd_cases import DIVERGENCE_CASES

from ddk_kernels.fused_rows import ChunkTiles, chunk_rows, linear_tile
from ddk_kernels.types import KDConfig, TeacherInputs


def _chunk(vocab_tile: int, cfg: KDConfig, case, need_grad: bool = True):  # type: ignore[no-untyped-def]
    valid = case.labels != -100
    h, lab = case.h[valid], case.labels[valid]
    zlab = (h * case.w[lab]).sum(1)
    seen: list[tuple[int, int]] = []
    tiles = ChunkTiles(h, case.w, None, TeacherInputs(logits=case.tl[valid].clone()), vocab_tile, seen.append)
    dh = torch.zeros_like(h) if need_grad else None
    dw = torch.zeros_like(case.w) if need_grad else None
    w_ce, w_kd = torch.tensor(0.25, dtype=h.dtype), torch.tensor(0.1, dtype=h.dtype)
    ce, kd = chunk_rows(tiles, lab, zlab, cfg, (w_ce, w_kd), (dh, dw, None))
    return ce, kd, dh, dw, seen


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES)
def test_chunk_rows_one_tile_equals_many_tiles(temperature: float, divergence: str, beta: float) -> None:
    """The whole-vocabulary tile (in place, reused exponentials) and 7-column tiles (recomputed)
    give the same rows and gradients."""
    case = make_case(11, 6, 6, 45, seed=21, teacher_as_logits=True)
    cfg = KDConfig(temperature=temperature, divergence=divergence, beta=beta)
    one, many = _chunk(45, cfg, case), _chunk(7, cfg, case)
    for a, b in zip(one[:4], many[:4]):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)
    kl = cfg.effective_divergence != "jsd"
    assert len(one[4]) == 1 and len(many[4]) == 7 * (2 if kl else 3)  # one tile: computed once; JSD: one more sweep


def test_chunk_rows_leaves_shared_teacher_logits_intact_across_sweeps() -> None:
    """Multi-tile sweeps read the chunk's teacher logits again, so nothing may change them in place."""
    case = make_case(9, 5, 5, 30, seed=22, teacher_as_logits=True, masked_fraction=0.0)
    logits = case.tl.clone()
    tiles = ChunkTiles(case.h, case.w, None, TeacherInputs(logits=logits), 8)
    zlab = (case.h * case.w[case.labels]).sum(1)
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        chunk_rows(
            tiles,
            case.labels,
            zlab,
            KDConfig(temperature=2.0, divergence=divergence),
            (torch.tensor(1.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)),
            (torch.zeros_like(case.h), None, None),
        )
        assert torch.equal(logits, case.tl)


def test_linear_tile_upcasts_low_precision_weights() -> None:
    x = torch.randn(3, 8, dtype=torch.float32)
    w = torch.randn(10, 8).to(torch.bfloat16)
    b = torch.randn(10).to(torch.bfloat16)
    out = linear_tile(x, w, b, 2, 9)
    assert out.dtype == torch.float32 and out.shape == (3, 7)
    torch.testing.assert_close(out, x @ w[2:9].float().T + b[2:9].float())
