"""``ddk.engine.parallel``: the teacher sharded with FSDP2 on 2 gloo ranks gives the loss and the
validation CE of the whole teacher in one process, while each rank holds about half of it.

Each worker shards the teacher with ``shard_teacher`` (every decoder block, then the root), then:

* runs ``causal_lm_kd_loss`` (fused and logits paths) on its half of a batch against the sharded
  teacher, and records the loss sums (the parent sums the two halves and compares them with one
  process on the whole batch);
* checks that the teacher's own group is released after each call (its parameters are sharded
  ``DTensor``s again) and that the teacher never got a gradient;
* runs ``DiscrepancyEstimator.compute_teacher`` over uneven validation shards (3 batches of one
  domain, 1 of another: rank 1 has fewer, so it pads with dropped forwards, else the per-block
  gathers would deadlock);
* shards the student in place too (as accelerate's FSDP2 does under ``DDKTrainer``) and checks
  the fused loss's gradients, gathered, against one process.

Tolerance: float64 models, the same arithmetic per sequence; sums over ranks differ by rounding
only (``rel=1e-12``).

``--teacher-offload cpu``: two 2-rank ``distill`` runs with ``fsdp`` in the same worker processes,
with and without offload (FSDP2's ``CPUOffloadPolicy`` on the teacher's groups, read from their
FSDP state), must be bit-identical (the gathered weights are the same bits), and so must the
offloaded run resumed without offload from its checkpoint-2.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")
from gloo_workers import run_workers

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available"
)

_WORKER = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.distributed as dist

    rank, world, port, out, family = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[6])
    from test_parallel import batches, models
    from torch.distributed.tensor import DTensor
    from ddk.distributed import local_bytes
    from ddk.engine.parallel import shard_teacher
    from ddk.losses.causal_lm import causal_lm_kd_loss
    from ddk.discrepancy import DiscrepancyEstimator
    from ddk.engine.step import StepLoss

    teacher, student = models(family)
    whole = local_bytes(teacher)
    shard_teacher(teacher)
    res = {"whole": whole, "local": local_bytes(teacher)}
    res["all_sharded"] = all(isinstance(p, DTensor) for p in teacher.parameters())
    batch, dom = batches()
    mine = slice(rank * 2, rank * 2 + 2)  # 2 of the 4 sequences
    for loss in ("fused", "logits"):
        out_ = causal_lm_kd_loss(
            student, teacher, {k: v[mine] for k, v in batch.items()}, domain_ids=dom[mine], num_domains=2,
            loss=loss, gamma=0.5, temperature=1.5,
        )
        out_.loss.backward()
        res[loss] = {k: getattr(out_, k).tolist() for k in ("ce_sum", "kd_sum", "domain_ce_sum", "domain_kd_sum")}
        res[loss + "_released"] = all(isinstance(p, DTensor) for p in teacher.parameters())
    res["teacher_grads"] = any(p.grad is not None for p in teacher.parameters())
    sets = {"a": [{"input_ids": batch["input_ids"][i : i + 1]} for i in range(3)],
            "b": [{"input_ids": batch["input_ids"][3:4]}]}
    est = DiscrepancyEstimator(sets, loss_fn=StepLoss.cross_entropy().validation_ce, progress=False)
    res["teacher_ce"] = est.compute_teacher(teacher).tolist()
    # the student sharded in place too (DDKTrainer under FSDP2): the fused loss reads its output
    # layer after its forward gathered it; two accumulated backwards, gradients averaged over ranks
    from torch.distributed.fsdp import fully_shard
    student.zero_grad(set_to_none=True)
    for layer in student.model.layers:
        fully_shard(layer)
    fully_shard(student)
    for _ in range(2):
        causal_lm_kd_loss(
            student, teacher, {k: v[mine] for k, v in batch.items()}, domain_ids=dom[mine], num_domains=2,
            gamma=0.5, temperature=1.5,
        ).loss.backward()
    res["student_grads"] = {n: p.grad.full_tensor().tolist() for n, p in student.named_parameters()}
    with open(f"{out}-{rank}.json", "w") as f:
        json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()
    """
)


