"""Fused lm_head + KD loss: forward + backward time and peak memory (CPU, float32).

Compares, at N=4096 tokens, Hs=Ht=512, V=32000 (10% of the labels ignored, and all valid; forward KL,
gamma=0.2):

* ``naive``: full student and teacher logits, ``kd_loss_reference``, autograd;
* ``liger``: ``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss(beta=0)`` (forward KL,
  ``weight_hard_loss=1``, ``weight_soft_loss=0.2``: the same loss; default ``chunk_size=1024``,
  ``compiled=False`` since torch.compile on CPU recompiles per chunk shape), skipped when not
  installed;
* ``fused_auto`` / ``fused_gemm`` / ``fused_token_chunks`` / ``fused_recompute``:
  ``fused_linear_kd_loss`` with each strategy.

Time: pytest-benchmark (``DDK_BENCH_ROUNDS`` rounds, default 1, after one warm-up round). Peak memory: each variant again
in a fresh subprocess (``python bench/test_bench_fused.py VARIANT N V H``) that allocates the
inputs, resets the peak RSS (``/proc/self/clear_refs`` = 5) and reports ``VmHWM`` minus the RSS
before the call, i.e. the peak above the inputs (``extra_info["peak_mb"]``; ``ru_maxrss`` delta
as a fallback). The scaling test runs only the fused path, one subprocess per shape, for
N in {1024, 4096, 16384} and V in {32000, 128256}.

Run: ``.venv/bin/python -m pytest bench/test_bench_fused.py --benchmark-json bench/results/fused.json``
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import reset_peak, status_kb

N, HID, V = 4096, 512, 32000
ROUNDS = int(os.environ.get("DDK_BENCH_ROUNDS", "1"))
THREADS = int(os.environ.get("DDK_BENCH_THREADS", "2"))
HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None
VARIANTS = ["naive", "liger", "fused_auto", "fused_gemm", "fused_token_chunks", "fused_recompute"]
IGNORED = [0.1, 0.0]  # share of ignored labels: the usual padding, and every label valid
_ROOT = Path(__file__).resolve().parents[1]
_RESULTS: dict[str, dict] = {}


def make_inputs(n: int, v: int, hid: int, seed: int = 0, ignored: float = 0.1) -> dict:
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, hid, generator=g) * 0.7).requires_grad_()
    w = (torch.randn(v, hid, generator=g) * 0.7).requires_grad_()
    th = torch.randn(n, hid, generator=g) * 0.7
    tw = torch.randn(v, hid, generator=g) * 0.7
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignored] = -100
    return {"h": h, "w": w, "th": th, "tw": tw, "labels": labels}


def make_step(variant: str):  # type: ignore[no-untyped-def]
    """A function ``step(inputs) -> loss float`` running forward + backward of ``variant``."""
    if variant == "naive":
        from ddk_kernels.reference import kd_loss_reference

        def step(x: dict) -> float:
            zs = x["h"] @ x["w"].T
            zt = x["th"] @ x["tw"].T
            loss = kd_loss_reference(zs, zt, x["labels"], gamma=0.2).loss
            loss.backward()
            return float(loss.detach())

    elif variant == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        mod = LigerFusedLinearJSDLoss(
            weight_hard_loss=1.0, weight_soft_loss=0.2, beta=0.0, temperature=1.0, compiled=False
        )

        def step(x: dict) -> float:
            loss = mod(x["h"], x["w"], x["th"], x["tw"], x["labels"])
            loss.backward()
            return float(loss.detach())

    else:
        from ddk.losses.fused import fused_linear_kd_loss

        strategy = variant.removeprefix("fused_")

        def step(x: dict) -> float:
            out = fused_linear_kd_loss(
                x["h"],
                x["w"],
                x["labels"],
                teacher_hidden=x["th"],
                teacher_weight=x["tw"],
                gamma=0.2,
                strategy=strategy,
                backend="chunked",
            )
            out.loss.backward()
            return float(out.loss.detach())

    return step


def measure_in_this_process(variant: str, n: int, v: int, hid: int, ignored: float = 0.1) -> dict:
    """One forward + backward; peak RSS above the inputs (MiB) and wall time (s)."""
    torch.set_num_threads(THREADS)
    step = make_step(variant)
    x = make_inputs(n, v, hid, ignored=ignored)
    gc.collect()
    rss_before = status_kb("VmRSS")
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hwm_ok = reset_peak()
    t0 = time.perf_counter()
    loss = step(x)
    dt = time.perf_counter() - t0
    if hwm_ok:
        peak_kb = status_kb("VmHWM") - rss_before
    else:
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss_before
    return {
        "variant": variant,
        "n": n,
        "v": v,
        "h": hid,
        "time_s": dt,
        "peak_mb": peak_kb / 1024,
        "method": "VmHWM-after-clear_refs" if hwm_ok else "ru_maxrss-delta",
        "loss": loss,
        "threads": torch.get_num_threads(),
    }


def measure_in_subprocess(variant: str, n: int, v: int, hid: int, ignored: float = 0.1) -> dict:
    env = {**os.environ, "PYTHONPATH": str(_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, __file__, variant, str(n), str(v), str(hid), str(ignored)],
        capture_output=True,
        text=True,
        env=env,
        cwd=_ROOT,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("ignored", IGNORED)
def test_bench_fused_fwd_bwd(benchmark, variant: str, ignored: float) -> None:  # type: ignore[no-untyped-def]
    if variant == "liger" and not HAS_LIGER:
        pytest.skip("liger-kernel is not installed")
    torch.set_num_threads(THREADS)
    step = make_step(variant)
    x = make_inputs(N, V, HID, ignored=ignored)

    def setup():  # type: ignore[no-untyped-def]
        x["h"].grad = None
        x["w"].grad = None
        return (x,), {}

    benchmark.pedantic(step, setup=setup, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    mem = measure_in_subprocess(variant, N, V, HID, ignored)
    results = _RESULTS.setdefault(str(ignored), {})
    results[variant] = {"time_s": benchmark.stats.stats.min, "peak_mb": mem["peak_mb"]}
    benchmark.extra_info.update(
        {
            "n": N,
            "v": V,
            "h": HID,
            "ignored": ignored,
            "peak_mb": round(mem["peak_mb"], 1),
            "peak_method": mem["method"],
            "subprocess_time_s": round(mem["time_s"], 3),
            "threads": THREADS,
        }
    )
    for other in ("naive", "liger"):
        if other in results and other != variant:
            benchmark.extra_info[f"time_vs_{other}"] = round(results[variant]["time_s"] / results[other]["time_s"], 3)
            benchmark.extra_info[f"peak_vs_{other}"] = round(
                results[variant]["peak_mb"] / max(results[other]["peak_mb"], 1e-9), 3
            )


@pytest.mark.parametrize("v", [32000, 128256])
@pytest.mark.parametrize("n", [1024, 4096, 16384])
def test_bench_fused_scaling(benchmark, n: int, v: int) -> None:  # type: ignore[no-untyped-def]
    """Fused path only (strategy auto), one fresh subprocess per shape, one round."""
    res: dict = {}

    def run() -> None:
        res.update(measure_in_subprocess("fused_auto", n, v, HID))

    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    from ddk_kernels.fused_plan import plan_fused

    plan = plan_fused(int(n * 0.9), v)
    benchmark.extra_info.update(
        {
            "n": n,
            "v": v,
            "h": HID,
            "fwd_bwd_time_s": round(res["time_s"], 3),
            "peak_mb": round(res["peak_mb"], 1),
            "plan": f"{plan.strategy} chunk={plan.token_chunk} tile={plan.vocab_tile}",
            "dW_mb": v * HID * 4 / 2**20,
            "dh_mb": n * HID * 4 / 2**20,
            "threads": THREADS,
        }
    )


if __name__ == "__main__":  # worker: python bench/test_bench_fused.py VARIANT N V H [IGNORED]
    variant_arg, n_arg, v_arg, h_arg = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    ignored_arg = float(sys.argv[5]) if len(sys.argv) > 5 else 0.1
    print(json.dumps(measure_in_this_process(variant_arg, n_arg, v_arg, h_arg, ignored_arg)))
