"""Parameter bytes per rank of a teacher and a student replicated vs sharded with FSDP2, on 1, 2 and
4 gloo ranks (CPU, loopback), the teacher's bytes measured through a step, and the loss of the
sharded teacher against the replicated one.

    .venv/bin/python bench/shard_teacher.py              # R = 1, 2, 4; prints two markdown tables
    .venv/bin/python bench/shard_teacher.py --ranks 2    # one world size

Each world size is one ``torchrun --standalone --nproc_per_node R`` run of this file with
``--worker``. Every rank builds the same float32 Llama teacher (8 blocks, hidden 512, vocabulary
4096: 25.2M parameters, 17% of them in the embeddings and output layer) and student (2 blocks,
hidden 128: 1.4M), computes the fused KD loss (``causal_lm_kd_loss``, no gradients) of its share
of a 4-sequence batch against the replicated teacher, then shards the teacher with
``ddk.engine.parallel.shard_teacher`` and the student with ``fully_shard`` (blocks, then root) and
computes it again; each twice, the second step measured. Reported for rank 0:

* parameter bytes held at rest (``ddk.distributed.local_bytes``: a ``DTensor`` counts its shard);
* the teacher's peak, computed: its shard + its largest block + its root group (embeddings, final
  norm, output layer, gathered from the teacher's forward until the loss has read the output
  layer);
* the teacher's peak, measured (:class:`_HeldBytes`): the most bytes of the teacher's storages
  alive at once in the step, i.e. the shards, the gathered parameters and FSDP2's flat all-gather
  buffers, with the moment and that split in a second table; the bytes held when the loss frees
  the root group (after it has read the output layer); and the student's peak, measured alike
  (the student is resharded after each step, as a training step's backward leaves it: with no
  backward, FSDP2 would keep its root group gathered from one forward to the next);
* rank 0's RSS high-water mark through the replicated and the sharded step (``VmHWM`` reset just
  before it, and its rise above the RSS before it): a coarser measure that counts everything the
  process holds, the interpreter, the libraries, both models, activations, gloo's buffers. The
  workers run with ``MALLOC_MMAP_THRESHOLD_=131072``, so every tensor of 128 KiB or more is
  mapped on its own and leaves the RSS when freed (malloc keeps no freed pages for later);
* the largest relative difference of the loss sums (summed over ranks) between the two teachers.
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


class _HeldBytes:
    """A model's parameter bytes this rank holds, sampled each time FSDP2 gathers or frees some.

    Counted from the storages FSDP2 keeps (each storage once, by address; a freed one has size 0):
    every ``FSDPParam``'s local shard (``_sharded_param_data``), its gathered parameter
    (``all_gather_outputs``, the storage the unsharded parameter views), and the flat all-gather
    buffers still referenced (a group's pending ``_all_gather_result``; the ``all_gather_state``
    FSDP2 keeps in the forward until the next group's copy-out, to overlap that copy-out with the
    next all-gather). Sampled after each group's ``unshard`` (its flat buffer just allocated),
    after its ``_to_unsharded`` (end of the copy-out: buffer and gathered parameters both alive),
    before each ``reshard`` and when the model's forward returns; the instance methods are
    wrapped, nothing in torch is changed for other objects.
    """

    def __init__(self, model: object) -> None:
        from torch.distributed.fsdp import FSDPModule

        names = {id(m): n or "root" for n, m in model.named_modules()}  # type: ignore[attr-defined]
        self.groups = []
        for m in model.modules():  # type: ignore[attr-defined]
            if isinstance(m, FSDPModule):
                g = m._get_fsdp_state()._fsdp_param_group
                self.groups.append(g)
                self._wrap(g, "unshard", names[id(m)], after=True)
                self._wrap(g, "_to_unsharded", names[id(m)], after=True)
                self._wrap(g, "reshard", names[id(m)], after=False)
        model.register_forward_hook(lambda *_: self.sample("forward returned"))  # type: ignore[attr-defined]
        self.reset()

    def _wrap(self, group: object, method: str, name: str, after: bool) -> None:
        inner = getattr(group, method)

        def wrapped(*args: object, **kwargs: object) -> object:
            if not after:
                self.sample(f"{method} {name} ({group._training_state.name.lower()})")  # type: ignore[attr-defined]
            out = inner(*args, **kwargs)
            if after:
                self.sample(f"{method} {name}")
            return out

        setattr(group, method, wrapped)

    def reset(self) -> None:
        self.peak: dict[str, object] = {"total": -1}
        self.at_loss: dict[str, object] = {}

    def held(self) -> dict[str, int]:
        seen: dict[int, tuple[str, int]] = {}

        def add(kind: str, t: object) -> None:
            s = t.untyped_storage()  # type: ignore[attr-defined]
            if s.nbytes():
                seen[s.data_ptr()] = (kind, s.nbytes())

        ctxs = {}
        for g in self.groups:
            for fp in g.fsdp_params:
                add("shards", fp._sharded_param_data)
                for t in fp.all_gather_outputs:
                    add("gathered", t)
            if g._all_gather_result is not None:
                add("buffers", g._all_gather_result.all_gather_output)
            ctxs[id(g.comm_ctx)] = g.comm_ctx
        for ctx in ctxs.values():
            if ctx.all_gather_state is not None:
                add("buffers", ctx.all_gather_state.all_gather_result.all_gather_output)
        out = {"shards": 0, "gathered": 0, "buffers": 0}
        for kind, n in seen.values():
            out[kind] += n
        out["total"] = sum(out.values())
        return out

    def sample(self, moment: str) -> None:
        h: dict[str, object] = {**self.held(), "moment": moment}
        if h["total"] > self.peak["total"]:  # type: ignore[operator]
            self.peak = h
        if moment == "reshard root (idle)":  # the teacher: the loss's release, after it read the output layer
            self.at_loss = h


def worker(out: str) -> None:
    import ctypes

    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from bench.memory import reset_peak, status_kb
    from ddk.distributed import local_bytes
    from ddk.engine.parallel import shard_teacher
    from ddk.losses.causal_lm import causal_lm_kd_loss

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    libc = ctypes.CDLL("libc.so.6")
    rank, world = dist.get_rank(), dist.get_world_size()
    teacher, student = _models()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4096, (4, 64), generator=g)
    mine = ids[rank::world]

    def step() -> list[float]:
        with torch.no_grad():
            out_ = causal_lm_kd_loss(student, teacher, {"input_ids": mine}, loss="fused", gamma=0.5)
        # FSDP2 keeps the student's root group gathered after its forward (for the backward); free it,
        # as a training step's backward does, so that every step gathers it again
        if callable(getattr(student, "reshard", None)):
            student.reshard()  # type: ignore[operator]
        v = torch.stack([out_.ce_sum.double(), out_.kd_sum.double()]) if mine.numel() else torch.zeros(2)
        dist.all_reduce(v)
        return v.tolist()

    def measured_step(*held: _HeldBytes | None) -> tuple[list[float], dict[str, float]]:
        """A warm step (after one unmeasured: lazy set-ups are done) and the RSS around it."""
        step()
        if held and held[0] is not None:
            res["teacher_peak_first_step"] = held[0].peak["total"]
        for h in held:
            if h is not None:
                h.reset()
        libc.malloc_trim(0)
        dist.barrier()
        reset_peak()
        before = status_kb("VmRSS")
        sums = step()
        return sums, {"before": before / 1024, "peak": status_kb("VmHWM") / 1024}

    res: dict[str, object] = {"world": world}
    res["teacher_replicated"], res["student_replicated"] = local_bytes(teacher), local_bytes(student)  # type: ignore[arg-type]
    replicated, res["rss_replicated"] = measured_step()
    layers = list(teacher.model.layers)  # type: ignore[attr-defined]
    block = max(local_bytes(layer) for layer in layers)
    root = local_bytes(teacher) - sum(local_bytes(layer) for layer in layers)  # type: ignore[arg-type]
    held = held_student = None
    if world > 1:
        shard_teacher(teacher)  # type: ignore[arg-type]
        for layer in student.model.layers:  # type: ignore[attr-defined]
            fully_shard(layer)
        fully_shard(student)  # type: ignore[arg-type]
        held, held_student = _HeldBytes(teacher), _HeldBytes(student)
    res["teacher_sharded"], res["student_sharded"] = local_bytes(teacher), local_bytes(student)  # type: ignore[arg-type]
    gathered = int(res["teacher_sharded"]) + block + root  # type: ignore[call-overload]
    res["teacher_peak_computed"] = gathered if world > 1 else res["teacher_replicated"]
    sharded, res["rss_sharded"] = measured_step(held, held_student)
    res["student_peak_measured"] = held_student.peak if held_student else {"total": res["student_replicated"]}
    if held is not None:
        res["teacher_peak_measured"], res["teacher_at_loss"] = held.peak, held.at_loss
        res["teacher_after_step"] = held.held()["total"]
    else:  # one rank: nothing sharded, the teacher is held whole throughout
        whole = {"total": res["teacher_replicated"], "shards": res["teacher_replicated"], "moment": "throughout"}
        res["teacher_peak_measured"] = res["teacher_at_loss"] = whole
        res["teacher_after_step"] = res["teacher_replicated"]
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
    env["MALLOC_MMAP_THRESHOLD_"] = "131072"  # blocks >= 128 KiB mapped alone: a freed tensor leaves the RSS
    for r in args.ranks:
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "res.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={r}"]
            subprocess.run([*cmd, __file__, "--worker", out], check=True, env=env, cwd=REPO)
            rows.append(json.loads(Path(out).read_text()))
    mb = 1 << 20
    print(
        "| ranks | teacher replicated (MiB) | teacher sharded (MiB) | ratio | teacher peak, computed (MiB) "
        "| teacher peak, measured (MiB) | teacher at the loss, measured (MiB) | student replicated (MiB) "
        "| student sharded (MiB) | student peak, measured (MiB) | rank 0 RSS peak, replicated step (MiB) | rank 0 RSS peak, sharded step (MiB) "
        "| loss rel. diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rss = [f"{r[k]['peak']:.0f} (+{r[k]['peak'] - r[k]['before']:.0f})" for k in ("rss_replicated", "rss_sharded")]
        print(
            f"| {r['world']} | {r['teacher_replicated'] / mb:.1f} | {r['teacher_sharded'] / mb:.1f} | "
            f"{r['teacher_sharded'] / r['teacher_replicated']:.3f} | {r['teacher_peak_computed'] / mb:.1f} | "
            f"{r['teacher_peak_measured']['total'] / mb:.1f} | {r['teacher_at_loss']['total'] / mb:.1f} | "
            f"{r['student_replicated'] / mb:.1f} | {r['student_sharded'] / mb:.1f} | "
            f"{r['student_peak_measured']['total'] / mb:.1f} | {rss[0]} | {rss[1]} | "
            f"{r['loss_rel_diff']:.1e} |"
        )
    print("\n| ranks | measured peak at | shards (MiB) | gathered parameters (MiB) | all-gather buffers (MiB) |")
    print("|---|---|---|---|---|")
    for r in rows:
        p = r["teacher_peak_measured"]
        print(
            f"| {r['world']} | {p['moment']} | {p['shards'] / mb:.1f} | {p.get('gathered', 0) / mb:.1f} | "
            f"{p.get('buffers', 0) / mb:.1f} |"
        )


if __name__ == "__main__":
    main()
