"""Rank 0's peak memory and the time of a checkpoint save, its resume and the final student export
under FSDP2 on 1, 2 and 4 gloo ranks (CPU, loopback): the full-state path ddk used before (every
tensor gathered on rank 0, one file) against the sharded one (every rank writes its own shard).

    .venv/bin/python bench/checkpoint_bench.py                   # R = 1, 2, 4; markdown tables
    .venv/bin/python bench/checkpoint_bench.py --ranks 2 --layers 2 --json out.json

Each (R, variant) is one fresh ``torchrun --standalone --nproc_per_node R`` run of this file with
``--worker``. Every rank builds the same float32 Llama student from a config (default hidden 640,
8 blocks, vocabulary 32000, untied: 80.7M parameters), shards it with ``fully_shard`` (every block,
then the root) inside a ``DistillStep``-like module, and takes one AdamW step (so the optimizer
holds its two moments: the state is 3 x 4 bytes per parameter). Then, each stage measured on every
rank (``malloc_trim`` first, the RSS high-water mark reset, ``VmHWM`` after the stage minus
``VmRSS`` before it) and timed between two barriers:

* save: ``full``: ``ddk.engine.parallel.train_state`` (the full state gathered on rank 0 with
  ``cpu_offload``) + ``ckpt.save_checkpoint`` by rank 0 (ddk before sharded checkpoints);
  ``sharded``: ``ddk.engine.sharded.save_sharded_checkpoint``; ``dcp-stock``: the same, but the
  shards written by torch's own ``HuggingFaceStorageWriter`` (the writer ddk replaced);
* resume into the same run: ``full``: every rank reads the one file and loads the full state;
  ``sharded``: ``read_checkpoint`` + ``load_loaded_state`` (every rank reads its slices); the
  restored parameters are checked bit-identical to the saved ones;
* student export: ``full``: ``full_student_state`` + ``save_student`` (the whole student
  gathered on rank 0); ``sharded``: ``save_final_student`` (one tensor gathered at a time).

Every file is hashed (SHA-256) as the run folder's files are; the page cache is warm for the resume.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
VARIANTS = ("full", "sharded", "dcp-stock")


class _NoTokenizer:
    def save_pretrained(self, path: str) -> None:  # the export's tokenizer: nothing to write
        pass


def _libc() -> Any:
    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (n, ctypes.c_size_t)
            for n in (
                "arena",
                "ordblks",
                "smblks",
                "hblks",
                "hblkhd",
                "usmblks",
                "fsmblks",
                "uordblks",
                "fordblks",
                "keepcost",
            )
        ]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    return libc


def _in_use(libc: Any) -> int:
    """Bytes malloc has handed out and not taken back (every arena, mmapped blocks included)."""
    m = libc.mallinfo2()
    return int(m.uordblks + m.hblkhd)


def _stage(name: str, res: dict[str, Any], fn: Any) -> Any:
    """Run ``fn`` between two barriers and record its time and its memory: ``heap_mib``, the peak
    of malloc's bytes in use above those before (sampled every millisecond by a thread; neither
    freed memory malloc keeps nor the pages of files read through mmap count), and ``rss_mib``,
    the RSS high-water mark above the RSS before (counts both)."""
    import threading

    import torch.distributed as dist

    from bench.memory import reset_peak, status_kb

    libc = _libc()
    libc.malloc_trim(0)
    dist.barrier()
    before, heap0 = status_kb("VmRSS"), _in_use(libc)
    peak, done = [heap0], threading.Event()

    def sample() -> None:
        while not done.wait(0.001):
            peak[0] = max(peak[0], _in_use(libc))

    sampler = threading.Thread(target=sample, daemon=True)
    reset_peak()
    sampler.start()
    t0 = time.perf_counter()
    out = fn()
    dist.barrier()
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    peak[0] = max(peak[0], _in_use(libc))
    res[name] = {
        "s": seconds,
        "heap_mib": (peak[0] - heap0) / 2**20,
        "rss_mib": (status_kb("VmHWM") - before) / 1024,
        "rss_before_mib": before / 1024,
        "rss_peak_mib": status_kb("VmHWM") / 1024,
    }
    return out


def worker(out: str, variant: str, hidden: int, layers: int, vocab: int) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    from ddk.distributed import tensor_checksum
    from ddk.engine import checkpoint as ckpt
    from ddk.engine import sharded
    from ddk.engine.export import save_final_student
    from ddk.engine.models import save_student
    from ddk.engine.parallel import full_student_state, load_train_state, train_state

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(2.7 * hidden),
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
        tie_word_embeddings=False,
    )

    class Step(torch.nn.Module):  # the student under ``student``, as DistillStep holds it
        def __init__(self) -> None:
            super().__init__()
            self.student = LlamaForCausalLM(cfg)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.student(input_ids=ids, labels=ids).loss

    step = Step()
    params = sum(p.numel() for p in step.parameters())
    for layer in step.student.model.layers:
        fully_shard(layer)
    fully_shard(step)
    opt = torch.optim.AdamW(step.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (world, 16), generator=torch.Generator().manual_seed(1))[rank : rank + 1]
    step(ids).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    before = tensor_checksum(p.to_local() for p in step.parameters())
    run = Path(out).parent / "run"
    rest = {"config": {}, "rng": ckpt.rng_state()}
    res: dict[str, Any] = {"world": world, "variant": variant, "params": params, "state_mib": params * 12 / 2**20}

    def save() -> Path:
        if variant == "full":
            student_state, opt_state = train_state(step, step.student, opt, True)
            if rank == 0:
                ckpt.save_checkpoint(run, 1, {**rest, "student": student_state, "optimizer": opt_state}, keep=1)
            return run / "checkpoint-1"
        if variant == "dcp-stock":
            from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter

            original = sharded._shard_writer
            sharded._shard_writer = lambda folder: HuggingFaceStorageWriter(str(folder), save_distributed=True)  # type: ignore[assignment]
            try:
                return sharded.save_sharded_checkpoint(run, 1, rest if rank == 0 else None, step, opt, keep=1)
            finally:
                sharded._shard_writer = original  # type: ignore[assignment]
        return sharded.save_sharded_checkpoint(run, 1, rest if rank == 0 else None, step, opt, keep=1)

    path = _stage("save", res, save)
    res["files_mib"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20

    def resume() -> None:
        ck = sharded.read_checkpoint(path, step_mod=step, student=step.student, opt=opt, fsdp=True)
        if variant == "full":  # every rank holds the whole state, then keeps its shard
            load_train_state(step, step.student, opt, ck, True)
        else:
            sharded.load_loaded_state(step, opt, ck[sharded.LOADED])

    if variant != "dcp-stock":
        _stage("resume", res, resume)
        res["resume_exact"] = tensor_checksum(p.to_local() for p in step.parameters()) == before

        def export() -> None:
            if variant == "full":
                save_student(full_student_state(step, step.student, True), step.student, _NoTokenizer(), run)
            else:
                save_final_student(step, step.student, _NoTokenizer(), run, fsdp=True)

        _stage("export", res, export)
    every: list[Any] = [None] * world
    dist.all_gather_object(every, res)
    if rank == 0:
        res["ranks"] = every
        Path(out).write_text(json.dumps(res))
    dist.destroy_process_group()


def _table(rows: list[dict[str, Any]]) -> str:
    def cell(r: dict[str, Any], stage: str) -> str:
        x = r.get(stage)
        return f"{x['heap_mib']:.0f} / {x['rss_mib']:.0f} | {x['s']:.1f}" if x else "- | -"

    lines = [
        "| ranks | variant | save: rank 0 heap / RSS above before (MiB) | / full state | RSS peak (MiB) "
        "| largest rank heap (MiB) | save (s) | resume: rank 0 heap / RSS (MiB) | resume (s) "
        "| export: rank 0 heap / RSS (MiB) | export (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        save, state = r["save"], r["state_mib"]
        worst = max(x["save"]["heap_mib"] for x in r["ranks"])
        lines.append(
            f"| {r['world']} | {r['variant']} | {save['heap_mib']:.0f} / {save['rss_mib']:.0f} "
            f"| {save['heap_mib'] / state:.2f} | {save['rss_peak_mib']:.0f} | {worst:.0f} | {save['s']:.1f} "
            f"| {cell(r, 'resume')} | {cell(r, 'export')} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--hidden", type=int, default=640)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--json", help="write every rank's figures here")
    p.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.variant, args.hidden, args.layers, args.vocab)
        return
    rows = []
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    t0 = time.perf_counter()
    for r in args.ranks:
        for variant in args.variants:
            with tempfile.TemporaryDirectory() as tmp:
                out = str(Path(tmp) / "res.json")
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={r}", __file__]
                cmd += ["--worker", out, "--variant", variant]
                cmd += ["--hidden", str(args.hidden), "--layers", str(args.layers), "--vocab", str(args.vocab)]
                subprocess.run(cmd, check=True, env=env, cwd=REPO)
                rows.append(json.loads(Path(out).read_text()))
            print(f"ranks {r}, {variant}: done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    first = rows[0]
    print(
        f"student: {first['params'] / 1e6:.1f}M parameters, state (parameters + 2 AdamW moments, float32) "
        f"{first['state_mib']:.0f} MiB; {time.perf_counter() - t0:.0f} s in all"
    )
    print(_table(rows))
    if not all(r.get("resume_exact", True) for r in rows):
        print("RESUME NOT EXACT in", [(r["world"], r["variant"]) for r in rows if not r.get("resume_exact", True)])
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
