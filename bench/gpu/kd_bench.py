"""Correctness check and timing of every CUDA backend of the KD loss (run by bench/gpu/run.sh).

1. Checks triton, cpp (the compiled ops on CUDA) and chunked against the float64 oracle on a
   few shapes (values and gradients, the error-relative rule of tests/kd_cases.py).
2. Times forward + backward at N=8192, V=151936, bf16 (teacher padded to 152064 and sliced, as
   Qwen-style models are) for reference (naive torch), chunked, triton and cpp (CUDA), with the
   peak extra memory of each, against the memory-bandwidth floor: ``3 * N * V * 2`` bytes (read
   both logits, write the gradient) over the measured device-to-device copy rate.
3. Fused lm_head + KD (``ddk.losses.fused.fused_linear_kd_loss``): checks the ``chunked``
   backend (its strategies) against the float64 oracle (materialised logits, ``kd_loss_reference`` and
   autograd) on 3 small shapes (bf16 and float32; loss and the gradients of hidden, weight and
   bias; ``err(fused) <= 3 * err(naive, same dtype) + 2e-5 * max|oracle|``), then times forward +
   backward at N=8192, Hs=Ht=2048, V=151936 bf16 (teacher as hidden + weight, weight padded to
   152064 rows) for naive (both logits materialised; "OOM" if it does not fit), chunked
   and Liger's ``LigerFusedLinearJSDLoss`` (same loss; "not installed" without ``liger_kernel``),
   with peak memory above the inputs and the FLOP floor ``2 * N * V * (Ht + 3 * Hs)`` over the
   bf16 matmul rate measured in the same run. Each backend is first probed at ``--fused-probe-n``
   tokens; one whose projected step exceeds ``--fused-max-step-s`` or the remaining
   ``--fused-budget-s`` is reported as skipped, not run.
4. Prints the short tables last and writes JSON to ``$OUT/kd_bench.json`` (or ``--json``).

Importable without CUDA (the pure helpers are unit-tested in tests/bench/test_gpu_kd_bench.py;
the fused check also runs on CPU there, on tiny shapes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ddk_kernels import dispatch  # noqa: E402
from ddk_kernels.reference import (  # noqa: E402
    kd_logits_grad_reference,
    kd_loss_reference,
    kd_row_losses_reference,
)
from ddk_kernels.types import KDConfig  # noqa: E402

BACKENDS_TIMED: tuple[str, ...] = ("reference", "chunked", "triton", "cpp")
BACKENDS_CHECKED: tuple[str, ...] = ("triton", "cpp", "chunked")
FUSED_TIMED: tuple[str, ...] = ("naive", "chunked", "liger")
# "chunked" is the gemm strategy on CUDA; "@40": a workspace of 40 token rows, several chunks
FUSED_CHECKED: tuple[str, ...] = ("chunked", "chunked:gemm@40", "chunked:token_chunks")
FUSED_K = 3.0  # err(fused) <= FUSED_K * err(naive) + FUSED_REL_ATOL * max|oracle|
FUSED_REL_ATOL = 2e-5


# ---- pure helpers (no GPU) --------------------------------------------------------------------


def copy_rate_bytes_per_s(nbytes: int, seconds: float) -> float:
    """Rate of a device-to-device copy of ``nbytes``, counting bytes read and written (2x)."""
    if seconds <= 0:
        raise ValueError(f"copy_rate_bytes_per_s: seconds must be > 0; got {seconds}.")
    return 2.0 * nbytes / seconds


def bandwidth_floor_seconds(n: int, v: int, elem_bytes: int, rate_bytes_per_s: float, passes: int = 3) -> float:
    """Least time of the loss on given logits: ``passes * n * v * elem_bytes`` bytes at ``rate``.

    ``passes = 3``: read the student and the teacher logits once, write the gradient once.
    """
    if rate_bytes_per_s <= 0:
        raise ValueError(f"bandwidth_floor_seconds: rate_bytes_per_s must be > 0; got {rate_bytes_per_s}.")
    return passes * n * v * elem_bytes / rate_bytes_per_s


@dataclass
class TimingRow:
    """One backend's forward + backward at the benchmark shape."""

    backend: str
    ms: float | None = None  # median milliseconds of forward + backward
    peak_mib: float | None = None  # peak memory above the inputs, MiB (the gradient included)
    reps: int = 0
    note: str = ""


@dataclass
class CheckRow:
    """One backend x case of the oracle check."""

    backend: str
    case: str
    ok: bool
    detail: str = ""


@dataclass
class FusedTimingRow:
    """One fused lm_head + KD variant's forward + backward at the benchmark shape."""

    backend: str
    ms: float | None = None  # median milliseconds of forward + backward (CUDA events)
    peak_mib: float | None = None  # peak memory above the inputs, MiB (the gradients included)
    reps: int = 0
    loss: float | None = None  # loss value of the warm-up step (all variants compute the same loss)
    probe_ms: float | None = None  # one warm step at the probe size (``shape["probe_n"]`` tokens)
    note: str = ""


@dataclass
class Report:
    device: str = ""
    torch: str = ""
    triton: str = ""
    shape: dict = field(default_factory=dict)
    copy_rate_gb_s: float | None = None
    floor_ms: float | None = None
    checks: list[CheckRow] = field(default_factory=list)
    timings: list[TimingRow] = field(default_factory=list)
    # fused lm_head + KD (section 3 of the module docstring)
    fused_shape: dict = field(default_factory=dict)
    matmul_tflops: float | None = None  # measured bf16 matmul rate, TFLOP/s
    fused_floor_ms: float | None = None  # 2 * N * V * (Ht + 3 * Hs) FLOP at that rate
    fused_checks: list[CheckRow] = field(default_factory=list)
    fused_timings: list[FusedTimingRow] = field(default_factory=list)


