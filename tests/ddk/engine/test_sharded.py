"""``ddk.engine.sharded``: sharded checkpoints written by every rank through torch.distributed.checkpoint,
read back at another world size; the final student streamed tensor by tensor (``ddk.engine.export``).

The fast tests use a small plain-torch model (an embedding of 13 rows, so two ranks hold uneven
pieces, two blocks, an output layer) sharded with FSDP2 on 2 gloo ranks, and call the module's
functions directly:

* 2 ranks save a sharded checkpoint: each rank wrote its own shard file (with its rows), the
  manifest lists both and state.json; reading it back at 2 ranks and in one process (2 -> 1)
  gives the saved state bit for bit, a one-file checkpoint of one process read by 2 FSDP2 ranks
  (1 -> 2) too, and a step after the 2 -> 1 resume matches the 2-rank step to float rounding;
* a checkpoint missing a shard, with a corrupted shard, or with a shard file its manifest does
  not list is refused naming the file; one without a manifest is passed over for the previous one.
* the student streamed out of 2 FSDP2 ranks one tensor at a time (``save_final_student``) is
  the folder ``save_pretrained`` writes in one process (Llama, and Qwen2 with tied embeddings).

The end-to-end runs (``ddk distill --fsdp`` under torchrun, resumed at 2, 1 and 2 ranks) are
marked slow. Tolerance at another world size: the same gradient summed in another order (each
rank its half, then the all-reduce), float32: parameters within 1e-5 after a few AdamW steps
(measured 1e-7-ish, as in ``tests/ddk/recipes/test_distributed_distill.py``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ddk.engine import checkpoint as ckpt

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available"
)

VOCAB, HIDDEN = 13, 6
PARAM_ATOL = 1e-5


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(HIDDEN)
        self.lin = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.lin(self.norm(x)))


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList([_Block(), _Block()])
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class Step(nn.Module):
    """A training step holding the student under ``student``, as ``DistillStep`` does."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.student = _Tiny()

    def forward(self, ids: torch.Tensor, norm: float) -> torch.Tensor:
        logits = self.student(ids[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum") / norm


def make(seed: int = 0, fsdp: bool = False) -> tuple[Step, torch.optim.Optimizer]:
    """The step module (FSDP2-sharded: every block, then the root) and its AdamW."""
    step = Step(seed)
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in step.student.layers:
            fully_shard(layer)
        fully_shard(step)
    return step, torch.optim.AdamW(step.parameters(), lr=1e-2, weight_decay=0.1)


def train(step: Step, opt: torch.optim.Optimizer, steps: range, rank: int = 0, world: int = 1) -> None:
    """Optimizer steps on batches of 4 sequences (rank r: ``batch[r::world]``), the gradient of the whole batch."""
    for i in steps:
        ids = torch.randint(0, VOCAB, (4, 6), generator=torch.Generator().manual_seed(100 + i))
        step(ids[rank::world], 4 * 5 / world).backward()
        opt.step()
        opt.zero_grad()


def full_state(step: Step, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every tensor of the student and the optimizer, whole, by name (a collective under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    out = {f"model/{k}": v.detach().clone() for k, v in get_model_state_dict(step, options=options).items()}
    for fqn, per in get_optimizer_state_dict(step, opt, options=options)["state"].items():
        out.update({f"optim/{fqn}/{n}": v.clone() for n, v in per.items()})
    return out


def rest_state(step_no: int) -> dict:  # type: ignore[type-arg]
    """What rank 0 adds to a checkpoint besides the student and optimizer (a minimal run's)."""
    return {"config": {"seed": 0}, "rng": ckpt.rng_state(), "scheduler": {"last_epoch": step_no}}


def restore(path: Path, step: Step, opt: torch.optim.Optimizer, fsdp: bool) -> dict:  # type: ignore[type-arg]
    """What ``ddk distill`` does to resume: read (every file verified), then load the student and optimizer."""
    from ddk.engine.parallel import load_train_state
    from ddk.engine.sharded import LOADED, load_loaded_state, read_checkpoint

    ck = read_checkpoint(path, step_mod=step, student=step.student, opt=opt, fsdp=fsdp)
    if LOADED in ck:
        load_loaded_state(step, opt, ck[LOADED])
    else:
        load_train_state(step, step.student, opt, ck, fsdp)
    return ck


_WORKER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    import torch.distributed as dist

    rank, world, port, root, phase, here = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]), sys.argv[5], sys.argv[6]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    sys.path.insert(0, here)
    from safetensors.torch import save_file
    from test_sharded import full_state, make, restore, rest_state, train
    from ddk.engine.sharded import save_sharded_checkpoint

    res = {}
    if phase == "save":
        step, opt = make(0, fsdp=True)
        for i in (1, 2):
            train(step, opt, range(i - 1, i), rank, world)
            save_sharded_checkpoint(root / "run2", i, rest_state(i) if rank == 0 else None, step, opt, keep=2)
        saved = full_state(step, opt)
        train(step, opt, range(2, 3), rank, world)
        after = full_state(step, opt)
        if rank == 0:
            save_file(saved, str(root / "saved2.safetensors"))
            save_file(after, str(root / "after2.safetensors"))
        # the same world size: a fresh (other) model and optimizer take the checkpoint's state
        step2, opt2 = make(1, fsdp=True)
        restore(root / "run2" / "checkpoint-2", step2, opt2, fsdp=True)
        got = full_state(step2, opt2)
        res["same_world_exact"] = all(torch.equal(got[k], saved[k]) for k in saved) and got.keys() == saved.keys()
        train(step2, opt2, range(2, 3), rank, world)
        got = full_state(step2, opt2)
        res["same_world_step_exact"] = all(torch.equal(got[k], after[k]) for k in after)
    else:  # 1 -> 2: the one-file checkpoint of one process, read by 2 FSDP2 ranks
        step, opt = make(1, fsdp=True)
        restore(root / "run1" / "checkpoint-2", step, opt, fsdp=True)
        got = full_state(step, opt)
        from safetensors.torch import load_file
        want = load_file(str(root / "saved1.safetensors"))
        res["one_to_two_exact"] = got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    with open(root / f"{phase}-{rank}.json", "w") as f:
        json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()
    """
)


def _workers(root: Path, phase: str) -> list[dict]:  # type: ignore[type-arg]
    from gloo_workers import run_workers

    script = root / "worker.py"
    script.write_text(_WORKER)
    run_workers(script, lambda r, port: [r, 2, port, root, phase, Path(__file__).parent], timeout=240)
    return [json.loads((root / f"{phase}-{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with ``run2/checkpoint-2`` (sharded, 2 ranks), the state it holds and the state one step later."""
    root = tmp_path_factory.mktemp("sharded")
    res = _workers(root, "save")
    assert all(r["same_world_exact"] and r["same_world_step_exact"] for r in res), res
    return root


def test_sharded_checkpoint_each_rank_writes_its_shard_and_the_manifest_lists_every_file(sharded: Path) -> None:
    from safetensors import safe_open

    path = sharded / "run2" / "checkpoint-2"
    man = json.loads((path / ckpt.MANIFEST).read_text())
    shards = [
        "shards/shard-00001-model-00001-of-00001.safetensors",
        "shards/shard-00002-model-00001-of-00001.safetensors",
    ]
    assert (man["version"], man["layout"], sorted(man["files"])) == (2, "sharded", [*shards, ckpt.STATE, ckpt.TENSORS])
    assert sorted(p.name for p in path.iterdir()) == [ckpt.MANIFEST, ckpt.SHARDS, ckpt.STATE, ckpt.TENSORS]
    rows = []
    for name in shards:
        with safe_open(str(path / name), framework="pt") as f:
            offsets = json.loads(f.metadata()["DCP_SHARDING_INFO"])
            key = "student/student.embed.weight"
            rows.append((offsets[key]["saved_offsets"][0], f.get_slice(key).get_shape()[0]))
    assert rows == [(0, 7), (7, 6)]  # 13 rows: rank 0 wrote the first 7, rank 1 the other 6
    state = json.loads((path / ckpt.STATE).read_text())
    assert state["sharded"]["world_size"] == 2 and "student.embed.weight" in state["sharded"]["student"]
    assert not list(sharded.joinpath("run2").glob(".checkpoint-*"))  # the temporary folder was renamed


def test_sharded_checkpoint_read_in_one_process_is_the_saved_state_and_trains_on(sharded: Path) -> None:
    from safetensors.torch import load_file

    step, opt = make(1)  # another initialisation: every value must come from the checkpoint
    ck = restore(sharded / "run2" / "checkpoint-2", step, opt, fsdp=False)
    assert set(ck["student"]) == set(step.student.state_dict())  # the student's own names (one process)
    saved = load_file(str(sharded / "saved2.safetensors"))
    got = full_state(step, opt)
    assert got.keys() == saved.keys()
    assert [k for k in saved if not torch.equal(got[k], saved[k])] == []
    train(step, opt, range(2, 3))  # the same step as the 2 ranks took, on the whole batch
    after, got = load_file(str(sharded / "after2.safetensors")), full_state(step, opt)
    worst = max((got[k].double() - after[k].double()).abs().max().item() for k in after if k.startswith("model/"))
    assert worst <= PARAM_ATOL, worst


def test_one_file_checkpoint_of_one_process_is_read_by_two_fsdp_ranks(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    step, opt = make(0)
    train(step, opt, range(2))
    state = {**rest_state(2), "student": step.student.state_dict(), "optimizer": opt.state_dict()}
    ckpt.save_checkpoint(tmp_path / "run1", 2, state, keep=2)
    save_file(full_state(step, opt), str(tmp_path / "saved1.safetensors"))
    assert all(r["one_to_two_exact"] for r in _workers(tmp_path, "load"))


def _copy(sharded: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(sharded / "run2", run)
    return run / "checkpoint-2"


def test_sharded_checkpoint_missing_a_shard_is_refused_naming_it(sharded: Path, tmp_path: Path) -> None:
    path = _copy(sharded, tmp_path)
    (path / "shards" / "shard-00002-model-00001-of-00001.safetensors").unlink()
    why = r"complete and intact; got no shards/shard-00002-model-00001-of-00001\.safetensors\."
    with pytest.raises(ckpt.CheckpointError, match=why):
        ckpt.load_checkpoint(path)
    found, passed = ckpt.newest_valid_checkpoint(path.parent)  # resume falls back to checkpoint-1
    assert found is not None and found.name == "checkpoint-1" and "shard-00002" in passed[0]


def test_sharded_checkpoint_with_a_corrupted_shard_is_refused_naming_it(sharded: Path, tmp_path: Path) -> None:
    path = _copy(sharded, tmp_path)
    shard = path / "shards" / "shard-00001-model-00001-of-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x10  # one bit of a tensor's bytes
    shard.write_bytes(bytes(data))
    step, opt = make(1)
    with pytest.raises(
        ckpt.CheckpointError, match=r"got shards/shard-00001-model-00001-of-00001\.safetensors with SHA-256"
    ):
        restore(path, step, opt, fsdp=False)


def test_sharded_checkpoint_with_an_unlisted_shard_file_is_refused(sharded: Path, tmp_path: Path) -> None:
    path = _copy(sharded, tmp_path)
    shutil.copy(
        path / "shards" / "shard-00001-model-00001-of-00001.safetensors",
        path / "shards" / "shard-00003-model-00001-of-00001.safetensors",
    )
    with pytest.raises(
        ckpt.CheckpointError,
        match=r"got shards/shard-00003-model-00001-of-00001\.safetensors, which its manifest\.json does not list",
    ):
        ckpt.load_checkpoint(path)


def test_sharded_checkpoint_without_its_manifest_is_passed_over_for_the_previous_one(
    sharded: Path, tmp_path: Path
) -> None:
    path = _copy(sharded, tmp_path)
    (path / ckpt.MANIFEST).unlink()  # rank 0 writes it last: a kill before it leaves no checkpoint-2 at all
    found, passed = ckpt.newest_valid_checkpoint(path.parent)
    assert found is not None and found.name == "checkpoint-1"
    assert "no manifest.json (the write did not finish)" in passed[0]
    step, opt = make(1)
    assert restore(found, step, opt, fsdp=False)["step"] == 1


# ---------------------------------------------------------------------------- ddk distill end to end (slow)
def _run_cfg(root: Path, name: str, **kw):  # type: ignore[no-untyped-def]
    from recipe_cases import own_cfg

    base = dict(steps=6, batch_size=4, interval=2, checkpoint_every=2, log_every=1, threads=1, keep_checkpoints=3)
    base.update(kw)
    return own_cfg(root, out=str(root / "runs" / name), **base)


def _torchrun(root: Path, cfg, nproc: int = 2) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    """``torchrun --standalone --nproc_per_node=<nproc> -m ddk.recipes.cli distill --config <cfg>``; not asserted."""
    import os
    import sys

    import yaml
    from gloo_workers import gloo_aborted

    path = root / f"{Path(cfg.out).name}.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    repo = Path(__file__).resolve().parents[3]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DDK_DEBUG"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["-m", "ddk.recipes.cli", "distill", "--config", str(path)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if gloo_aborted(res.returncode, res.stdout + res.stderr):  # gloo's spurious abort: once more
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    return res


def _ok(res: subprocess.CompletedProcess[str]) -> None:
    assert res.returncode == 0, f"torchrun failed ({res.returncode}):\n{res.stderr[-12000:]}"


def _resumable_copy(root: Path, run: Path, name: str, step: int) -> Path:
    """A copy of the run folder ``run`` stopped after ``checkpoint-<step>`` (newer checkpoints and the outputs gone)."""
    new = root / "runs" / name
    shutil.copytree(run, new)
    for p in new.glob("checkpoint-*"):
        if int(p.name.split("-")[1]) > step:
            shutil.rmtree(p)
    for name_ in ("summary.json", "student"):
        p = new / name_
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return new


def _close(a: Path, b: Path) -> float:
    """The largest difference of the students of the run folders ``a`` and ``b`` (same names asserted)."""
    from recipe_cases import student_tensors

    sa, sb = student_tensors(a), student_tensors(b)
    assert sa.keys() == sb.keys()
    return max((sa[k] - sb[k]).abs().max().item() for k in sa)


def _weights(run: Path) -> list[list[float]]:
    return [json.loads(line)["weights"] for line in (run / "controller.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.e2e
def test_distill_fsdp_checkpoints_resume_in_one_process_and_under_ddp_and_one_process_checkpoints_at_two(
    tmp_path: Path,
) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("yaml")
    import ddk.recipes.distill as real

    one = tmp_path / "runs" / "one"
    real.distill(_run_cfg(tmp_path, "one"))  # 6 steps, one process
    two = tmp_path / "runs" / "two"
    _ok(_torchrun(tmp_path, _run_cfg(tmp_path, "two", fsdp=True)))  # 6 steps, 2 FSDP2 ranks, sharded checkpoints
    assert json.loads((two / "checkpoint-4" / ckpt.MANIFEST).read_text())["layout"] == "sharded"
    assert sorted(p.name for p in (two / "student").iterdir()) == sorted(p.name for p in (one / "student").iterdir())
    assert _close(one, two) <= PARAM_ATOL

    # 2 -> 1: the 2 ranks' checkpoint-4 resumed by one plain process (no --fsdp)
    down = _resumable_copy(tmp_path, two, "two-to-one", 4)
    real.distill(_run_cfg(tmp_path, "two-to-one"))
    assert _close(two, down) <= PARAM_ATOL
    for w1, w2 in zip(_weights(two), _weights(down), strict=True):
        assert w2 == pytest.approx(w1, rel=1e-6)

    # the same checkpoint-4 of the FSDP2 ranks resumed under DDP (2 ranks, each reads the whole tensors)
    ddp = _resumable_copy(tmp_path, two, "fsdp-to-ddp", 4)
    _ok(_torchrun(tmp_path, _run_cfg(tmp_path, "fsdp-to-ddp")))
    assert _close(two, ddp) <= PARAM_ATOL

    # 1 -> 2: the one process's (one-file) checkpoint-4 resumed by 2 FSDP2 ranks
    up = _resumable_copy(tmp_path, one, "one-to-two", 4)
    _ok(_torchrun(tmp_path, _run_cfg(tmp_path, "one-to-two", fsdp=True)))
    assert _close(one, up) <= PARAM_ATOL
    for w1, w2 in zip(_weights(one), _weights(up), strict=True):
        assert w2 == pytest.approx(w1, rel=1e-6)
    assert json.loads((up / "checkpoint-6" / ckpt.MANIFEST).read_text())["layout"] == "sharded"

    # a NaN in rank 1's piece of a weight (digests recomputed: the bytes are intact, the values not)
    bad = _resumable_copy(tmp_path, two, "nan", 4)
    shard = _poison(bad / "checkpoint-4", "shards/shard-00002-model-00001-of-00001.safetensors")
    with pytest.raises(
        ckpt.CheckpointError, match=r"bad field of .*checkpoint-4/shards: student\[.*\] must hold finite numbers"
    ):
        real.distill(_run_cfg(tmp_path, "nan"))  # one process reads the whole tensors
    res = _torchrun(tmp_path, _run_cfg(tmp_path, "nan", fsdp=True))  # only rank 1 reads the NaN: both refuse
    assert res.returncode != 0 and "must hold finite numbers" in res.stderr, res.stderr[-4000:]
    assert shard.is_file() and not (bad / "checkpoint-6").exists()


def _poison(path: Path, name: str) -> Path:
    """Write NaN into the first floating tensor of the shard file ``name`` and fix the manifest's digest."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ddk._io import file_sha256

    f_path = path / name
    with safe_open(str(f_path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in sorted(tensors) if k.startswith("student/") and tensors[k].numel())
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, str(f_path), metadata=meta)
    man = json.loads((path / ckpt.MANIFEST).read_text())
    man["files"][name] = {"bytes": f_path.stat().st_size, "sha256": file_sha256(f_path)}
    (path / ckpt.MANIFEST).write_text(json.dumps(man))
    return f_path


# ---------------------------------------------------------------------------- the student streamed out of FSDP2
_EXPORT_WORKER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch
    import torch.distributed as dist

    rank, world, port, root, here = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]), sys.argv[5]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    sys.path.insert(0, here)
    sys.path.insert(0, str(Path(here).parents[2]))
    from test_sharded import export_model, NoTokenizer
    from torch.distributed.fsdp import fully_shard
    from ddk.engine.export import save_final_student

    for family in ("llama", "qwen2"):
        step = torch.nn.Module()
        step.student = export_model(family)
        for layer in step.student.model.layers:
            fully_shard(layer)
        fully_shard(step)
        (root / f"fsdp-{family}").mkdir(exist_ok=True)
        save_final_student(step, step.student, NoTokenizer(), root / f"fsdp-{family}", fsdp=True, run_info={"r": 1})
    dist.barrier()
    dist.destroy_process_group()
    """
)


class NoTokenizer:
    def save_pretrained(self, path: str) -> None:  # the tests' stand-in: no tokenizer files
        pass


def export_model(family: str):  # type: ignore[no-untyped-def]
    """A small student of ``family`` (``qwen2``: tied embeddings) with 13 rows, uneven over 2 ranks."""
    from hf_models import make_model

    return make_model(family, 13, hidden=16, layers=2, seed=3)


def test_student_streamed_from_fsdp_ranks_equals_save_pretrained(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from gloo_workers import run_workers
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from ddk.engine.models import save_student

    script = tmp_path / "export.py"
    script.write_text(_EXPORT_WORKER)
    run_workers(script, lambda r, port: [r, 2, port, tmp_path, Path(__file__).parent], timeout=240)
    for family in ("llama", "qwen2"):
        model = export_model(family)
        (tmp_path / f"one-{family}").mkdir()
        save_student(model.state_dict(), model, NoTokenizer(), tmp_path / f"one-{family}", run_info={"r": 1})
        one, two = tmp_path / f"one-{family}" / "student", tmp_path / f"fsdp-{family}" / "student"
        assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
        a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # tied copies left out alike
        assert (one / "config.json").read_text() == (two / "config.json").read_text()
        loaded = AutoModelForCausalLM.from_pretrained(str(two))
        assert all(torch.equal(p, q) for p, q in zip(loaded.state_dict().values(), model.state_dict().values()))
