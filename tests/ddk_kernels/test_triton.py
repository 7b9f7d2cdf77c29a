"""Tests of the Triton KD-loss backend (ddk_kernels/triton/kd_loss.py) against the float64 oracle.

Without CUDA the kernels run under Triton's interpreter on CPU tensors (slow: small shapes only);
with CUDA the same tests run compiled on the GPU, plus the ``gpu``-marked ones.
"""

from __future__ import annotations

import os

import torch

# Triton decides between compiling and interpreting when ``@triton.jit`` decorates a kernel, i.e.
# when ddk_kernels.triton.kd_loss is first imported. A fixture (even module-scoped) runs after
# collection has imported this module, which is too late if the import happens here, so the
# variable is set at the very top, before anything imports the kernels, and only where there is
# no CUDA device (on a GPU machine the kernels must compile for real).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from ddk_kernels import dispatch  # noqa: E402
from ddk_kernels import triton as kd_triton  # noqa: E402
from ddk_kernels.reference import kd_row_losses_reference  # noqa: E402
from ddk_kernels.triton.kd_loss import (  # noqa: E402
    divergence_code,
    kd_backward_triton,
    kd_forward_triton,
    row_losses,
)
from ddk_kernels.types import KDConfig  # noqa: E402
from kd_cases import (  # noqa: E402
    DIVERGENCE_CASES,
    assert_close_error_relative,
    oracle_grad,
    oracle_rows,
    realistic_logits,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ATOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}

# The interpreter warns about the inf/nan produced (and discarded by tl.where) on masked columns.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _run(zs, zt, labels, cfg, grad_ce, grad_kd, block_v=None):
    """Kernel ``(ce, kd, d zS)`` for upstream gradients ``grad_ce``, ``grad_kd``."""
    x = zs.detach().to(DEVICE).clone().requires_grad_()  # never flag the caller's tensor
    ce, kd = row_losses(x, zt.to(DEVICE), labels.to(DEVICE), cfg, block_v)
    (grad,) = torch.autograd.grad(
        (ce * grad_ce.to(DEVICE, ce.dtype)).sum() + (kd * grad_kd.to(DEVICE, kd.dtype)).sum(), x
    )
    return ce.detach().cpu(), kd.detach().cpu(), grad.cpu()


def _naive_low(zs, zt, labels, cfg, grad_ce, grad_kd):
    """The oracle run in the inputs' own precision (None for float64: nothing to compare)."""
    if zs.dtype == torch.float64:
        return None, None, None
    x = zs.clone().requires_grad_()
    ce, kd = kd_row_losses_reference(x, zt[:, : zs.shape[1]], labels, cfg, compute_dtype=zs.dtype)
    (grad,) = torch.autograd.grad((ce * grad_ce.to(ce.dtype)).sum() + (kd * grad_kd.to(kd.dtype)).sum(), x)
    return ce.detach(), kd.detach(), grad


def _check(zs, zt_full, labels, cfg, *, block_v=None, seed=0, teacher_slice=True):
    """Compare values and gradients (random per-row upstream gradients) with the oracle."""
    n, v = zs.shape
    zt = zt_full[:, :v] if teacher_slice else zt_full
    g = torch.Generator().manual_seed(seed + 1)
    grad_ce = torch.randn(n, generator=g, dtype=torch.float64) * 1.5
    grad_kd = torch.randn(n, generator=g, dtype=torch.float64) * 1.5 + 0.3
    ce, kd, grad = _run(zs, zt, labels, cfg, grad_ce, grad_kd, block_v)
    acc = torch.float64 if zs.dtype == torch.float64 else torch.float32
    assert ce.dtype == acc and kd.dtype == acc and grad.dtype == zs.dtype
    assert ce.shape == (n,) and kd.shape == (n,) and grad.shape == (n, v)
    o_ce, o_kd = oracle_rows(zs, zt, labels, cfg)
    o_grad = oracle_grad(zs, zt, labels, grad_ce, grad_kd, cfg)
    n_ce, n_kd, n_grad = _naive_low(zs, zt, labels, cfg, grad_ce, grad_kd)
    atol = ATOL[zs.dtype]
    assert_close_error_relative(ce, o_ce, n_ce, k=2, atol=atol, what="ce")
    assert_close_error_relative(kd, o_kd, n_kd, k=2, atol=atol, what="kd")
    assert_close_error_relative(grad, o_grad, n_grad, k=3, atol=atol, what="grad")
    ignored = labels == cfg.ignore_index
    assert torch.all(ce[ignored] == 0) and torch.all(kd[ignored] == 0)
    assert torch.all(grad[ignored] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES)
