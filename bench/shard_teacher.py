"""Parameter bytes per rank of a teacher and a student replicated vs sharded with FSDP2, on 1, 2 and
4 gloo ranks (CPU, loopback), and the loss of the sharded teacher against the replicated one.

    .venv/bin/python bench/shard_teacher.py              # R = 1, 2, 4; prints a markdown table
    .venv/bin/python bench/shard_teacher.py --ranks 2    # one world size

Each world size is one ``torchrun --standalone --nproc_per_node R`` run of this file with
``--worker``. Every rank builds the same float32 Llama teacher (8 blocks, hidden 512, vocabulary
4096: 25.2M parameters, 17% of them in the embeddings and output layer) and student (2 blocks,
hidden 128: 1.4M), computes the fused KD loss of its
share of a 4-sequence batch against the replicated teacher, then shards the teacher with
``ddk.engine.parallel.shard_teacher`` and the student with ``fully_shard`` (blocks, then root)
and computes it again. Reported per rank (rank 0): parameter bytes held (``ddk.distributed.
local_bytes``: a ``DTensor`` counts its local shard), the teacher's peak while gathered (computed,
not measured: its shard plus its largest block plus its root group, i.e. embeddings, final norm
and output layer, gathered from the teacher's forward until the loss has read it), and the
largest relative difference of the loss sums (summed over ranks) between the two teachers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _models() -> tuple[object, object]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama(hidden: int, layers: int, seed: int) -> LlamaForCausalLM:
        torch.manual_seed(seed)
        cfg = LlamaConfig(
            vocab_size=4096,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            tie_word_embeddings=False,
        )
        return LlamaForCausalLM(cfg).eval()

    return llama(512, 8, 1).requires_grad_(False), llama(128, 2, 2)


def worker(out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from ddk.distributed import local_bytes
    from ddk.engine.parallel import shard_teacher
    from ddk.losses.causal_lm import causal_lm_kd_loss

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    teacher, student = _models()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4096, (4, 64), generator=g)
    mine = ids[rank::world]

    def sums() -> list[float]:
        out_ = causal_lm_kd_loss(student, teacher, {"input_ids": mine}, loss="fused", gamma=0.5)
        v = torch.stack([out_.ce_sum.double(), out_.kd_sum.double()]) if mine.numel() else torch.zeros(2)
        dist.all_reduce(v)
        return v.tolist()

    res: dict[str, object] = {"world": world}
    res["teacher_replicated"], res["student_replicated"] = local_bytes(teacher), local_bytes(student)  # type: ignore[arg-type]
    with torch.no_grad():
        replicated = sums()
    layers = list(teacher.model.layers)  # type: ignore[attr-defined]
    block = max(local_bytes(layer) for layer in layers)
    root = local_bytes(teacher) - sum(local_bytes(layer) for layer in layers)  # type: ignore[arg-type]
    if world > 1:
        shard_teacher(teacher)  # type: ignore[arg-type]
        for layer in student.model.layers:  # type: ignore[attr-defined]
            fully_shard(layer)
        fully_shard(student)  # type: ignore[arg-type]
    res["teacher_sharded"], res["student_sharded"] = local_bytes(teacher), local_bytes(student)  # type: ignore[arg-type]
    gathered = int(res["teacher_sharded"]) + block + root  # type: ignore[call-overload]
    res["teacher_gathered_peak"] = gathered if world > 1 else res["teacher_replicated"]
    with torch.no_grad():
        sharded = sums()
    res["loss_rel_diff"] = max(abs(a - b) / abs(b) for a, b in zip(sharded, replicated))
    if rank == 0:
        Path(out).write_text(json.dumps(res))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker)
        return
    rows = []
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    for r in args.ranks:
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "res.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={r}"]
            subprocess.run([*cmd, __file__, "--worker", out], check=True, env=env, cwd=REPO)
            rows.append(json.loads(Path(out).read_text()))
    mb = 1 << 20
    print(
        "| ranks | teacher replicated (MiB) | teacher sharded (MiB) | ratio | teacher peak gathered (MiB) "
        "| student replicated (MiB) | student sharded (MiB) | loss rel. diff |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['world']} | {r['teacher_replicated'] / mb:.1f} | {r['teacher_sharded'] / mb:.1f} | "
            f"{r['teacher_sharded'] / r['teacher_replicated']:.3f} | {r['teacher_gathered_peak'] / mb:.1f} | "
            f"{r['student_replicated'] / mb:.1f} | {r['student_sharded'] / mb:.1f} | {r['loss_rel_diff']:.1e} |"
        )


if __name__ == "__main__":
    main()
