"""Correctness check and timing of every CUDA backend of the KD loss (run by bench/gpu/run.sh).

1. Checks triton, cpp (the compiled ops on CUDA) and chunked against the float64 oracle on a
   few shapes (values and gradients, the error-relative rule of tests/kd_cases.py).
2. Times forward + backward at N=8192, V=151936, bf16 (teacher padded to 152064 and sliced, as
   Qwen-style models are) for reference (naive torch), chunked, triton and cpp (CUDA), with the
   peak extra memory of each, against the memory-bandwidth floor: ``3 * N * V * 2`` bytes (read
   both logits, write the gradient) over the measured device-to-device copy rate.
3. Prints a short table last and writes JSON to ``$OUT/kd_bench.json`` (or ``--json``).

Importable without CUDA (the pure helpers are unit-tested in tests/bench/gpu/).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ddk_kernels import dispatch  # noqa: E402
from ddk_kernels.reference import kd_logits_grad_reference, kd_row_losses_reference  # noqa: E402
from ddk_kernels.types import KDConfig  # noqa: E402

BACKENDS_TIMED: tuple[str, ...] = ("reference", "chunked", "triton", "cpp")
BACKENDS_CHECKED: tuple[str, ...] = ("triton", "cpp", "chunked")


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
class Report:
    device: str = ""
    torch: str = ""
    triton: str = ""
    shape: dict = field(default_factory=dict)
    copy_rate_gb_s: float | None = None
    floor_ms: float | None = None
    checks: list[CheckRow] = field(default_factory=list)
    timings: list[TimingRow] = field(default_factory=list)


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
    fn, reason = dispatch._probe(name, torch.device("cuda"))
    return fn, reason


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
            except Exception as exc:  # noqa: BLE001 - report and go on with the other backends
                report.checks.append(CheckRow(name, case, False, f"raised {type(exc).__name__}: {exc}"))
                continue
            atol = 1e-9 if dtype == torch.float64 else 2e-5
            parts, ok = [], True
            for what, fast, oracle, idx, k in (("ce", ce, o_ce, 0, 2), ("kd", kd, o_kd, 1, 2), ("grad", g, o_g, 2, 3)):
                err = float((fast.detach().double() - oracle).abs().max())
                err_naive = float((naive[idx].double() - oracle).abs().max()) if naive else 0.0
                good = error_relative_ok(err, err_naive, k, atol)
                ok &= good
                parts.append(f"{what} {err:.2e}" + (f"/naive {err_naive:.2e}" if naive else "") + ("" if good else " FAIL"))
            dtype_ok = ce.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and g.dtype == dtype
            if not dtype_ok:
                ok = False
                parts.append(f"dtypes ce={ce.dtype} grad={g.dtype} FAIL")
            report.checks.append(CheckRow(name, case, ok, ", ".join(parts)))
        del zs, zt, labels, o_g
        torch.cuda.empty_cache()


def time_backend(
    name: str, fn: Callable, zs: torch.Tensor, zt: torch.Tensor, labels: torch.Tensor, cfg: KDConfig,
    reps: int, budget_s: float,
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
    except Exception as exc:  # noqa: BLE001
        row.note = f"raised {type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"
    torch.cuda.empty_cache()
    return row


def run_timings(report: Report, n: int, v: int, teacher_v: int, divergence: str, beta: float, temperature: float,
                reps: int, budget_s: float, names: tuple[str, ...] = BACKENDS_TIMED) -> None:
    cfg = KDConfig(temperature=temperature, divergence=divergence, beta=beta)
    zs, zt, labels = _inputs(n, v, torch.bfloat16, 1234, teacher_v - v, masked=0.1)
    report.shape = {"n": n, "v": v, "teacher_v": teacher_v, "dtype": "bfloat16", "divergence": divergence,
                    "beta": beta, "temperature": temperature}
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

    if not args.skip_check:
        t0 = time.perf_counter()
        check_backends(report)
        print(f"\n== oracle checks ({time.perf_counter() - t0:.1f} s) ==")
        for c in report.checks:
            print(f"{'ok  ' if c.ok else 'FAIL'} {c.backend:<8} {c.case}: {c.detail}")
    if not args.skip_timing:
        t0 = time.perf_counter()
        run_timings(report, args.n, args.v, args.teacher_v, args.divergence, args.beta, args.temperature,
                    args.reps, args.budget_s)
        print(f"(timings took {time.perf_counter() - t0:.1f} s)")

    out = args.json or (os.path.join(os.environ["OUT"], "kd_bench.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).write_text(json.dumps(asdict(report), indent=2))
        print(f"wrote {out}")
    if report.timings:
        s = report.shape
        print(f"\n== KD loss forward+backward, N={s['n']} V={s['v']} (teacher {s['teacher_v']} sliced) bf16 "
              f"{s['divergence']} T={s['temperature']} on {report.device}; copy rate "
              f"{report.copy_rate_gb_s:.0f} GB/s (read+write) ==")
        print(format_table(report.timings, report.floor_ms))
    failed = [c for c in report.checks if not c.ok]
    if failed:
        print(f"\n{len(failed)} oracle check(s) FAILED or unavailable: "
              + ", ".join(sorted({c.backend for c in failed})))
    return 1 if any(not c.ok and not c.detail.startswith("unavailable") for c in report.checks) else 0


if __name__ == "__main__":
    sys.exit(main())
