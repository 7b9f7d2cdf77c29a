"""KD loss on given logits, forward + backward, N=4096, V=32000, float32, on this CPU.

Variants (same run, same inputs): ``naive`` (F.log_softmax of both + F.kl_div + F.cross_entropy,
autograd: what users write), ``chunked`` (ddk_kernels.chunked) and ``cpp`` (ddk_kernels._C).
``extra_info`` of each variant:

* ``speedup_vs_naive``: naive median / variant median (same run).
* ``peak_mb_above_inputs`` / ``peak_ratio_vs_naive``: peak resident memory above the inputs, each
  variant measured once in a fresh subprocess: after warming torch up on a tiny problem and
  building the inputs, the kernel's RSS high-water mark is reset (``/proc/self/clear_refs`` = 5)
  and ``VmHWM`` after one forward + backward minus ``VmRSS`` before is reported. The high-water
  mark sees every temporary however short-lived, and a fresh process keeps earlier variants'
  cached blocks out of it. (``resource.getrusage().ru_maxrss`` does not work here: a child started
  from the benchmark process inherits the parent's maximum across fork/exec.) The gradient
  (N x V, 500 MB) is part of every variant's peak. Linux only.
* machine floors measured in the same run (cpp only): ``copy_gbps`` (torch copy of a 512 MiB
  tensor, bytes read + written per second) and ``exp_gexps`` (torch.exp, the vectorised Sleef exp,
  on an L2-resident float32 tensor with arguments in [-10, 0], one thread, times the threads). Floors for the cpp
  forward-KL kernel: memory = 5 N V 4 bytes (forward reads both logits, backward reads both again
  and writes the gradient) / copy bandwidth; exp = 4 N V exps (2 in forward, 2 in backward) /
  exp rate. ``cpp_over_mem_floor`` and ``cpp_over_exp_floor`` are the cpp median over each floor.

Run: ``make bench`` or ``.venv/bin/python -m pytest bench/test_bench_kd_loss.py --benchmark-only``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ddk_kernels import chunked
from ddk_kernels.types import KDConfig

N, V = 4096, 32000
ROOT = Path(__file__).resolve().parents[1]
_RESULTS: dict[str, float] = {}


def _inputs(n: int = N, v: int = V) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(n, v, generator=g).mul_(15.0)
    zt = torch.randn(n, v, generator=g).mul_(15.0).add_(zs, alpha=0.6)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::7] = -100
    return zs.requires_grad_(True), zt, labels


def _naive(zs: torch.Tensor, zt: torch.Tensor, labels: torch.Tensor) -> None:
    log_q = F.log_softmax(zs, dim=-1)
    log_p = F.log_softmax(zt, dim=-1)
    kd = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    ce = F.cross_entropy(zs, labels, ignore_index=-100, reduction="none")
    valid = labels != -100
    (ce.sum() + 0.2 * (kd * valid).sum()).backward()


def _backend(name: str):  # type: ignore[no-untyped-def]
    mod = chunked
    if name == "cpp":
        from ddk_kernels import cpp as mod  # type: ignore[no-redef]

    def run(zs: torch.Tensor, zt: torch.Tensor, labels: torch.Tensor) -> None:
        ce, kd = mod.row_losses(zs, zt, labels, KDConfig())
        (ce.sum() + 0.2 * kd.sum()).backward()

    return run


VARIANTS = {"naive": lambda: _naive, "chunked": lambda: _backend("chunked"), "cpp": lambda: _backend("cpp")}

_PEAK_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, {bench!r})
import test_bench_kd_loss as b

def status_kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

fn = b.VARIANTS[{variant!r}]()
fn(*b._inputs(8, 64))                        # warm up torch (thread pools, kernels, allocator)
zs, zt, labels = b._inputs()
zs.grad = None
before = status_kb("VmRSS")
with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark VmHWM to the current RSS
    f.write("5")
fn(zs, zt, labels)
print(json.dumps({{"peak_mb_above_inputs": (status_kb("VmHWM") - before) / 1024.0}}))
"""


def _peak_above_inputs(variant: str) -> float:
    """Peak RSS growth (MB) of one forward+backward of ``variant``, in a fresh interpreter."""
    code = _PEAK_SCRIPT.format(bench=str(Path(__file__).parent), variant=variant)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, timeout=900)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mb_above_inputs"])


def _copy_bandwidth() -> float:
    """Bytes read + written per second by a torch copy of a 512 MiB float32 tensor (best of 5)."""
    src = torch.empty(128 * 1024 * 1024).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best


def _exp_rate() -> float:
    """float32 exps per second of the machine: torch.exp (vectorised Sleef) on one thread, on an
    L2-resident tensor with arguments in [-10, 0] (best of 5), times the number of threads.

    One thread because thousands of tiny parallel regions measure OpenMP barriers on a shared
    machine rather than exp; exp scales linearly over cores.
    """
    threads = torch.get_num_threads()
    x = torch.empty(64 * 1024).uniform_(-10.0, 0.0)
    out = torch.empty_like(x)
    reps = 500
    best = float("inf")
    torch.set_num_threads(1)
    try:
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.exp(x, out=out)
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return x.numel() * reps / best * threads


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _inputs()


@pytest.mark.parametrize("variant", ["naive", "chunked", "cpp"])
def test_bench_kd_loss_fwd_bwd(benchmark, inputs, variant: str) -> None:  # type: ignore[no-untyped-def]
    if variant == "cpp":
        from ddk_kernels import cpp

        ok, reason = cpp.is_available("cpu")
        if not ok:
            pytest.skip(reason)
    fn = VARIANTS[variant]()
    zs, zt, labels = inputs

    def step() -> None:
        zs.grad = None
        fn(zs, zt, labels)

    benchmark.group = f"kd_loss fwd+bwd N={N} V={V} fp32 cpu threads={torch.get_num_threads()}"
    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    _RESULTS[variant] = median
    info = benchmark.extra_info
    info["peak_mb_above_inputs"] = round(_peak_above_inputs(variant), 1)
    _RESULTS[f"{variant}_peak"] = info["peak_mb_above_inputs"]
    if "naive" in _RESULTS:
        info["speedup_vs_naive"] = round(_RESULTS["naive"] / median, 3)
        if _RESULTS.get("naive_peak"):
            info["peak_ratio_vs_naive"] = round(info["peak_mb_above_inputs"] / _RESULTS["naive_peak"], 3)
    if variant == "cpp":
        bw, rate = _copy_bandwidth(), _exp_rate()
        mem_floor = 5 * N * V * 4 / bw
        exp_floor = 4 * N * V / rate
        info.update(
            copy_gbps=round(bw / 1e9, 2),
            exp_gexps=round(rate / 1e9, 3),
            mem_floor_s=round(mem_floor, 4),
            exp_floor_s=round(exp_floor, 4),
            cpp_over_mem_floor=round(median / mem_floor, 2),
            cpp_over_exp_floor=round(median / exp_floor, 2),
        )