def format_table(rows: list[TimingRow], floor_ms: float | None) -> str:
    """Fixed-width table: backend, ms, peak MiB, ratio to naive (reference), ratio to floor."""
    naive = next((r.ms for r in rows if r.backend == "reference" and r.ms), None)
    head = f"{'backend':<11} {'fwd+bwd ms':>10} {'peak MiB':>10} {'x naive':>8} {'x floor':>8}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        ms = f"{r.ms:10.2f}" if r.ms is not None else f"{'-':>10}"
        mem = f"{r.peak_mib:10.0f}" if r.peak_mib is not None else f"{'-':>10}"
        x_naive = f"{r.ms / naive:8.3f}" if (r.ms is not None and naive) else f"{'-':>8}"
        x_floor = f"{r.ms / floor_ms:8.2f}" if (r.ms is not None and floor_ms) else f"{'-':>8}"
        lines.append(f"{r.backend:<11} {ms} {mem} {x_naive} {x_floor}  {r.note}".rstrip())
    if floor_ms:
        lines.append(f"{'floor':<11} {floor_ms:10.2f} {'':>10} {'':>8} {1.0:8.2f}  3*N*V*2 bytes / copy rate")
    return "\n".join(lines)


def error_relative_ok(err_fast: float, err_naive: float, k: float, atol: float) -> bool:
    """The rule of tests/kd_cases.py: ``err(fast) <= k * err(naive low precision) + atol``."""
    return math.isfinite(err_fast) and err_fast <= k * err_naive + atol


def fused_flops(n: int, v: int, hs: int, ht: int) -> int:
    """Matmul FLOPs of fused lm_head + KD forward + backward: ``2 * N * V * (Ht + 3 * Hs)``.

    Teacher logits ``h_T W_T^T`` (``2 N V Ht``); student logits ``h W^T``, ``d h = G W`` and
    ``d W = G^T h`` (``2 N V Hs`` each). Recomputing logits in backward is not counted.
    """
    if min(n, v, hs, ht) < 0:
        raise ValueError(f"fused_flops: sizes must be >= 0; got n={n} v={v} hs={hs} ht={ht}.")
    return 2 * n * v * (ht + 3 * hs)


def matmul_rate_flop_per_s(m: int, n: int, k: int, seconds: float) -> float:
    """Rate of one ``(m, k) @ (k, n)`` matrix product that took ``seconds``: ``2 m n k / seconds``."""
    if seconds <= 0:
        raise ValueError(f"matmul_rate_flop_per_s: seconds must be > 0; got {seconds}.")
    return 2.0 * m * n * k / seconds


def flop_floor_seconds(flops: float, rate_flop_per_s: float) -> float:
    """Least time of ``flops`` at ``rate_flop_per_s`` (e.g. the measured bf16 matmul rate)."""
    if rate_flop_per_s <= 0:
        raise ValueError(f"flop_floor_seconds: rate_flop_per_s must be > 0; got {rate_flop_per_s}.")
    return flops / rate_flop_per_s


def projected_step_seconds(probe_s: float, probe_n: int, n: int) -> float:
    """Step time at ``n`` tokens scaled linearly from ``probe_s`` at ``probe_n`` tokens (an
    over-estimate when the probe leaves the GPU idle, which is the safe side for a time cap)."""
    if probe_n <= 0:
        raise ValueError(f"projected_step_seconds: probe_n must be > 0; got {probe_n}.")
    return probe_s * max(1.0, n / probe_n)


def fused_skip_reason(projected_s: float, max_step_s: float, remaining_s: float) -> str:
    """Why a full-size run is not started (``""`` if it is): it needs one warm-up and one timed
    step, ``2 * projected_s``, within ``remaining_s``, and each step under ``max_step_s``."""
    if projected_s > max_step_s:
        return f"skipped: projected {projected_s:.1f} s/step > --fused-max-step-s {max_step_s:g}"
    if 2 * projected_s > remaining_s:
        return f"skipped: projected 2 x {projected_s:.1f} s > {max(remaining_s, 0.0):.0f} s left of --fused-budget-s"
    return ""


def reps_within(first_s: float, reps: int, budget_s: float) -> int:
    """Timed repetitions after a warm-up of ``first_s``: at most ``reps``, at least 1, and no
    more than fit in ``budget_s``."""
    return max(1, min(reps, int(budget_s / max(first_s, 1e-3))))


def liger_beta(divergence: str, beta: float) -> float:
    """``beta`` of ``LigerFusedLinearJSDLoss`` giving ddk's divergence: its generalised JSD is
    forward KL at 0 and reverse KL at 1, and ddk's JSD(beta) otherwise (same mixture)."""
    if divergence == "forward_kl":
        return 0.0
    if divergence == "reverse_kl":
        return 1.0
    if divergence == "jsd":
        return float(beta)
    raise ValueError(f"liger_beta: divergence must be forward_kl, reverse_kl or jsd; got {divergence!r}.")


