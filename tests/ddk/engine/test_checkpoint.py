"""``ddk distill``'s checkpoints: ``checkpoint-<step>/``, the newest ``keep_checkpoints`` kept,
``--resume`` from the newest; a crafted (pickled) checkpoint never runs code, a corrupted newest one
is passed over, a torn log line is dropped, and a crash in every write of a checkpoint resumes
bit-identically. In one process on the tiny models and corpus of ``recipe_cases``. The SIGKILL and
truncated-file cases are in ``test_kill_resume``; many processes in ``test_distributed_distill``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import torch
from recipe_cases import crash_in_step, own_cfg
from recipe_cases import flip_bit as _flip_bit
from recipe_cases import run_cfg as _cfg
from recipe_cases import same_student as _same_student
from safetensors.torch import load_file

import ddk.recipes.distill as real
from ddk._io import file_sha256
from ddk.engine import checkpoint as ckpt
from ddk.engine.parallel import device_for
from ddk.recipes.config import make_config


def _config(tmp: Path, name: str, **kw):  # type: ignore[no-untyped-def]
    base = dict(steps=6, interval=3, checkpoint_every=1, log_every=1, keep_checkpoints=2, out=str(tmp / "runs" / name))
    base.update(kw)
    return own_cfg(tmp, **base)


def _ckpts(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint"))


def _resume_loading(monkeypatch, cfg) -> list[str]:  # type: ignore[no-untyped-def]
    """Run ``distill`` again (resume) and return the names of the checkpoints it loaded."""
    from ddk.engine import checkpoint as ckpt

    loaded: list[str] = []
    orig = ckpt.load_checkpoint

    def spy(path, *a, **k):  # type: ignore[no-untyped-def]
        loaded.append(Path(path).name)
        return orig(path, *a, **k)

    monkeypatch.setattr(ckpt, "load_checkpoint", spy)
    real.distill(cfg)
    monkeypatch.undo()
    return loaded


def _same_run(a: Path, b: Path) -> None:
    sa, sb = load_file(str(a / "student" / "model.safetensors")), load_file(str(b / "student" / "model.safetensors"))
    assert [k for k in sa if not torch.equal(sa[k], sb[k])] == []
    log = [
        [(r["step"], r["weights"]) for r in map(json.loads, (run / "controller.jsonl").read_text().splitlines())]
        for run in (a, b)
    ]
    assert log[0] == log[1]
    assert [json.loads(line)["step"] for line in (b / "metrics.jsonl").read_text().splitlines()] == list(range(1, 7))


def test_distill_keeps_last_k_checkpoints_and_resumes_from_the_newest(tmp_path, monkeypatch):
    ref_cfg = _config(tmp_path, "ref")
    real.distill(ref_cfg)
    ref = Path(ref_cfg.out)
    assert _ckpts(ref) == ["checkpoint-5", "checkpoint-6"]  # every step written, the newest 2 kept, no temporaries
    assert sorted(p.name for p in ref.iterdir() if p.name.startswith(".")) == [".lock"]

    cfg = _config(tmp_path, "crash", keep_checkpoints=3)  # keep_checkpoints does not change the run
    run = Path(cfg.out)
    crash_in_step(monkeypatch, cfg, 5)
    assert _ckpts(run) == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]
    assert _resume_loading(monkeypatch, cfg) == ["checkpoint-4"]
    assert _ckpts(run) == ["checkpoint-4", "checkpoint-5", "checkpoint-6"]
    _same_run(ref, run)


def test_distill_fsdp_outside_torchrun_is_an_error(tmp_path, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(
        ValueError,
        match=r"distill: fsdp must run under torchrun \(it needs a process group\); got a "
        r"plain process\. Launch with `torchrun --nproc_per_node=R",
    ):
        real.distill(_config(tmp_path, "fsdp", fsdp=True))


def test_config_checkpoint_and_distributed_options_are_checked():
    with pytest.raises(ValueError, match=r"RecipeConfig: keep_checkpoints must be >= 1; got 0\."):
        make_config(keep_checkpoints=0)
    with pytest.raises(
        ValueError, match=r"RecipeConfig: dist_backend must be one of \('auto', 'gloo', 'nccl'\); got 'mpi'\."
    ):
        make_config(dist_backend="mpi")
    from ddk.recipes.cli import build_parser
    from ddk.recipes.config import config_from_args

    args = build_parser().parse_args(
        ["distill", "--keep-checkpoints", "5", "--fsdp", "--debug-checks", "--dist-backend", "gloo"]
    )
    cfg = config_from_args(args)
    assert (cfg.keep_checkpoints, cfg.fsdp, cfg.debug_checks, cfg.dist_backend) == (5, True, True, "gloo")


def test_config_device_option(monkeypatch):
    with pytest.raises(ValueError, match=r"RecipeConfig: device must be one of \('auto', 'cpu', 'cuda'\); got 'tpu'\."):
        make_config(device="tpu")
    from ddk.recipes.cli import build_parser
    from ddk.recipes.config import config_from_args

    assert config_from_args(build_parser().parse_args(["distill", "--device", "cpu"])).device == "cpu"
    assert device_for(make_config(device="cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_for(make_config()) == torch.device("cpu")  # auto without CUDA
    with pytest.raises(ValueError, match=r"distill: device must be 'cpu' or 'auto' without a CUDA device; got 'cuda'"):
        device_for(make_config(device="cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device_for(make_config()) == torch.device("cuda", 0)  # auto with CUDA
    # under torchrun --device picks the process-group backend when --dist-backend is auto
    assert [make_config(device=d).process_group_backend for d in ("auto", "cpu", "cuda")] == ["auto", "gloo", "nccl"]
    assert make_config(device="cpu", dist_backend="gloo").process_group_backend == "gloo"
    with pytest.raises(
        ValueError,
        match=r"RecipeConfig: dist_backend must match device \(gloo runs on the CPU, nccl "
        r"on CUDA\); got device 'cpu' with dist_backend 'nccl'\.",
    ):
        make_config(device="cpu", dist_backend="nccl")


def test_distill_resume_with_another_config_names_the_checkpoint_and_overwrites_nothing(tmp_path):
    cfg = _config(tmp_path, "run", steps=2)
    real.distill(cfg)
    run = Path(cfg.out)
    before = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(
        ValueError,
        match=r"distill: the checkpoint .*checkpoint-2 must be of the same config to "
        r"resume; got different \['lr'\] \(use another --out or --no-resume\)\.",
    ):
        real.distill(_config(tmp_path, "run", steps=2, lr=0.5))
    assert {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


# ---------------------------------------------------------------------------- crafted, corrupted and torn files
class _Payload:
    """Unpickling this creates ``marker``: a stand-in for any command an attacker would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.marker), "w"))