def test_row_losses_matches_oracle(divergence, beta, temperature, dtype):
    # V = 37 with 16-wide tiles: three tiles, the last one partial; the teacher is a column slice
    # of a wider tensor (row stride 40 > V), read in place.
    cfg = KDConfig(temperature=temperature, divergence=divergence, beta=beta)
    zs, zt, labels = realistic_logits(6, 37, seed=3, dtype=dtype, teacher_extra_cols=3)
    labels[1] = cfg.ignore_index
    _check(zs, zt, labels, cfg, block_v=16)


@pytest.mark.parametrize("vocab,block_v", [(1, None), (7, None), (37, None), (257, 64), (300, None)])
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_row_losses_odd_vocab(vocab, block_v, divergence, beta):
    cfg = KDConfig(temperature=2.0, divergence=divergence, beta=beta)
    zs, zt, labels = realistic_logits(4, vocab, seed=vocab, teacher_extra_cols=5)
    _check(zs, zt, labels, cfg, block_v=block_v)


@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES)
def test_row_losses_single_row(divergence, beta):
    cfg = KDConfig(temperature=0.5, divergence=divergence, beta=beta)
    zs, zt, labels = realistic_logits(1, 130, seed=11, masked_fraction=0.0)
    _check(zs, zt, labels, cfg, block_v=32)


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_row_losses_float64_scalars_not_rounded_to_float32(divergence):
    """beta = 0.7 and 1/T = 1/0.7 are not float32 numbers: float64 rows must see them unrounded
    (as plain kernel arguments Triton would pass them as float32, a 1e-8 relative error)."""
    cfg = KDConfig(temperature=0.7, divergence=divergence, beta=0.7)
    zs, zt, labels = realistic_logits(3, 70, seed=5, dtype=torch.float64, masked_fraction=0.0)
    _check(zs, zt, labels, cfg, block_v=32)


def test_row_losses_fully_masked_rows_are_zero():
    cfg = KDConfig(divergence="jsd", beta=0.5, temperature=2.0)
    zs, zt, _ = realistic_logits(3, 50, seed=5)
    labels = torch.full((3,), cfg.ignore_index, dtype=torch.long)
    ce, kd, grad = _run(zs, zt, labels, cfg, torch.ones(3), torch.ones(3), block_v=16)
    assert torch.all(ce == 0) and torch.all(kd == 0) and torch.all(grad == 0)
    assert torch.isfinite(ce).all() and torch.isfinite(kd).all()


@pytest.mark.parametrize("ignore_index", [-1, 7])
def test_row_losses_non_default_ignore_index(ignore_index):
    cfg = KDConfig(divergence="reverse_kl", temperature=1.0, ignore_index=ignore_index)
    zs, zt, labels = realistic_logits(6, 29, seed=7, ignore_index=ignore_index, masked_fraction=0.4)
    labels[0] = 3
    labels[2] = ignore_index
    _check(zs, zt, labels, cfg, block_v=16)