def models(family: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A float64 teacher (4 blocks, so its blocks dominate its bytes) and student of ``family``
    (``qwen2``: tied embeddings and a teacher vocabulary 8 rows larger)."""
    from hf_models import make_model

    vocab = 61
    tv = vocab + 8 if family == "qwen2" else vocab
    teacher = make_model(family, tv, hidden=32, layers=4, seed=1).double().requires_grad_(False)
    student = make_model(family, vocab, hidden=16, layers=1, seed=2).double()
    return teacher, student


def batches() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 61, (4, 9), generator=g)
    return {"input_ids": ids}, torch.tensor([0, 1, 1, 0])


@pytest.mark.parametrize("family", ["llama", pytest.param("qwen2", marks=pytest.mark.slow)])  # ~35 s each here
def test_a_teacher_sharded_on_two_ranks_gives_the_losses_and_ce_of_the_whole_teacher(
    tmp_path: Path, family: str
) -> None:
    from ddk.discrepancy import DiscrepancyEstimator
    from ddk.engine.step import StepLoss
    from ddk.losses.causal_lm import causal_lm_kd_loss

    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    out = tmp_path / "out"
    run_workers(script, lambda r, port: [r, 2, port, out, family, Path(__file__).parent], timeout=240)
    got = [json.loads((tmp_path / f"out-{r}.json").read_text()) for r in range(2)]

    teacher, student = models(family)
    batch, dom = batches()
    for r in got:
        assert r["all_sharded"] and r["fused_released"] and r["logits_released"] and not r["teacher_grads"]
        # half of the teacher per rank, plus at most the root group's rounding (a row per tensor)
        assert r["local"] <= 0.5 * r["whole"] * 1.02, (r["local"], r["whole"])
    for loss in ("fused", "logits"):
        ref = causal_lm_kd_loss(
            student, teacher, batch, domain_ids=dom, num_domains=2, loss=loss, gamma=0.5, temperature=1.5
        )
        for key in ("ce_sum", "kd_sum", "domain_ce_sum", "domain_kd_sum"):
            summed = sum(torch.tensor(r[loss][key], dtype=torch.float64) for r in got)
            torch.testing.assert_close(summed, getattr(ref, key).detach(), rtol=1e-12, atol=1e-12, msg=key)
    sets = {
        "a": [{"input_ids": batch["input_ids"][i : i + 1]} for i in range(3)],
        "b": [{"input_ids": batch["input_ids"][3:4]}],
    }
    est = DiscrepancyEstimator(sets, loss_fn=StepLoss.cross_entropy().validation_ce, progress=False)
    want = est.compute_teacher(teacher).tolist()
    for r in got:
        assert r["teacher_ce"] == pytest.approx(want, rel=1e-12)
    # FSDP2 averages the ranks' gradients: the reference is the mean of the two halves' losses
    for _ in range(2):
        for r in range(2):
            half = slice(2 * r, 2 * r + 2)
            out = causal_lm_kd_loss(
                student,
                teacher,
                {"input_ids": batch["input_ids"][half]},
                domain_ids=dom[half],
                num_domains=2,
                gamma=0.5,
                temperature=1.5,
            )
            (out.loss / 2).backward()
    for name, p in student.named_parameters():
        torch.testing.assert_close(torch.tensor(got[0]["student_grads"][name], dtype=torch.float64), p.grad, msg=name)


_OFFLOAD_WORKER = textwrap.dedent(
    """
    import json, sys, time
    import torch
    import torch.distributed as dist

    rank, world, port, cfg_path, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule
    from torch.distributed.tensor import DTensor
    import ddk.engine.loop as loop
    from ddk.distributed import local_bytes
    from ddk.recipes.config import make_config

    def groups(model):
        return [m._get_fsdp_state()._fsdp_param_group for m in model.modules() if isinstance(m, FSDPModule)]

    seen = {}
    parallelize = loop.parallelize

    def recording(step, student, cfg, device, teacher=None):
        seen["whole"] = local_bytes(teacher)
        seen["placed"] = sorted({p.device.type for p in teacher.parameters()})
        model = parallelize(step, student, cfg, device, teacher)
        seen["local"] = local_bytes(teacher)
        seen["all_sharded"] = all(isinstance(p, DTensor) for p in teacher.parameters())
        seen["local_devices"] = sorted({p.to_local().device.type for p in teacher.parameters()})
        t_groups, s_groups = groups(teacher), groups(step)
        seen["groups"] = len(t_groups)
        seen["offload_policies"] = sorted({type(g.offload_policy).__name__ for g in t_groups})
        seen["params_offloaded"] = sorted({fp.offload_to_cpu for g in t_groups for fp in g.fsdp_params})
        seen["shard_storage"] = sorted({fp._sharded_param_data.device.type for g in t_groups for fp in g.fsdp_params})
        seen["student_offloaded"] = any(isinstance(g.offload_policy, CPUOffloadPolicy) for g in s_groups)
        return model

    loop.parallelize = recording
    res = {}
    values = json.load(open(cfg_path))
    for mode in ("none", "cpu"):
        cfg = make_config(**{**values, "fsdp": True, "teacher_offload": mode, "out": f"{out}-{mode}"})
        t0 = time.perf_counter()
        loop.distill(cfg)  # the group is this script's: distill leaves it up
        res[mode] = {**seen, "seconds": time.perf_counter() - t0}
    # the offloaded run as if stopped after step 2, resumed without offload
    if rank == 0:
        import shutil
        shutil.copytree(f"{out}-cpu", f"{out}-resumed", ignore=shutil.ignore_patterns("checkpoint-4", "student"))
    dist.barrier()
    loop.distill(make_config(**{**values, "fsdp": True, "teacher_offload": "none", "out": f"{out}-resumed"}))
    with open(f"{out}-{rank}.json", "w") as f:
        json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()
    """
)


def _records(path: Path, drop: tuple[str, ...] = ("time",)) -> list[dict]:  # type: ignore[type-arg]
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in path.read_text().splitlines()]


@pytest.mark.e2e
def test_shard_teacher_offload_keeps_the_shards_on_the_cpu_and_the_run_bit_identical(tmp_path: Path) -> None:
    """``ddk distill --fsdp --teacher-offload cpu`` on 2 gloo ranks: FSDP2's ``CPUOffloadPolicy`` on
    every group of the teacher (its 2 blocks and the root), none on the student's; each rank's
    shards CPU tensors of half the teacher; and the run (losses, DDK weights, validation CE, the
    student's parameters) bit-identical to the same run without offload, and to the offloaded run
    resumed without offload from its checkpoint-2. On this CPU-only machine
    both placements are the CPU, so the policy is what the test can see of the flag; the gathered
    weights are the same bits either way, so a GPU run is bit-identical too in principle."""
    from recipe_cases import own_cfg, same_student

    cfg = own_cfg(tmp_path, steps=4, interval=2, checkpoint_every=2, log_every=1, threads=1)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg.to_dict()))
    script = tmp_path / "worker.py"
    script.write_text(_OFFLOAD_WORKER)
    out = tmp_path / "run"
    run_workers(script, lambda r, port: [r, 2, port, cfg_path, out], timeout=240)
    got = [json.loads((tmp_path / f"run-{r}.json").read_text()) for r in range(2)]

    for r in got:
        off, on = r["cpu"], r["none"]
        assert off["placed"] == ["cpu"]  # never moved to the device before sharding
        assert off["groups"] == on["groups"] == 3  # 2 decoder blocks and the root
        assert off["offload_policies"] == ["CPUOffloadPolicy"] and off["params_offloaded"] == [True]
        assert on["offload_policies"] == ["OffloadPolicy"] and on["params_offloaded"] == [False]
        assert not off["student_offloaded"] and not on["student_offloaded"]
        assert off["all_sharded"] and off["local_devices"] == off["shard_storage"] == ["cpu"]
        assert off["whole"] == on["whole"] and off["local"] == on["local"]
        # half of the teacher per rank, up to the rows of a tensor that do not split evenly
        assert 0.49 * off["whole"] <= off["local"] <= 0.51 * off["whole"], (off["local"], off["whole"])
    assert got[0]["cpu"]["local"] + got[1]["cpu"]["local"] == got[0]["cpu"]["whole"]

    plain, offloaded = tmp_path / "run-none", tmp_path / "run-cpu"
    assert [r["step"] for r in _records(offloaded / "metrics.jsonl")] == [1, 2, 3, 4]
    assert _records(offloaded / "metrics.jsonl") == _records(plain / "metrics.jsonl")  # loss, CE, KD: bit for bit
    assert _records(offloaded / "controller.jsonl") == _records(plain / "controller.jsonl")  # weights, CE
    drop = ("wall_seconds", "plots")
    s_off, s_plain = (json.loads((p / "summary.json").read_text()) for p in (offloaded, plain))
    assert {k: v for k, v in s_off.items() if k not in drop} == {k: v for k, v in s_plain.items() if k not in drop}
    same_student(offloaded, plain)
    # teacher_offload may change on resume (RESUME_IGNORED): checkpoint-2 of the offloaded run, resumed
    # without offload, ends in the same student
    resumed = tmp_path / "run-resumed"
    assert _records(resumed / "metrics.jsonl") == _records(offloaded / "metrics.jsonl")
    same_student(resumed, offloaded)