def compare_to_oracle(
    err_fast: dict[str, float],
    err_naive: dict[str, float] | None,
    scale: dict[str, float],
    k: float = FUSED_K,
    rel_atol: float = FUSED_REL_ATOL,
) -> tuple[bool, str]:
    """Error-relative rule per quantity (``loss``, ``dh``, ``dW``, ``db``):
    ``err_fast <= k * err_naive + rel_atol * scale`` (``err_naive`` 0 when None, e.g. float64).

    Returns ``(all ok, "name err/naive err_naive, ...")`` with ``FAIL`` after each failure.
    """
    ok, parts = True, []
    for name, err in err_fast.items():
        naive = err_naive[name] if err_naive is not None else 0.0
        good = error_relative_ok(err, naive, k, rel_atol * scale.get(name, 1.0))
        ok &= good
        parts.append(
            f"{name} {err:.2e}" + (f"/naive {naive:.2e}" if err_naive is not None else "") + ("" if good else " FAIL")
        )
    return ok, ", ".join(parts)


def format_fused_table(rows: list[FusedTimingRow], floor_ms: float | None, matmul_tflops: float | None = None) -> str:
    """Fixed-width table: variant, ms, peak MiB, ratio to naive, ratio to the FLOP floor, note."""
    naive = next((r.ms for r in rows if r.backend == "naive" and r.ms), None)
    head = f"{'variant':<11} {'fwd+bwd ms':>10} {'peak MiB':>10} {'x naive':>8} {'x floor':>8}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        ms = f"{r.ms:10.2f}" if r.ms is not None else f"{'-':>10}"
        mem = f"{r.peak_mib:10.0f}" if r.peak_mib is not None else f"{'-':>10}"
        x_naive = f"{r.ms / naive:8.3f}" if (r.ms is not None and naive) else f"{'-':>8}"
        x_floor = f"{r.ms / floor_ms:8.2f}" if (r.ms is not None and floor_ms) else f"{'-':>8}"
        lines.append(f"{r.backend:<11} {ms} {mem} {x_naive} {x_floor}  {r.note}".rstrip())
    if floor_ms:
        rate = f" ({matmul_tflops:.0f} TFLOP/s)" if matmul_tflops else ""
        lines.append(
            f"{'floor':<11} {floor_ms:10.2f} {'':>10} {'':>8} {1.0:8.2f}  2*N*V*(Ht+3*Hs) FLOP / bf16 matmul rate{rate}"
        )
    return "\n".join(lines)


# ---- GPU parts ---------------------------------------------------------------------------------


def _sync() -> None:
    torch.cuda.synchronize()


def measure_copy_rate(nbytes: int = 1 << 31, reps: int = 10) -> float:
    """Device-to-device copy rate (bytes read + written per second) of a ``nbytes`` buffer."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        dst.copy_(src)
        end.record()
        _sync()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return copy_rate_bytes_per_s(nbytes, sorted(times)[len(times) // 2])


def resolve_fn(name: str) -> tuple[Callable | None, str]:
    """``(row_losses, "")`` of backend ``name`` on CUDA, else ``(None, reason)``."""
    try:
        return dispatch.resolve("kd_rows", name, "cuda").row_losses, ""
    except (RuntimeError, ValueError) as exc:
        return None, str(exc)


def _inputs(n: int, v: int, dtype: torch.dtype, seed: int, teacher_extra: int, masked: float = 0.2):
    """Realistic logits on the GPU (std 15, teacher correlated, some peaked rows, masked labels)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    std = 15.0
    zs = torch.randn(n, v, generator=g, device="cuda", dtype=torch.float32) * std
    zt = torch.empty(n, v + teacher_extra, device="cuda", dtype=torch.float32)
    zt.normal_(0.0, 0.8 * std, generator=g)
    zt[:, :v].add_(zs, alpha=0.6)
    rows = torch.arange(0, n, 4, device="cuda")
    cols = torch.randint(0, v, (rows.numel(),), generator=g, device="cuda")
    zs[rows, cols] += 6 * std
    zt[rows, cols] += 8 * std
    labels = torch.randint(0, v, (n,), generator=g, device="cuda")
    labels[torch.rand(n, generator=g, device="cuda") < masked] = -100
    zs, zt = zs.to(dtype), zt.to(dtype)
    return zs, zt[:, :v], labels