def test_row_losses_teacher_wider_stride_not_copied():
    # The launcher must read a column slice through its row stride (no contiguous copy); a wrong
    # stride would read the extra columns and change the divergence.
    cfg = KDConfig(divergence="forward_kl")
    zs, zt, labels = realistic_logits(4, 33, seed=9, teacher_extra_cols=31)
    zt_view = zt[:, :33]
    assert zt_view.stride(0) == 64 and not zt_view.is_contiguous()
    _check(zs, zt_view, labels, cfg, block_v=16, teacher_slice=False)


def test_row_losses_non_contiguous_student():
    cfg = KDConfig(divergence="jsd", beta=0.5)
    zs, zt, labels = realistic_logits(5, 24, seed=13)
    zs_t = zs.t().contiguous().t()  # last dim not contiguous: the launcher copies
    assert zs_t.stride(-1) != 1
    _check(zs_t, zt, labels, cfg, block_v=16)


@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES)
def test_row_losses_bfloat16_error_relative(divergence, beta):
    # bf16 inputs, fp32 accumulation: compared with the naive oracle run in bf16 (CONVENTIONS 4).
    cfg = KDConfig(temperature=2.0, divergence=divergence, beta=beta)
    zs, zt, labels = realistic_logits(5, 200, seed=21, dtype=torch.bfloat16, teacher_extra_cols=8)
    _check(zs, zt, labels, cfg, block_v=64)


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
            log_m = torch.logaddexp(log_p + torch.log(torch.tensor(beta, dtype=torch.float64)),
                                    log_q + torch.log1p(torch.tensor(-beta, dtype=torch.float64)))
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


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5)])
def test_row_losses_gradcheck_float64(divergence, beta):
    cfg = KDConfig(temperature=2.0, divergence=divergence, beta=beta)
    zs, zt, _ = realistic_logits(2, 5, seed=29, std=2.0, dtype=torch.float64)
    labels = torch.tensor([1, 4])
    x = zs.to(DEVICE).requires_grad_()
    w = torch.tensor([0.7, -1.3], dtype=torch.float64, device=DEVICE)

    def fn(z):
        ce, kd = row_losses(z, zt.to(DEVICE), labels.to(DEVICE), cfg, 16)
        return ce * w + kd * (1.0 - w)

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_divergence_code_follows_effective_divergence():
    assert divergence_code(KDConfig(divergence="forward_kl")) == 0
    assert divergence_code(KDConfig(divergence="reverse_kl")) == 1
    assert divergence_code(KDConfig(divergence="jsd", beta=0.5)) == 2
    assert divergence_code(KDConfig(divergence="jsd", beta=0.0)) == 0
    assert divergence_code(KDConfig(divergence="jsd", beta=1.0)) == 1


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


def test_dispatch_resolves_triton_backend():
    assert dispatch.resolve_backend("triton", DEVICE) == "triton"
    fn = dispatch.get_row_losses("triton", DEVICE)
    zs, zt, labels = realistic_logits(2, 16, seed=2)
    ce, kd = fn(zs.to(DEVICE), zt.to(DEVICE), labels.to(DEVICE), KDConfig())
    o_ce, o_kd = oracle_rows(zs, zt, labels, KDConfig())
    assert_close_error_relative(ce.cpu(), o_ce, None, k=2, atol=2e-5)
    assert_close_error_relative(kd.cpu(), o_kd, None, k=2, atol=2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5)])
def test_row_losses_large_vocab_bfloat16_gpu(divergence, beta):
    # Real tile size (4096) over a Qwen-sized vocabulary, teacher padded to 152064 and sliced.
    cfg = KDConfig(temperature=2.0, divergence=divergence, beta=beta)
    zs, zt, labels = realistic_logits(16, 151936, seed=31, dtype=torch.bfloat16, teacher_extra_cols=128)
    _check(zs, zt, labels, cfg)


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
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, timeout=600,
                          env=env, cwd=root)
    if proc.returncode != 0 and "ptxas" in proc.stderr and ("not found" in proc.stderr or "No such file" in proc.stderr):
        pytest.skip("Triton's ptxas is not available here")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]