def test_crafted_checkpoint_never_executes_code(tmp_path):
    import pickle

    cfg = _cfg(tmp_path, "run", steps=2, checkpoint_every=2)
    real.distill(cfg)
    run, marker = Path(cfg.out), tmp_path / "pwned"
    payload = pickle.dumps({"step": 3, "config": cfg.to_dict(), "x": _Payload(marker)})
    # a newer checkpoint whose files are pickles, with a manifest whose digests match them
    evil = run / "checkpoint-3"
    shutil.copytree(run / "checkpoint-2", evil)
    for name in (ckpt.TENSORS, ckpt.STATE):
        (evil / name).write_bytes(payload)
    man = json.loads((evil / ckpt.MANIFEST).read_text())
    man["step"] = 3
    man["files"] = {
        n: {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()} for n in (ckpt.TENSORS, ckpt.STATE)
    }
    (evil / ckpt.MANIFEST).write_text(json.dumps(man))
    (run / "checkpoint-9.pt").write_bytes(payload)  # and an old-format checkpoint: never opened
    with pytest.raises(
        ValueError,
        match=r"distill: the checkpoint .*checkpoint-3 must hold a readable "
        r"tensors\.safetensors and state\.json; got ",
    ):
        real.distill(cfg)
    shutil.rmtree(evil)
    for _, p in ckpt.checkpoints(run):
        shutil.rmtree(p)
    with pytest.raises(
        ValueError,
        match=r"distill: the checkpoints of .* must be checkpoint-<step>/ folders "
        r"\(safetensors \+ JSON\) to resume; got \['checkpoint-9\.pt'\] of an older ddk",
    ):
        real.distill(cfg)
    assert not marker.exists()


def test_flipped_bit_in_newest_checkpoint_is_detected_and_resume_falls_back(tmp_path, capsys):
    ref = _cfg(tmp_path, "ref", checkpoint_every=3)
    real.distill(ref)
    cfg = _cfg(tmp_path, "run", checkpoint_every=3)
    real.distill(cfg)
    run = Path(cfg.out)
    _flip_bit(run / "checkpoint-6" / ckpt.TENSORS)
    path, passed = ckpt.newest_valid_checkpoint(run)
    assert path == run / "checkpoint-3"
    have = file_sha256(run / "checkpoint-6" / ckpt.TENSORS)
    want = json.loads((run / "checkpoint-6" / ckpt.MANIFEST).read_text())["files"][ckpt.TENSORS]["sha256"]
    assert passed == [
        (
            f"distill: the checkpoint {run / 'checkpoint-6'} must be complete and intact; got "
            f"tensors.safetensors with SHA-256 {have} where the manifest says {want}."
        )
    ]
    capsys.readouterr()
    real.distill(cfg)
    assert "Resuming from the previous valid checkpoint checkpoint-3." in capsys.readouterr().err
    _same_student(Path(ref.out), run)
    assert ckpt.load_checkpoint(run / "checkpoint-6")["step"] == 6  # rewritten, intact