def check_backends(report: Report, names: tuple[str, ...] = BACKENDS_CHECKED) -> None:
    """Values and gradients of each backend vs the float64 oracle on a few shapes and configs."""
    cases = [
        # (n, v, dtype, teacher_extra, divergence, beta, T)
        (64, 151936, torch.bfloat16, 128, "forward_kl", 0.5, 1.0),
        (64, 151936, torch.bfloat16, 128, "jsd", 0.5, 2.0),
        (37, 1000, torch.float32, 3, "reverse_kl", 0.5, 0.5),
        (37, 1000, torch.float32, 3, "jsd", 0.3, 1.0),
        (16, 4097, torch.float64, 0, "forward_kl", 0.5, 2.0),
        (16, 4097, torch.float64, 0, "jsd", 0.7, 1.0),
        (1, 7, torch.float32, 0, "reverse_kl", 0.5, 2.0),
        (9, 257, torch.float16, 5, "jsd", 0.0, 1.0),
    ]
    fns = {name: resolve_fn(name) for name in names}
    for name, (fn, reason) in fns.items():
        if fn is None:
            report.checks.append(CheckRow(name, "all", False, f"unavailable: {reason}"))
    for seed, (n, v, dtype, extra, div, beta, temp) in enumerate(cases):
        cfg = KDConfig(temperature=temp, divergence=div, beta=beta)
        zs, zt, labels = _inputs(n, v, dtype, seed, extra)
        gce = torch.randn(n, device="cuda", dtype=torch.float64) * 1.5
        gkd = torch.randn(n, device="cuda", dtype=torch.float64) * 1.5 + 0.3
        o_ce, o_kd = kd_row_losses_reference(zs.double(), zt.double(), labels, cfg, torch.float64)
        o_g = kd_logits_grad_reference(zs, zt, labels, gce, gkd, cfg)
        if dtype == torch.float64:
            naive = None
        else:
            x = zs.detach().clone().requires_grad_()
            n_ce, n_kd = kd_row_losses_reference(x, zt, labels, cfg, compute_dtype=dtype)
            (n_g,) = torch.autograd.grad((n_ce * gce.to(dtype)).sum() + (n_kd * gkd.to(dtype)).sum(), x)
            naive = (n_ce.detach(), n_kd.detach(), n_g)
        case = f"n={n} v={v} {str(dtype).replace('torch.', '')} {div}(beta={beta}) T={temp} slice+{extra}"
        for name, (fn, _) in fns.items():
            if fn is None:
                continue
            try:
                x = zs.detach().clone().requires_grad_()
                ce, kd = fn(x, zt, labels, cfg)
                (g,) = torch.autograd.grad((ce * gce.to(ce.dtype)).sum() + (kd * gkd.to(kd.dtype)).sum(), x)
                _sync()
            except Exception as exc:
                report.checks.append(CheckRow(name, case, False, f"raised {type(exc).__name__}: {exc}"))
                continue
            atol = 1e-9 if dtype == torch.float64 else 2e-5
            parts, ok = [], True
            for what, fast, oracle, idx, k in (("ce", ce, o_ce, 0, 2), ("kd", kd, o_kd, 1, 2), ("grad", g, o_g, 2, 3)):
                err = float((fast.detach().double() - oracle).abs().max())
                err_naive = float((naive[idx].double() - oracle).abs().max()) if naive else 0.0
                good = error_relative_ok(err, err_naive, k, atol)
                ok &= good
                parts.append(
                    f"{what} {err:.2e}" + (f"/naive {err_naive:.2e}" if naive else "") + ("" if good else " FAIL")
                )
            dtype_ok = ce.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and g.dtype == dtype
            if not dtype_ok:
                ok = False
                parts.append(f"dtypes ce={ce.dtype} grad={g.dtype} FAIL")
            report.checks.append(CheckRow(name, case, ok, ", ".join(parts)))
        del zs, zt, labels, o_g
        torch.cuda.empty_cache()


