"""Smoke test of ``ddk distill`` on CUDA: one process under torchrun with NCCL and FSDP2 (``--fsdp``).

Builds the tiny corpus, tokenizer and teacher of ``tests/ddk/recipes/test_pipeline.py`` in a
temporary folder, runs ``torchrun --standalone --nproc_per_node=1 -m ddk.recipes.cli distill --fsdp``
(the process group is NCCL when CUDA is visible) and, for comparison, the same config in this
process without torchrun (CPU). Prints the DDK weight trajectories and the largest difference of
the final student parameters (GPU vs CPU float32: rounding differs, so only closeness is
expected). Exit code 0 when the torchrun run finished and wrote its summary.

    python bench/gpu/distill_smoke.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))

import torch  # noqa: E402
import yaml  # noqa: E402
from recipe_cases import own_cfg  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from ddk.recipes.distill import distill  # noqa: E402


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="ddk_distill_smoke_"))
    base = dict(steps=6, batch_size=4, interval=2, checkpoint_every=2, log_every=1, threads=1)
    cpu = own_cfg(tmp, out=str(tmp / "runs" / "cpu"), **base)
    t0 = time.perf_counter()
    distill(cpu)
    print(f"one process (CPU): {time.perf_counter() - t0:.1f} s")
    gpu = own_cfg(tmp, out=str(tmp / "runs" / "fsdp"), fsdp=True, debug_checks=True, **base)
    path = tmp / "fsdp.yaml"
    path.write_text(yaml.safe_dump(gpu.to_dict()))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=1",
        "-m",
        "ddk.recipes.cli",
        "distill",
        "--config",
        str(path),
    ]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    print(
        f"torchrun --nproc_per_node=1 --fsdp (cuda available: {torch.cuda.is_available()}): "
        f"rc {res.returncode}, {time.perf_counter() - t0:.1f} s"
    )
    if res.returncode != 0:
        print(res.stdout[-3000:], res.stderr[-6000:], sep="\n")
        return 1
    run_cpu, run_gpu = tmp / "runs" / "cpu", tmp / "runs" / "fsdp"
    for name, run in (("cpu", run_cpu), ("fsdp", run_gpu)):
        log = [json.loads(x) for x in (run / "controller.jsonl").read_text().splitlines()]
        print(name, "weights:", [[round(w, 5) for w in r["weights"]] for r in log])
    a = load_file(str(run_cpu / "student" / "model.safetensors"))
    b = load_file(str(run_gpu / "student" / "model.safetensors"))
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    print(f"final student parameters, max |cpu - fsdp on cuda| = {worst:.3g}")
    print("summary:", json.loads((run_gpu / "summary.json").read_text())["final_weights"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
