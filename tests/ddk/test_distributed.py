"""Tests of ddk/distributed.py.

Multi-rank use: two gloo processes here (token normaliser, checksums), the estimator's gloo test,
and ``ddk distill`` under torchrun in tests/ddk/recipes/test_distributed_distill.py.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from gloo_workers import free_port, run_workers

import ddk
from ddk.distributed import (
    all_reduce_sum_,
    barrier,
    broadcast_object,
    check_same_across_ranks,
    collective_device,
    global_token_normalizer,
    init_from_env,
    is_distributed,
    is_fsdp,
    rank_world,
    rank_zero_first,
    tensor_checksum,
    unsharded,
)


def test_distributed_helpers_without_process_group() -> None:
    assert not is_distributed()
    assert rank_world() == (0, 1)
    t = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert all_reduce_sum_(t) is t and t.tolist() == [1.0, 2.0]
    assert collective_device() == torch.device("cpu")
    assert collective_device("cpu") == torch.device("cpu")


def test_all_reduce_sum_rejects_non_tensor() -> None:
    with pytest.raises(TypeError, match=r"all_reduce_sum_: tensor must be a torch.Tensor; got list\."):
        all_reduce_sum_([1.0])  # type: ignore[arg-type]


def test_distributed_helpers_single_rank_gloo_group() -> None:
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    port = free_port()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        assert is_distributed()
        assert rank_world() == (0, 1)
        t = torch.ones(2, 2, dtype=torch.float64)
        assert all_reduce_sum_(t) is t and t.sum().item() == 4.0
        assert collective_device(None) == torch.device("cpu")
    finally:
        dist.destroy_process_group()
    assert not is_distributed()


# ---------------------------------------------------------------------- one process: no-ops and input errors
def test_checksum_and_normalizer_helpers_without_process_group() -> None:
    w = torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64)
    assert tensor_checksum([w]) == tensor_checksum([w.clone()])
    bumped = w.clone()
    bumped[0] = torch.nextafter(bumped[0], torch.tensor(1.0, dtype=torch.float64))  # one ulp
    assert tensor_checksum([bumped]) != tensor_checksum([w])
    assert tensor_checksum([w.float()]) != tensor_checksum([w])  # dtype counts
    assert tensor_checksum([w.reshape(3, 1)]) != tensor_checksum([w])  # shape counts
    assert 0 <= tensor_checksum([torch.ones(2, 3, dtype=torch.bfloat16), torch.tensor(1.0)]) < 2**63
    check_same_across_ranks({"domain weights": tensor_checksum([w])}, where="a test")  # one process: nothing to compare
    assert global_token_normalizer(torch.tensor(7)) is None  # kd_loss then divides by the local count
    assert not init_from_env()  # no torchrun environment: nothing to initialise
    assert broadcast_object({"a": 1}) == {"a": 1}
    barrier()
    with rank_zero_first():
        pass
    lin = torch.nn.Linear(2, 2)
    with unsharded(lin) as m:
        assert m is lin and not is_fsdp(lin)


def test_distributed_helpers_reject_bad_inputs() -> None:
    with pytest.raises(TypeError, match=r"tensor_checksum: tensors must hold torch.Tensor; got list\."):
        tensor_checksum([[1.0]])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"check_same_across_ranks: checksums must map names to ints; got"):
        check_same_across_ranks({"w": 1.5}, where="x")  # type: ignore[dict-item]
    with pytest.raises(
        TypeError, match=r"global_token_normalizer: num_valid must be a one-element tensor .*; got \(2,\)\."
    ):
        global_token_normalizer(torch.tensor([1, 2]))
    with pytest.raises(
        ValueError, match=r"init_from_env: backend must be one of \('auto', 'gloo', 'nccl'\); got 'mpi'\."
    ):
        init_from_env("mpi")


# ---------------------------------------------------------------------- two gloo processes
_WORKER = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from ddk import kd_loss
    from ddk.distributed import check_same_across_ranks, global_token_normalizer, tensor_checksum

    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[5])
    from test_distributed import global_batch, tiny_model

    x, teacher, labels = global_batch()
    rows = torch.arange(x.shape[0]).reshape(4, -1)[rank::world].reshape(-1)  # this rank's 2 of the 4 sequences
    res = {}
    for mode in ("global", "local"):
        model = tiny_model()
        ddp = DistributedDataParallel(model)
        y = labels[rows]
        norm = global_token_normalizer((y != -100).sum()) if mode == "global" else None
        out_ = kd_loss(ddp(x[rows]), teacher[rows], y, gamma=0.2, normalizer=norm)
        out_.loss.backward()
        res[mode] = [p.grad.tolist() for p in model.parameters()]

    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    params = list(tiny_model().parameters())
    check_same_across_ranks({"domain weights": tensor_checksum([w]), "student parameters": tensor_checksum(params)},
                            where="step 1")  # identical: passes
    if rank == 1:  # planted: rank 1's weights one ulp off
        w[2] = torch.nextafter(w[2], torch.tensor(1.0, dtype=torch.float64))
    try:
        check_same_across_ranks({"domain weights": tensor_checksum([w]), "student parameters": tensor_checksum(params)},
                                where="step 2")
        res["error"] = None
    except RuntimeError as e:
        res["error"] = str(e)
    with open(f"{out}-{rank}.json", "w") as f:
        json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()
    """
)