def time_backend(
    name: str,
    fn: Callable,
    zs: torch.Tensor,
    zt: torch.Tensor,
    labels: torch.Tensor,
    cfg: KDConfig,
    reps: int,
    budget_s: float,
) -> TimingRow:
    """Median forward + backward time (CUDA events) and peak memory above the inputs."""
    row = TimingRow(name)

    def step() -> None:
        x = zs.detach().requires_grad_()
        ce, kd = fn(x, zt, labels, cfg)
        loss = (ce.sum() + 0.2 * kd.sum()) / labels.numel()
        (g,) = torch.autograd.grad(loss, x)
        del g

    try:
        torch.cuda.empty_cache()
        _sync()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        step()  # warm-up: compiles Triton kernels, measures peak memory
        _sync()
        first = time.perf_counter() - t0
        row.peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
        n_reps = max(1, min(reps, int(budget_s / max(first, 1e-3))))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(n_reps):
            start.record()
            step()
            end.record()
            _sync()
            times.append(start.elapsed_time(end))
        row.ms = sorted(times)[len(times) // 2]
        row.reps = n_reps
    except torch.cuda.OutOfMemoryError as exc:
        row.note = f"out of memory ({str(exc).splitlines()[0][:80]})"
    except Exception as exc:
        row.note = f"raised {type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"
    torch.cuda.empty_cache()
    return row


def run_timings(
    report: Report,
    n: int,
    v: int,
    teacher_v: int,
    divergence: str,
    beta: float,
    temperature: float,
    reps: int,
    budget_s: float,
    names: tuple[str, ...] = BACKENDS_TIMED,
) -> None:
    cfg = KDConfig(temperature=temperature, divergence=divergence, beta=beta)
    zs, zt, labels = _inputs(n, v, torch.bfloat16, 1234, teacher_v - v, masked=0.1)
    report.shape = {
        "n": n,
        "v": v,
        "teacher_v": teacher_v,
        "dtype": "bfloat16",
        "divergence": divergence,
        "beta": beta,
        "temperature": temperature,
    }
    rate = measure_copy_rate()
    report.copy_rate_gb_s = rate / 1e9
    report.floor_ms = bandwidth_floor_seconds(n, v, 2, rate) * 1e3
    for name in names:
        fn, reason = resolve_fn(name)
        if fn is None:
            report.timings.append(TimingRow(name, note=f"unavailable: {reason}"))
            continue
        row = time_backend(name, fn, zs, zt, labels, cfg, reps, budget_s)
        report.timings.append(row)
        print(f"  timed {name}: {row.ms} ms, peak {row.peak_mib} MiB {row.note}", flush=True)


# ---- fused lm_head + KD ------------------------------------------------------------------------


@dataclass(frozen=True)
class FusedCase:
    """One shape / config of the fused oracle check."""

    n: int
    hs: int
    ht: int
    v: int
    teacher_v: int  # rows of the teacher weight (>= v; the fused path slices it)
    dtype: torch.dtype
    bias: bool
    divergence: str = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    gamma: float = 0.2
    masked: float = 0.2

    def label(self) -> str:
        return (
            f"n={self.n} Hs={self.hs} Ht={self.ht} V={self.v} (teacher {self.teacher_v}) "
            f"{str(self.dtype).replace('torch.', '')}{' +bias' if self.bias else ''} "
            f"{self.divergence}(beta={self.beta}) T={self.temperature}"
        )

    def options(self) -> dict:
        return dict(gamma=self.gamma, temperature=self.temperature, divergence=self.divergence, beta=self.beta)


FUSED_CASES: tuple[FusedCase, ...] = (
    FusedCase(96, 512, 768, 32000, 32064, torch.bfloat16, True, "forward_kl", 0.5, 1.0),
    FusedCase(100, 1024, 1024, 151936, 152064, torch.bfloat16, False, "jsd", 0.5, 2.0),
    FusedCase(67, 256, 384, 5003, 5003, torch.float32, True, "reverse_kl", 0.5, 0.7),
)


def fused_inputs(
    n: int,
    hs: int,
    ht: int,
    v: int,
    teacher_v: int,
    dtype: torch.dtype,
    bias: bool,
    masked: float,
    seed: int,
    device: torch.device | str = "cuda",
    logit_std: float = 3.0,
) -> dict:
    """Hidden states ``N(0, 1)``, weights scaled to logits of std ``logit_std``, labels with a
    ``masked`` fraction of -100. Student ``h``, ``w`` (and ``b``) are leaves requiring grad."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rn(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * std).to(dtype)

    x = {
        "h": rn(n, hs, std=1.0).requires_grad_(),
        "w": rn(v, hs, std=logit_std / math.sqrt(hs)).requires_grad_(),
        "b": rn(v, std=0.5).requires_grad_() if bias else None,
        "th": rn(n, ht, std=1.0),
        "tw": rn(teacher_v, ht, std=logit_std / math.sqrt(ht)),
    }
    labels = torch.randint(0, v, (n,), generator=g, device=device)
    labels[torch.rand(n, generator=g, device=device) < masked] = -100
    x["labels"] = labels
    return x


def _params(x: dict) -> list[torch.Tensor]:
    return [x["h"], x["w"]] + ([x["b"]] if x["b"] is not None else [])


def fused_oracle(x: dict, opts: dict) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """float64 loss and gradients (hidden, weight[, bias]): materialised logits,
    ``kd_loss_reference`` and autograd, on the (already rounded) inputs cast to float64."""
    v = x["w"].shape[0]
    p64 = [t.detach().double().requires_grad_() for t in _params(x)]
    zs = p64[0] @ p64[1].T
    if len(p64) == 3:
        zs = zs + p64[2]
    zt = x["th"].double() @ x["tw"][:v].double().T
    loss = kd_loss_reference(zs, zt, x["labels"], compute_dtype=torch.float64, **opts).loss
    grads = torch.autograd.grad(loss, p64)
    return loss.detach(), grads


def make_fused_step(name: str, opts: dict) -> tuple[Callable | None, str]:
    """``(step, "")`` where ``step(x) -> (loss (detached), grads of hidden, weight[, bias])`` runs
    forward + backward of variant ``name``; ``(None, reason)`` where it cannot run.

    ``naive``: both logits materialised in the input dtype, ``kd_loss_reference`` (float32 math),
    autograd. ``chunked`` / ``reference``: ``fused_linear_kd_loss(backend=name)``. ``liger``:
    ``LigerFusedLinearJSDLoss(weight_hard_loss=1, weight_soft_loss=gamma, beta=liger_beta(...))``
    (the same loss: CE at T=1 plus gamma times the divergence at T, over valid tokens).
    """
    if name == "naive":

        def loss_fn(x: dict) -> torch.Tensor:
            v = x["w"].shape[0]
            zs = x["h"] @ x["w"].T
            if x["b"] is not None:
                zs = zs + x["b"]
            with torch.no_grad():
                zt = x["th"] @ x["tw"][:v].T
            return kd_loss_reference(zs, zt, x["labels"], **opts).loss

    elif name.split(":")[0] in ("chunked", "reference"):
        from ddk.losses.fused import fused_linear_kd_loss

        backend, _, rest = name.partition(":")
        strategy, _, rows = rest.partition("@")
        extra: dict = {"strategy": strategy} if strategy else {}

        def loss_fn(x: dict) -> torch.Tensor:
            if rows:  # a workspace of that many token rows of the gemm strategy
                extra["workspace_bytes"] = int(rows) * 3 * x["w"].shape[0] * x["h"].element_size()
            return fused_linear_kd_loss(
                x["h"],
                x["w"],
                x["labels"],
                teacher_hidden=x["th"],
                teacher_weight=x["tw"],
                student_bias=x["b"],
                backend=backend,
                **extra,
                **opts,
            ).loss

    elif name.startswith("liger"):
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        except ImportError as exc:
            return None, f"not installed ({exc})"
        mod = LigerFusedLinearJSDLoss(
            weight_hard_loss=1.0,
            weight_soft_loss=float(opts["gamma"]),
            beta=liger_beta(opts["divergence"], opts["beta"]),
            temperature=float(opts["temperature"]),
            compiled=name != "liger_eager",
        )

        def loss_fn(x: dict) -> torch.Tensor:
            v = x["w"].shape[0]  # Liger pads the student to a larger teacher: give it V rows
            return mod(x["h"], x["w"], x["th"], x["tw"][:v], x["labels"], x["b"])

    else:
        return None, f"unknown variant {name!r}"

    def step(x: dict) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        loss = loss_fn(x)
        grads = torch.autograd.grad(loss, _params(x))
        return loss.detach(), grads

    return step, ""


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return float((a.detach().double() - b.detach().double()).abs().max())


def check_fused(
    report: Report,
    cases: tuple[FusedCase, ...] = FUSED_CASES,
    names: tuple[str, ...] = FUSED_CHECKED,
    device: torch.device | str = "cuda",
) -> None:
    """Loss and gradients of each fused backend vs the float64 oracle (into ``report.fused_checks``)."""
    dev = torch.device(device)
    available: dict[str, str] = {}
    for name in names:
        try:
            dispatch.resolve_backend(name.split(":")[0], dev, op="fused_linear_kd")
            available[name] = ""
        except (RuntimeError, ValueError) as exc:
            available[name] = str(exc).splitlines()[0][:160]
            report.fused_checks.append(CheckRow(name, "all", False, f"unavailable: {available[name]}"))
    for seed, case in enumerate(cases):
        x = fused_inputs(
            case.n,
            case.hs,
            case.ht,
            case.v,
            case.teacher_v,
            case.dtype,
            case.bias,
            case.masked,
            seed=100 + seed,
            device=dev,
        )
        opts = case.options()
        o_loss, o_grads = fused_oracle(x, opts)
        keys = ["loss", "dh", "dW"] + (["db"] if case.bias else [])
        scale = {k: max(float(t.abs().max()), 1e-30) for k, t in zip(keys, (o_loss,) + o_grads)}
        err_naive = None
        if case.dtype != torch.float64:
            naive_step, _ = make_fused_step("naive", opts)
            assert naive_step is not None
            n_loss, n_grads = naive_step(x)
            err_naive = {k: _max_err(t, o) for k, t, o in zip(keys, (n_loss,) + n_grads, (o_loss,) + o_grads)}
            del n_grads
        for name in names:
            if available[name]:
                continue
            step, _ = make_fused_step(name, opts)
            assert step is not None
            try:
                loss, grads = step(x)
                if dev.type == "cuda":
                    _sync()
            except Exception as exc:
                report.fused_checks.append(CheckRow(name, case.label(), False, f"raised {type(exc).__name__}: {exc}"))
                continue
            err = {k: _max_err(t, o) for k, t, o in zip(keys, (loss,) + grads, (o_loss,) + o_grads)}
            ok, detail = compare_to_oracle(err, err_naive, scale)
            bad = [
                f"{k} {t.dtype}/{tuple(t.shape)}"
                for k, t, p in zip(keys[1:], grads, _params(x))
                if t.dtype != p.dtype or t.shape != p.shape
            ]
            if bad:
                ok = False
                detail += f", grad dtype/shape {', '.join(bad)} FAIL"
            report.fused_checks.append(CheckRow(name, case.label(), ok, detail))
            del grads
        del x, o_grads
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def measure_matmul_rate(m: int = 8192, reps: int = 5, dtype: torch.dtype = torch.bfloat16) -> float:
    """FLOP/s of an ``(m, m) @ (m, m)`` product in ``dtype`` (median of ``reps`` after 2 warm-ups)."""
    a = torch.randn(m, m, device="cuda", dtype=dtype)
    b = torch.randn(m, m, device="cuda", dtype=dtype)
    for _ in range(2):
        c = a @ b
    _sync()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        c = a @ b
        end.record()
        _sync()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b, c
    torch.cuda.empty_cache()
    return matmul_rate_flop_per_s(m, m, m, sorted(times)[len(times) // 2])


def _probe_inputs(x: dict, probe_n: int) -> dict:
    """The first ``probe_n`` tokens of ``x`` (fresh leaves; weights shared)."""
    p = dict(x)
    p["h"] = x["h"][:probe_n].detach().clone().requires_grad_()
    p["th"] = x["th"][:probe_n]
    p["labels"] = x["labels"][:probe_n]
    return p


def _timed_ms(step: Callable, x: dict) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = step(x)
    end.record()
    _sync()
    del out
    return start.elapsed_time(end)


def time_fused_variant(
    name: str,
    step: Callable,
    x: dict,
    probe_n: int,
    reps: int,
    loop_s: float,
    max_step_s: float,
    deadline: float,
) -> FusedTimingRow:
    """Probe at ``probe_n`` tokens (compiles; one timed step), then, unless the projected step is
    too long for ``max_step_s`` or the time left before ``deadline`` (``time.perf_counter()``), one
    warm-up at full size (peak memory) and up to ``reps`` steps timed with CUDA events."""
    row = FusedTimingRow(name)
    n = x["h"].shape[0]
    phase = "probe"
    try:
        torch.cuda.empty_cache()
        if probe_n < n:
            small = _probe_inputs(x, probe_n)
            out = step(small)  # compile / autotune / torch.compile at the probe size
            _sync()
            del out
            row.probe_ms = _timed_ms(step, small)
            del small
            projected = projected_step_seconds(row.probe_ms / 1e3, probe_n, n)
            reason = fused_skip_reason(projected, max_step_s, deadline - time.perf_counter())
            if reason:
                row.note = f"{reason} (probe {row.probe_ms:.0f} ms at {probe_n} tokens)"
                return row
        phase = "full size"
        torch.cuda.empty_cache()
        _sync()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        loss, grads = step(x)
        _sync()
        first = time.perf_counter() - t0
        row.peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
        row.loss = float(loss)
        del loss, grads
        n_reps = reps_within(first, reps, min(loop_s, deadline - time.perf_counter()))
        times = [_timed_ms(step, x) for _ in range(n_reps)]
        row.ms = sorted(times)[len(times) // 2]
        row.reps = n_reps
    except torch.cuda.OutOfMemoryError:
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if phase == "full size" else None
        row.note = (
            "OOM"
            + (f" at {phase}" if phase != "full size" else "")
            + (f" (>= {peak:.0f} MiB above the inputs when it failed)" if peak else "")
        )
        row.peak_mib = None
    except Exception as exc:
        msg = str(exc).splitlines()[0][:100] if str(exc) else ""
        row.note = f"raised {type(exc).__name__} at {phase}: {msg}"
    torch.cuda.empty_cache()
    return row


def run_fused_timings(
    report: Report,
    n: int,
    hs: int,
    ht: int,
    v: int,
    teacher_v: int,
    divergence: str,
    beta: float,
    temperature: float,
    gamma: float,
    masked: float,
    reps: int,
    loop_s: float,
    max_step_s: float,
    budget_s: float,
    probe_n: int,
    names: tuple[str, ...] = FUSED_TIMED,
    on_row: Callable[[], None] | None = None,
    min_start_s: float = 5.0,
) -> None:
    """Times each variant of ``names`` (see ``time_fused_variant``) into ``report.fused_timings``;
    a variant is not started with less than ``min_start_s`` of ``budget_s`` left."""
    deadline = time.perf_counter() + budget_s
    opts = dict(gamma=gamma, temperature=temperature, divergence=divergence, beta=beta)
    rate = measure_matmul_rate()
    report.matmul_tflops = rate / 1e12
    flops = fused_flops(n, v, hs, ht)
    report.fused_floor_ms = flop_floor_seconds(flops, rate) * 1e3
    x = fused_inputs(n, hs, ht, v, teacher_v, torch.bfloat16, False, masked, seed=4321, device="cuda", logit_std=3.0)
    report.fused_shape = {
        "n": n,
        "hs": hs,
        "ht": ht,
        "v": v,
        "teacher_v": teacher_v,
        "dtype": "bfloat16",
        "bias": False,
        "valid_tokens": int((x["labels"] != -100).sum()),
        "divergence": divergence,
        "beta": beta,
        "temperature": temperature,
        "gamma": gamma,
        "flops": flops,
        "probe_n": probe_n,
        "reps": reps,
        "budget_s": budget_s,
        "max_step_s": max_step_s,
    }
    print(
        f"  bf16 matmul {report.matmul_tflops:.0f} TFLOP/s; floor {report.fused_floor_ms:.2f} ms "
        f"({flops / 1e12:.1f} TFLOP)",
        flush=True,
    )
    for name in names:
        step, reason = make_fused_step(name, opts)
        if step is not None and deadline - time.perf_counter() < min_start_s:
            step, reason = None, f"skipped: --fused-budget-s {budget_s:g} spent"
        if step is None:
            report.fused_timings.append(FusedTimingRow(name, note=reason))
            print(f"  fused {name}: {reason}", flush=True)
            continue
        t0 = time.perf_counter()
        row = time_fused_variant(name, step, x, probe_n, reps, loop_s, max_step_s, deadline)
        if name == "liger" and row.note.startswith("raised") and "OOM" not in row.note:
            # torch.compile of Liger's chunk function can fail on a new torch/triton: retry eager
            eager, _ = make_fused_step("liger_eager", opts)
            assert eager is not None
            first_note = row.note
            row = time_fused_variant(name, eager, x, probe_n, reps, loop_s, max_step_s, deadline)
            row.note = f"compiled=False; compiled {first_note[:80]}" + (f"; {row.note}" if row.note else "")
        report.fused_timings.append(row)
        if on_row is not None:
            on_row()
        print(
            f"  fused {name}: {row.ms} ms x{row.reps}, peak {row.peak_mib} MiB, loss {row.loss}, "
            f"probe {row.probe_ms} ms, {time.perf_counter() - t0:.1f} s {row.note}",
            flush=True,
        )
    del x
    torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--v", type=int, default=151936)
    p.add_argument("--teacher-v", type=int, default=152064, help="teacher row width (sliced to --v)")
    p.add_argument("--divergence", default="forward_kl", choices=("forward_kl", "reverse_kl", "jsd"))
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=20.0, help="time budget of each backend's timed loop")
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--skip-fused", action="store_true", help="skip the fused lm_head + KD checks and timings")
    p.add_argument("--fused-only", action="store_true", help="run only the fused lm_head + KD part")
    p.add_argument("--fused-n", type=int, default=8192)
    p.add_argument("--fused-hs", type=int, default=2048)
    p.add_argument("--fused-ht", type=int, default=2048)
    p.add_argument("--fused-v", type=int, default=151936)
    p.add_argument("--fused-teacher-v", type=int, default=152064, help="teacher weight rows (sliced to --fused-v)")
    p.add_argument("--fused-divergence", default="forward_kl", choices=("forward_kl", "reverse_kl", "jsd"))
    p.add_argument("--fused-beta", type=float, default=0.5)
    p.add_argument("--fused-temperature", type=float, default=1.0)
    p.add_argument("--fused-gamma", type=float, default=0.2)
    p.add_argument("--fused-masked", type=float, default=0.1, help="fraction of labels set to -100")
    p.add_argument("--fused-variants", default=",".join(FUSED_TIMED), help=f"subset of {','.join(FUSED_TIMED)}")
    p.add_argument("--fused-reps", type=int, default=3, help="timed steps after one warm-up")
    p.add_argument("--fused-loop-s", type=float, default=10.0, help="time budget of each variant's timed loop")
    p.add_argument(
        "--fused-max-step-s",
        type=float,
        default=25.0,
        help="skip a variant whose step, projected from the probe, is longer",
    )
    p.add_argument(
        "--fused-budget-s",
        type=float,
        default=120.0,
        help="wall-clock budget of all fused timings (probes, warm-ups, timed steps)",
    )
    p.add_argument("--fused-probe-n", type=int, default=1024, help="tokens of the probe step")
    p.add_argument("--json", default=None, help="JSON path (default $OUT/kd_bench.json if OUT is set)")
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print("kd_bench: needs a CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    report = Report(device=torch.cuda.get_device_name(), torch=torch.__version__)
    try:
        import triton

        report.triton = triton.__version__
    except ImportError:
        report.triton = "not installed"
    print(f"device {report.device}, torch {report.torch}, triton {report.triton}", flush=True)
    print("backends on cuda:", json.dumps(dispatch.available_backends("cuda")), flush=True)

    if args.fused_only:
        args.skip_check = args.skip_timing = True
        args.skip_fused = False
    out = args.json or (os.path.join(os.environ["OUT"], "kd_bench.json") if os.environ.get("OUT") else None)

    def write_json() -> None:  # after each section: a run cut short still leaves what it measured
        if out:
            Path(out).write_text(json.dumps(asdict(report), indent=2))

    if not args.skip_check:
        t0 = time.perf_counter()
        check_backends(report)
        print(f"\n== oracle checks ({time.perf_counter() - t0:.1f} s) ==")
        for c in report.checks:
            print(f"{'ok  ' if c.ok else 'FAIL'} {c.backend:<8} {c.case}: {c.detail}")
        write_json()
    if not args.skip_timing:
        t0 = time.perf_counter()
        run_timings(
            report,
            args.n,
            args.v,
            args.teacher_v,
            args.divergence,
            args.beta,
            args.temperature,
            args.reps,
            args.budget_s,
        )
        print(f"(timings took {time.perf_counter() - t0:.1f} s)")
        write_json()
    if not args.skip_fused:
        t0 = time.perf_counter()
        try:
            check_fused(report)
        except Exception as exc:
            traceback.print_exc()
            report.fused_checks.append(CheckRow("fused", "check_fused", False, f"raised {type(exc).__name__}: {exc}"))
        print(f"\n== fused lm_head + KD oracle checks ({time.perf_counter() - t0:.1f} s) ==")
        for c in report.fused_checks:
            print(f"{'ok  ' if c.ok else 'FAIL'} {c.backend:<8} {c.case}: {c.detail}")
        write_json()
        t0 = time.perf_counter()
        print("\n== fused lm_head + KD timings ==", flush=True)
        variants = tuple(v.strip() for v in args.fused_variants.split(",") if v.strip())
        try:
            run_fused_timings(
                report,
                args.fused_n,
                args.fused_hs,
                args.fused_ht,
                args.fused_v,
                args.fused_teacher_v,
                args.fused_divergence,
                args.fused_beta,
                args.fused_temperature,
                args.fused_gamma,
                args.fused_masked,
                args.fused_reps,
                args.fused_loop_s,
                args.fused_max_step_s,
                args.fused_budget_s,
                args.fused_probe_n,
                variants,
                on_row=write_json,
            )
        except Exception as exc:
            traceback.print_exc()
            report.fused_timings.append(FusedTimingRow("fused", note=f"raised {type(exc).__name__}: {exc}"[:160]))
        print(f"(fused timings took {time.perf_counter() - t0:.1f} s)")

    write_json()
    if out:
        print(f"wrote {out}")
    if report.timings:
        s = report.shape
        print(
            f"\n== KD loss forward+backward, N={s['n']} V={s['v']} (teacher {s['teacher_v']} sliced) bf16 "
            f"{s['divergence']} T={s['temperature']} on {report.device}; copy rate "
            f"{report.copy_rate_gb_s:.0f} GB/s (read+write) =="
        )
        print(format_table(report.timings, report.floor_ms))
    if report.fused_timings:
        s = report.fused_shape
        shape = (
            f"N={s['n']} ({s['valid_tokens']} valid) Hs={s['hs']} Ht={s['ht']} V={s['v']} (teacher "
            f"{s['teacher_v']} rows sliced) bf16 {s['divergence']} T={s['temperature']} "
            if s
            else ""
        )
        print(
            f"\n== fused lm_head + KD forward+backward, {shape}on {report.device}; peak = max allocated above "
            f"the inputs, gradients included =="
        )
        print(format_fused_table(report.fused_timings, report.fused_floor_ms, report.matmul_tflops))
    failed = [c for c in report.checks if not c.ok]
    if failed:
        print(
            f"\n{len(failed)} oracle check(s) FAILED or unavailable: " + ", ".join(sorted({c.backend for c in failed}))
        )
    fused_failed = [c for c in report.fused_checks if not c.ok]
    if fused_failed:
        print(
            f"\n{len(fused_failed)} fused oracle check(s) FAILED or unavailable: "
            + ", ".join(sorted({c.backend for c in fused_failed}))
        )
    all_checks = report.checks + report.fused_checks
    return 1 if any(not c.ok and not c.detail.startswith("unavailable") for c in all_checks) else 0


if __name__ == "__main__":
    sys.exit(main())
