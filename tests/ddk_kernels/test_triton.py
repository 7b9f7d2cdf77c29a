"""What is specific to the Triton backend (ddk_kernels/triton/kd_loss.py): its vocabulary tile
``block_v``, scalar arguments, statistics layout, launchers and lowering for sm_90. Its oracle
suite is tests/ddk_kernels/test_kd_rows.py.

Without CUDA the kernels run under Triton's interpreter on CPU tensors (tests/conftest.py sets
``TRITON_INTERPRET=1`` before anything imports them; slow: small shapes only); with CUDA the same
tests run compiled on the GPU, plus the ``gpu``-marked ones.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

pytest.importorskip("triton")

from kd_cases import DEVICE, DIVERGENCE_CASES, check_row_losses, oracle_grad, realistic_logits

from ddk_kernels import triton as kd_triton
from ddk_kernels.triton.kd_loss import kd_backward_triton, kd_forward_triton, row_losses
from ddk_kernels.types import KDConfig

# The interpreter warns about the inf/nan produced (and discarded by tl.where) on masked columns.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _tiled(block_v: int | None):  # type: ignore[no-untyped-def]
    return functools.partial(row_losses, block_v=block_v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES)
def test_row_losses_small_tiles_match_oracle(divergence, beta, temperature, dtype):
    # V = 37 with 16-wide tiles: three tiles, the last one partial; the teacher is a column slice
    # of a wider tensor (row stride 40 > V), read in place.
    cfg = KDConfig(temperature=temperature, divergence=divergence, beta=beta)
    zs, zt, labels = realistic_logits(6, 37, seed=3, dtype=dtype, teacher_extra_cols=3)
    labels[1] = cfg.ignore_index
    check_row_losses(_tiled(16), zs, zt, labels, cfg)


@pytest.mark.parametrize("vocab,block_v", [(1, None), (7, None), (257, 64), (300, None)])
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_row_losses_odd_vocab_and_tiles(vocab, block_v, divergence, beta):
    cfg = KDConfig(temperature=2.0, divergence=divergence, beta=beta)
    zs, zt, labels = realistic_logits(4, vocab, seed=vocab, teacher_extra_cols=5)
    check_row_losses(_tiled(block_v), zs, zt, labels, cfg)


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_row_losses_float64_scalars_not_rounded_to_float32(divergence):
    """beta = 0.7 and 1/T = 1/0.7 are not float32 numbers: float64 rows must see them unrounded
    (as plain kernel arguments Triton would pass them as float32, a 1e-8 relative error)."""
    cfg = KDConfig(temperature=0.7, divergence=divergence, beta=0.7)
    zs, zt, labels = realistic_logits(3, 70, seed=5, dtype=torch.float64, masked_fraction=0.0)
    check_row_losses(_tiled(32), zs, zt, labels, cfg)


def test_row_losses_stats_are_row_logsumexps():
    # Pins the stats layout shared with the CUDA op ddk::kd_fwd: [lse(zS/T), lse(zT/T), lse(zS), extra].
    zs, zt, labels = realistic_logits(4, 45, seed=17, dtype=torch.float64, masked_fraction=0.0)
    for divergence, beta in (("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.4)):
        cfg = KDConfig(temperature=2.0, divergence=divergence, beta=beta)
        ce, kd, stats = kd_forward_triton(zs.to(DEVICE), zt[:, :45].to(DEVICE), labels.to(DEVICE), cfg, 16)
        stats = stats.cpu()
        assert stats.shape == (4, 4) and stats.dtype == torch.float64
        torch.testing.assert_close(stats[:, 0], torch.logsumexp(zs / 2.0, -1))
        torch.testing.assert_close(stats[:, 1], torch.logsumexp(zt[:, :45] / 2.0, -1))
        torch.testing.assert_close(stats[:, 2], torch.logsumexp(zs, -1))
        log_q = torch.log_softmax(zs / 2.0, -1)
        log_p = torch.log_softmax(zt[:, :45] / 2.0, -1)
        if divergence == "forward_kl":
            expected = torch.zeros(4, dtype=torch.float64)
        elif divergence == "reverse_kl":  # E_q[s - t]
            expected = (log_q.exp() * (zs - zt[:, :45]) / 2.0).sum(-1)
        else:
            log_m = torch.logaddexp(
                log_p + torch.log(torch.tensor(beta, dtype=torch.float64)),
                log_q + torch.log1p(torch.tensor(-beta, dtype=torch.float64)),
            )
            expected = (log_q.exp() * (log_q - log_m)).sum(-1)
        torch.testing.assert_close(stats[:, 3], expected)


def test_kd_backward_triton_only_ce_or_only_kd():
    cfg = KDConfig(divergence="reverse_kl", temperature=2.0)
    zs, zt, labels = realistic_logits(3, 20, seed=23, dtype=torch.float64)
    dev = [t.to(DEVICE) for t in (zs, zt, labels)]
    _, _, stats = kd_forward_triton(*dev, cfg, 16)
    ones, zeros = torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    g_ce = kd_backward_triton(*dev, stats, ones.to(DEVICE), zeros.to(DEVICE), cfg, 16).cpu()
    g_kd = kd_backward_triton(*dev, stats, zeros.to(DEVICE), ones.to(DEVICE), cfg, 16).cpu()
    torch.testing.assert_close(g_ce, oracle_grad(zs, zt, labels, ones, zeros, cfg))
    torch.testing.assert_close(g_kd, oracle_grad(zs, zt, labels, zeros, ones, cfg))


def test_kd_forward_triton_rejects_bad_block_v():
    zs, zt, labels = realistic_logits(2, 8, seed=1)
    with pytest.raises(ValueError, match="block_v must be a power of two >= 16; got 24"):
        kd_forward_triton(zs.to(DEVICE), zt.to(DEVICE), labels.to(DEVICE), KDConfig(), 24)


def test_is_available_reports_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, reason = kd_triton.is_available("cpu")
    assert not ok and "TRITON_INTERPRET=1" in reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kd_triton.is_available("cpu") == (True, "")
    ok, reason = kd_triton.is_available("meta")
    assert not ok and "meta" in reason


@pytest.mark.gpu
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5)])
def test_row_losses_large_vocab_bfloat16_gpu(divergence, beta):
    # Real tile size (4096) over a Qwen-sized vocabulary, teacher padded to 152064 and sliced.
    cfg = KDConfig(temperature=2.0, divergence=divergence, beta=beta)
    zs, zt, labels = realistic_logits(16, 151936, seed=31, dtype=torch.bfloat16, teacher_extra_cols=128)
    check_row_losses(row_losses, zs, zt, labels, cfg)


_COMPILE_SCRIPT = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)  # compile for real: this process must not interpret
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ddk_kernels.triton import kd_loss as K

def sig(names, pt):
    acc = "fp64" if pt == "fp64" else "fp32"
    types = {"zs_ptr": "*" + pt, "zt_ptr": "*" + pt, "grad_ptr": "*" + pt, "labels_ptr": "*i64",
             "V": "i32", "ignore_index": "i64"}
    out = {}
    for n in names:
        if n in types: out[n] = types[n]
        elif n.endswith("_ptr"): out[n] = "*" + acc
        elif n.startswith("stride"): out[n] = "i64"
        elif n.isupper(): out[n] = "constexpr"
        else: out[n] = "fp32"
    return out

target = GPUTarget("cuda", 90, 32)
for pt, div in [("bf16", 0), ("bf16", 1), ("bf16", 2), ("fp64", 2)]:
    acc = tl.float64 if pt == "fp64" else tl.float32
    fwd = ASTSource(K._kd_fwd_kernel, sig(K._kd_fwd_kernel.arg_names, pt),
                    {"DIV": div, "T_IS_ONE": div == 0, "ACC": acc, "BLOCK_V": 4096})
    bwd = ASTSource(K._kd_bwd_kernel, sig(K._kd_bwd_kernel.arg_names, pt),
                    {"DIV": div, "ACC": acc, "BLOCK_V": 4096})
    for src in (fwd, bwd):
        compiled = triton.compile(src, target=target, options={"num_warps": 8})
        assert compiled.asm.get("cubin"), (pt, div)
print("compiled")
"""


@pytest.mark.e2e
def test_kernels_compile_for_sm90_without_gpu():
    # Lowers both kernels all the way to sm_90 machine code (Triton's own ptxas) on any machine, so
    # GPU-only lowering errors (e.g. float64 math, layouts at the real 4096-wide tile) show in CI.
    # A subprocess: this module made Triton interpret, and that is fixed at import.
    import subprocess
    import sys
    from pathlib import Path

    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"this Triton cannot compile for a named target ({exc})")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, timeout=600, env=env, cwd=root
    )
    if (
        proc.returncode != 0
        and "ptxas" in proc.stderr
        and ("not found" in proc.stderr or "No such file" in proc.stderr)
    ):
        pytest.skip("Triton's ptxas is not available here")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]