def test_torn_log_line_is_dropped_on_resume_and_no_resume_moves_the_run_aside(tmp_path, monkeypatch, capsys):
    ref = _cfg(tmp_path, "ref", checkpoint_every=1, log_every=1)
    real.distill(ref)
    cfg = _cfg(tmp_path, "run", checkpoint_every=1, log_every=1)
    crash_in_step(monkeypatch, cfg, 5)
    run = Path(cfg.out)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 1.2')  # ENOSPC mid-record
    capsys.readouterr()
    real.distill(cfg)
    assert f"dropped the torn last line 5 of {run / 'metrics.jsonl'}" in capsys.readouterr().err
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    _same_student(Path(ref.out), run)

    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "{broken", *lines[1:]]) + "\n")
    shutil.rmtree(run / "checkpoint-6")
    with pytest.raises(
        ValueError,
        match=rf"distill: every line of {run / 'metrics.jsonl'} must be a JSON record to "
        r"resume; got line 2: ",
    ):
        real.distill(cfg)

    kept = {p.name for p in run.iterdir() if p.name.startswith("checkpoint-")}
    real.distill(_cfg(tmp_path, "run", checkpoint_every=1, log_every=1, resume=False))
    moved = [p for p in run.iterdir() if p.name.startswith("replaced-")]
    assert len(moved) == 1
    assert kept <= {p.name for p in moved[0].iterdir()} and (moved[0] / "metrics.jsonl").read_text().count("{broken")
    assert ckpt.load_checkpoint(moved[0] / "checkpoint-5")["step"] == 5  # still valid, just out of the way
    _same_student(Path(ref.out), run)


# ---------------------------------------------------------------------------- a crash in every write
_WRITES = ("_save_tensors", "_write_durable", "_rename", "_remove_tree")