def global_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4 sequences x 5 tokens: hidden (20, 6), teacher logits (20, 11) float64, labels (20,) with
    uneven ignored tokens: sequences 0 and 2 (rank 0's under 2 ranks) hold 3 valid tokens in all,
    sequences 1 and 3 (rank 1's) all 10."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 6, generator=g, dtype=torch.float64)
    teacher = 10 * torch.randn(20, 11, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (20,), generator=g)
    labels[0:4] = -100
    labels[10:13] = -100
    return x, teacher, labels


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Linear(6, 11, dtype=torch.float64)


@pytest.mark.e2e
def test_two_ranks_global_token_normalizer_and_checksum_gloo(tmp_path) -> None:  # type: ignore[no-untyped-def]
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    out = tmp_path / "out"
    run_workers(script, lambda r, port: [r, 2, port, out, Path(__file__).parent])
    got = [json.loads((tmp_path / f"out-{r}.json").read_text()) for r in range(2)]

    # one process, whole global batch, kd_loss's own mean over the 13 valid tokens
    x, teacher, labels = global_batch()
    model = tiny_model()
    ddk.kd_loss(model(x), teacher, labels, gamma=0.2).loss.backward()
    ref = [p.grad for p in model.parameters()]
    for r in range(2):  # DDP averages: N/R normalisation == one process, in float64 up to summation order
        for g, e in zip(got[r]["global"], ref):
            torch.testing.assert_close(torch.tensor(g, dtype=torch.float64), e, rtol=1e-12, atol=1e-14)
    # the local mean weights rank 0's 3 tokens like rank 1's 10: visibly another gradient
    local = torch.tensor(got[0]["local"][0], dtype=torch.float64)
    assert (local - ref[0]).abs().max() > 1e-2 * ref[0].abs().max()

    # the planted one-ulp difference on rank 1 is caught on every rank, naming rank 1 and what differs
    for r in range(2):
        err = got[r]["error"]
        assert err is not None and err.startswith("check_same_across_ranks: every rank must hold identical")
        assert "at step 2" in err and "domain weights differ on ranks [1] from rank 0" in err
        assert "student parameters" not in err


# ---------------------------------------------------------------------- unsharded on accelerate's FSDP2 layout
_UNSHARDED_WORKER = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[5])
    from test_distributed import fsdp_batch, fsdp_student
    from ddk.distributed import unsharded
    from ddk.losses.causal_lm import causal_lm_kd_loss

    # as accelerate 1.16's fsdp2_prepare_model lays out a causal LM (DDKTrainer under fsdp_version 2):
    # every decoder block, the embeddings, the final norm with the output layer (kept gathered after
    # the forward, where the fused loss reads it), then the root
    from torch.distributed.fsdp import fully_shard
    student = fsdp_student()
    for layer in student.model.layers:
        fully_shard(layer)
    fully_shard(student.model.embed_tokens)
    fully_shard([student.model.norm, student.lm_head], reshard_after_forward=False)
    fully_shard(student)
    ids = fsdp_batch()
    mine = ids[2 * rank : 2 * rank + 2]
    res = {"grads": [], "head_after_forward": []}
    for step in range(2):
        # the estimator's pass: uneven shards (rank 0 runs 3 forwards, rank 1 none), the first one
        # before any training forward (FSDP2's root not yet set up)
        with torch.no_grad(), unsharded(student):
            for _ in range(3 if rank == 0 else 0):
                student(input_ids=ids[:2])
        out_ = causal_lm_kd_loss(student, None, {"input_ids": mine})
        res["head_after_forward"].append(type(student.lm_head.weight).__name__)
        out_.loss.backward()
        res["grads"].append({n: p.grad.full_tensor().tolist() for n, p in student.named_parameters()})
        student.zero_grad(set_to_none=True)
    res["sharded"] = all(isinstance(p, DTensor) for p in student.parameters())
    with open(f"{out}-{rank}.json", "w") as f:
        json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()
    """
)


def fsdp_student() -> torch.nn.Module:
    """A float64 tiny Llama (2 blocks, untied output layer)."""
    from hf_models import make_model

    return make_model("llama", 61, hidden=16, layers=2, seed=2).double()


def fsdp_batch() -> torch.Tensor:
    return torch.randint(2, 61, (4, 9), generator=torch.Generator().manual_seed(3))


@pytest.mark.e2e
def test_unsharded_leaves_accelerates_fsdp2_layout_training_as_one_process(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Uneven forwards inside ``unsharded`` (before the first training forward and between steps)
    leave FSDP2 as they found it: the output-layer group stays gathered after the forward, the
    backward's collectives pair up (they deadlocked, or crashed, when the body's forwards stayed in
    FSDP2's prefetch order or its root was set up inside the body), and the gradients are those of
    one process (float64; summation order only)."""
    pytest.importorskip("transformers")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    from ddk.losses.causal_lm import causal_lm_kd_loss

    script = tmp_path / "worker.py"
    script.write_text(_UNSHARDED_WORKER)
    out = tmp_path / "out"
    run_workers(script, lambda r, port: [r, 2, port, out, Path(__file__).parent], timeout=180)
    got = [json.loads((tmp_path / f"out-{r}.json").read_text()) for r in range(2)]

    student, ids = fsdp_student(), fsdp_batch()
    for r in got:
        assert r["head_after_forward"] == ["Parameter", "Parameter"]  # reshard_after_forward=False kept
        assert r["sharded"]
    for step in range(2):
        for r in range(2):  # FSDP2 averages the ranks' gradients: the mean of the two halves' losses
            (causal_lm_kd_loss(student, None, {"input_ids": ids[2 * r : 2 * r + 2]}).loss / 2).backward()
        for name, p in student.named_parameters():
            for r in range(2):
                torch.testing.assert_close(torch.tensor(got[r]["grads"][step][name], dtype=torch.float64), p.grad)
        student.zero_grad(set_to_none=True)