def _killed_in_write(monkeypatch, cfg, k: int) -> bool:  # type: ignore[no-untyped-def]
    """Run ``distill``, killing it at the ``k``-th write of its step-3 checkpoint (a torn file when that
    write is one); False when the checkpoint has fewer writes (the run then finishes)."""
    count = {"n": 0, "armed": False}

    def wrap(name, orig):  # type: ignore[no-untyped-def]
        def op(*a, **kw):  # type: ignore[no-untyped-def]
            if count["armed"]:
                count["n"] += 1
                if count["n"] == k:
                    if name == "_write_durable":  # a torn write: half the text, then the kill
                        Path(a[0]).write_text(a[1][: len(a[1]) // 2])
                    raise KeyboardInterrupt(f"killed in {name}")
            return orig(*a, **kw)

        return op

    orig_save = ckpt.save_checkpoint

    def save(out, step, state, keep):  # type: ignore[no-untyped-def]
        count["armed"] = step == 3  # every write of the step-3 checkpoint (and its pruning of checkpoint-1)
        try:
            return orig_save(out, step, state, keep)
        finally:
            count["armed"] = False

    for name in _WRITES:
        monkeypatch.setattr(ckpt, name, wrap(name, getattr(ckpt, name)))
    monkeypatch.setattr(ckpt, "save_checkpoint", save)
    try:
        real.distill(cfg)
        return False
    except KeyboardInterrupt:
        return True
    finally:
        monkeypatch.undo()


def test_crash_during_every_checkpoint_write_then_resume_is_bit_identical(tmp_path, monkeypatch):
    ref = _cfg(tmp_path, "ref", steps=4, checkpoint_every=1, interval=2)
    real.distill(ref)
    k = 1
    while True:
        cfg = _cfg(tmp_path, f"crash{k}", steps=4, checkpoint_every=1, interval=2)
        if not _killed_in_write(monkeypatch, cfg, k):  # k passed the number of writes: every one was hit
            break
        real.distill(cfg)  # resume (from checkpoint-2, or checkpoint-3 if its rename was done)
        _same_student(Path(ref.out), Path(cfg.out))
        assert not [p for p in Path(cfg.out).iterdir() if p.name.startswith(".checkpoint-")]
        k += 1
    assert k > 5  # tensors, state, manifest, rename into place, pruning (rename + delete)


# ---------------------------------------------------------------------------- well-formed checkpoints, absurd values
@pytest.fixture(scope="module")
def finished(tmp_path_factory):  # type: ignore[no-untyped-def]
    """``(root, run)``: a finished 4-step run with checkpoint-2 and checkpoint-4, shared by the tests below (copied)."""
    root = tmp_path_factory.mktemp("values")
    cfg = _config(root, "base", steps=4, interval=2, checkpoint_every=2)
    real.distill(cfg)
    return root, Path(cfg.out)


def _copy_run(finished, name: str, *, from_step: int = 4):  # type: ignore[no-untyped-def]
    """A copy of the finished run (resumable from ``checkpoint-<from_step>``) and its config."""
    root, base = finished
    run = root / "runs" / name
    shutil.copytree(base, run)
    if from_step != 4:  # the run stopped at checkpoint-<from_step>: resuming trains the remaining steps
        shutil.rmtree(run / "checkpoint-4")
        for f in ("summary.json",):
            (run / f).unlink()
        shutil.rmtree(run / "student")
    return run, _config(root, name, steps=4, interval=2, checkpoint_every=2)


def _rewrite(path: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    """Edit the state of the checkpoint ``path`` and write it back with the library's own writer
    (digests recomputed: the checkpoint stays intact); return the new folder."""
    ck = ckpt.load_checkpoint(path)
    edit(ck)
    step = ck.pop("step")
    shutil.rmtree(path)
    return ckpt.save_checkpoint(path.parent, step, ck, keep=100)


def _files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}


def _refused(cfg, run: Path, pattern: str) -> None:  # type: ignore[no-untyped-def]
    """``distill(cfg)`` is a ``CheckpointError`` matching ``pattern`` and changes no file of ``run``."""
    before = _files(run)
    with pytest.raises(ckpt.CheckpointError, match=pattern) as info:
        real.distill(cfg)
    assert "Nothing was overwritten: pass --no-resume to start over" in str(info.value)
    assert _files(run) == before


def test_resume_refuses_a_step_beyond_the_runs_steps(finished):
    run, cfg = _copy_run(finished, "beyond")
    new = _rewrite(run / "checkpoint-4", lambda ck: ck.update(step=12))
    assert new.name == "checkpoint-12" and ckpt.newest_valid_checkpoint(run) == (new, [])
    _refused(
        cfg,
        run,
        r"distill: the checkpoint .*checkpoint-12 must hold values this run can resume from; got a bad field of "
        r".*checkpoint-12/state\.json: step must be an int in \[0, 4\] \(the run's steps=4\); got 12\.",
    )


def test_resume_refuses_a_step_the_sampler_and_optimizer_disagree_with(finished):
    run, cfg = _copy_run(finished, "disagree", from_step=2)
    _rewrite(run / "checkpoint-2", lambda ck: ck.update(step=3))
    _refused(cfg, run, r"state\.json: controller\.sampler\.batches_yielded must equal the step 3 \(one global batch")


def _lr(value: float, *, scheduler: bool = True):  # type: ignore[no-untyped-def]
    def edit(ck):  # type: ignore[no-untyped-def]
        for g in ck["optimizer"]["param_groups"]:
            g["lr"] = g["initial_lr"] = value
        if scheduler:
            ck["scheduler"]["base_lrs"] = [value] * len(ck["scheduler"]["base_lrs"])
            ck["scheduler"]["_last_lr"] = [value] * len(ck["scheduler"]["_last_lr"])

    return edit


def test_resume_refuses_a_negative_learning_rate_in_the_optimizer_state(finished):
    run, cfg = _copy_run(finished, "negative-lr", from_step=2)
    _rewrite(run / "checkpoint-2", _lr(-2e-3, scheduler=False))
    _refused(
        cfg,
        run,
        r"state\.json: optimizer\.param_groups\[0\]\.lr must be a finite learning rate >= 0; got -0\.002\.",
    )
    _rewrite(run / "checkpoint-2", _lr(-2e-3))  # and in the scheduler's base rates
    _refused(cfg, run, r"state\.json: scheduler\.base_lrs\[0\] must be a finite learning rate >= 0; got -0\.002\.")


def test_resume_takes_the_learning_rate_from_the_config_not_the_state(finished):
    run, cfg = _copy_run(finished, "other-lr", from_step=2)
    _rewrite(run / "checkpoint-2", _lr(0.5))  # a different, plausible rate: the config's is used
    real.distill(cfg)
    _same_student(finished[1], run)
    lrs = [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    base = [json.loads(line)["lr"] for line in (finished[1] / "metrics.jsonl").read_text().splitlines()]
    assert lrs == base and max(lrs) <= 2e-3


@pytest.mark.parametrize("extra", [4 * 10**18, 2**64], ids=["4e18", "above-2**63"])
def test_resume_refuses_sampler_counts_beyond_2_53(finished, extra: int):
    run, cfg = _copy_run(finished, f"passes-{extra}")

    def edit(ck):  # type: ignore[no-untyped-def]
        s = ck["controller"]["sampler"]
        size, batch = s["config"]["domain_sizes"][0], s["config"]["global_batch_size"]
        s["passes"][0] += extra * batch  # more passes over domain 0, batches_yielded raised to match
        s["batches_yielded"] += extra * size

    _rewrite(run / "checkpoint-4", edit)
    _refused(
        cfg,
        run,
        r"state\.json: controller \(sampler\): batches_yielded \* global_batch_size \(the samples drawn\) must be at "
        r"most 2\*\*53",
    )


def test_resume_refuses_nonfinite_optimizer_moments(finished):
    run, cfg = _copy_run(finished, "nan-moment", from_step=2)

    def edit(ck):  # type: ignore[no-untyped-def]
        ck["optimizer"]["state"][0]["exp_avg"][0] = float("nan")

    _rewrite(run / "checkpoint-2", edit)
    _refused(
        cfg,
        run,
        r"tensors\.safetensors: optimizer\.state\[0\]\.exp_avg must hold finite numbers; got \d+ of \d+ values NaN or infinite\.",
    )


def test_load_checkpoint_refuses_an_oversized_state_file(tmp_path, monkeypatch):
    path = ckpt.save_checkpoint(tmp_path, 1, {"config": {}, "pad": "x" * 5000}, keep=1)
    monkeypatch.setattr(ckpt, "MAX_STATE_BYTES", 4096)
    with pytest.raises(
        ckpt.CheckpointError,
        match=rf"distill: {path / ckpt.STATE} must be a JSON file of at most 4096 bytes; got \d+ bytes",
    ):
        ckpt.load_checkpoint(path)


def test_load_checkpoint_refuses_state_nested_900_deep(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 1, {"config": {}}, keep=1)
    state = ("{" + '"step": 1, "config": {}, "x": ' + "[" * 900 + "]" * 900 + "}").encode()
    (path / ckpt.STATE).write_bytes(state)
    man = json.loads((path / ckpt.MANIFEST).read_text())
    man["files"][ckpt.STATE] = {"bytes": len(state), "sha256": hashlib.sha256(state).hexdigest()}
    (path / ckpt.MANIFEST).write_text(json.dumps(man))
    with pytest.raises(ckpt.CheckpointError, match=r"state\.json must be JSON nested at most \d+ deep; got 901 levels"):
        ckpt.load_checkpoint(path)


def test_load_checkpoint_names_a_step_other_than_its_folders(finished):
    import hashlib
    import json

    run, _ = _copy_run(finished, "renamed")
    path = run / "checkpoint-4"
    state = json.loads((path / "state.json").read_text())
    state["step"] = 20
    blob = json.dumps(state).encode()
    (path / "state.json").write_bytes(blob)
    man = json.loads((path / "manifest.json").read_text())  # digests recomputed: the files are intact
    man["files"]["state.json"] = {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    (path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(
        ckpt.CheckpointError,
        match=r"checkpoint-4 must hold the step of its folder name, 4; got step 20 in state\.json",
    ):
        ckpt.load_checkpoint(path)


def test_resume_refuses_a_teacher_ce_its_teacher_does_not_give(finished):
    run, cfg = _copy_run(finished, "teacher-ce", from_step=2)

    def forge(ck):  # type: ignore[no-untyped-def]
        ce = ck["controller"]["estimator"]["teacher_ce"]
        ck["controller"]["estimator"]["teacher_ce"] = [0.5] + list(ce[1:])

    _rewrite(run / "checkpoint-2", forge)
    _refused(cfg, run, r"checkpoint-2 must carry the teacher's per-domain CE; got \[0\.5, ")


def test_resume_bit_identical_after_the_teacher_ce_check(finished):
    run, cfg = _copy_run(finished, "teacher-ce-ok", from_step=2)
    real.distill(cfg)  # the teacher measured again at the resume: the run goes on with the bits it saved
    a, b = (load_file(str(r / "student" / "model.safetensors")) for r in (finished[1], run))
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert (finished[1] / "controller.jsonl").read_text() != "" and [
        json.loads(line)["weights"] for line in (run / "controller.jsonl").read_text().splitlines()
    ] == [json.loads(line)["weights"] for line in (finished[1] / "controller.jsonl").read_text().splitlines()]
