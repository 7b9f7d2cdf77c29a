"""Crash safety of ``ddk distill``: SIGKILL at a random step + resume == an uninterrupted run, bit for bit.

The runs are real ``python -m ddk.recipes.cli distill --teacher --student --data`` processes on the tiny
models and corpus of ``recipe_cases`` (the student with dropout, so the RNG state must be restored)
(CPU, one thread, ``torch.use_deterministic_algorithms(True)`` through a ``sitecustomize`` on
``PYTHONPATH``), checkpointing every step.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
yaml = pytest.importorskip("yaml")

import torch  # noqa: E402
from recipe_cases import own_cfg  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from ddk.engine.checkpoint import load_checkpoint  # noqa: E402

pytestmark = pytest.mark.e2e  # torchrun / subprocess runs

STEPS = 40
KILL_SEED = 6


def _setup(tmp_path: Path, name: str, steps: int = STEPS) -> tuple[list[str], dict[str, str], Path]:
    """Save the models and corpus; return (command, env, run folder) of one distill run."""
    cfg = own_cfg(
        tmp_path,
        dropout=0.1,
        steps=steps,
        checkpoint_every=1,
        log_every=1,
        threads=1,
        out=str(tmp_path / "runs" / name),
    )
    if not (tmp_path / ".prepared").is_file():
        site = tmp_path / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text("import torch\ntorch.use_deterministic_algorithms(True)\n")
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    (tmp_path / ".prepared").touch()
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            [str(tmp_path / "site"), str(Path(__file__).resolve().parents[3]), os.environ.get("PYTHONPATH", "")]
        ),
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
    )
    cmd = [sys.executable, "-m", "ddk.recipes.cli", "distill", "--config", str(tmp_path / f"{name}.yaml")]
    return cmd, env, Path(cfg.out)


def _latest_ckpt(run: Path) -> Path:
    """The newest checkpoint-<step>/ folder of the run folder."""
    return max((p for p in run.glob("checkpoint-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))


def _ckpt_step(run: Path) -> int | None:
    """Step of the last line of metrics.jsonl (written just before that step's checkpoint), or None."""
    p = run / "metrics.jsonl"
    if not any(run.glob("checkpoint-*/manifest.json")) or not p.is_file():
        return None
    lines = [line for line in p.read_text().splitlines() if line.endswith("}")]
    return json.loads(lines[-1])["step"] if lines else None


def _weight_log(run: Path) -> list[tuple[int, list[float]]]:
    recs = [json.loads(line) for line in (run / "controller.jsonl").read_text().splitlines()]
    return [(r["step"], r["weights"]) for r in recs]


def _assert_same_student(a: Path, b: Path) -> None:
    sa, sb = load_file(str(a / "student" / "model.safetensors")), load_file(str(b / "student" / "model.safetensors"))
    assert sa.keys() == sb.keys()
    diff = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not diff, f"student tensors differ after resume: {diff}"


def test_sigkill_at_random_step_then_resume_is_bit_identical(tmp_path):
    cmd, env, ref = _setup(tmp_path, "ref")
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=120)

    cmd, env, run = _setup(tmp_path, "killed")
    kill_at = random.Random(KILL_SEED).randint(3, STEPS - 10)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed_after = None
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        step = _ckpt_step(run)
        if step is not None and step >= kill_at:
            proc.send_signal(signal.SIGKILL)
            killed_after = step
            break
        time.sleep(0.002)
    proc.wait(timeout=30)
    assert killed_after is not None and proc.returncode == -signal.SIGKILL, (
        f"the run was not killed mid-way (rc {proc.returncode}): {proc.stderr.read().decode()[-2000:]}"
    )
    proc.stderr.close()
    saved = load_checkpoint(_latest_ckpt(run))["step"]
    print(f"kill_at={kill_at} killed after metrics step {killed_after}, checkpoint step {saved}")
    assert 1 <= saved < STEPS and not (run / "summary.json").exists()

    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=120)  # same command: resumes
    _assert_same_student(ref, run)
    assert _weight_log(run) == _weight_log(ref)
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == list(
        range(1, STEPS + 1)
    )


def _files(run: Path) -> dict[str, bytes]:
    """Every file of the run folder but the lock (which holds the pid of its last writer)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def torn(tmp_path_factory):  # type: ignore[no-untyped-def]
    """A finished 4-step run whose newest checkpoint's tensors are cut in half, then the same command again."""
    tmp_path = tmp_path_factory.mktemp("trunc")
    cmd, env, run = _setup(tmp_path, "trunc", steps=4)
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=120)
    ckpt = _latest_ckpt(run)
    assert ckpt.name == "checkpoint-4"
    finished = load_file(str(run / "student" / "model.safetensors"))
    blob = (ckpt / "tensors.safetensors").read_bytes()
    (ckpt / "tensors.safetensors").write_bytes(blob[: len(blob) // 2])
    res = subprocess.run(cmd, env=env, capture_output=True, timeout=120)
    return cmd, env, run, finished, res


def test_torn_newest_checkpoint_falls_back_to_the_previous_one_bit_identically(torn):
    _, _, run, finished, res = torn
    err = res.stderr.decode()
    assert res.returncode == 0, err[-2000:]
    assert f"the checkpoint {run / 'checkpoint-4'} must be complete and intact" in err, err[-2000:]
    assert "Resuming from the previous valid checkpoint checkpoint-3." in err
    again = load_file(str(run / "student" / "model.safetensors"))
    assert [k for k in finished if not torch.equal(finished[k], again[k])] == []
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_no_valid_checkpoint_fails_naming_each_and_overwrites_nothing(torn):
    cmd, env, run, _, _ = torn
    for step in (3, 4):
        f = run / f"checkpoint-{step}" / "tensors.safetensors"
        blob = bytearray(f.read_bytes())
        blob[-3] ^= 0x10  # one flipped bit in the tensor data
        f.write_bytes(bytes(blob))
    before = _files(run)
    res = subprocess.run(cmd, env=env, capture_output=True, timeout=120)
    err = res.stderr.decode()
    assert res.returncode == 2, err[-2000:]
    for step in (3, 4):
        assert f"{run / f'checkpoint-{step}'} must be complete and intact; got tensors.safetensors with SHA-256" in err
    assert "pass --no-resume to start over (the old run is moved aside)" in err
    assert _files(run) == before


# A child ``ddk`` whose named function first sends this process the signal, then runs: the signal
# lands in that stage deterministically.
_SIGNAL_AT = """
import os, signal, sys
stage, signame, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
import ddk.data.teacher_cache as tc, ddk.engine.components as components, ddk.engine.loop as loop
import ddk.recipes.report as report
owner, attr = {
    "start-up": (loop, "load_models"),
    "training": (loop._Run, "train_step"),
    "the final validation": (loop, "discrepancy_report"),
    "saving the student": (loop, "save_final_student"),
    "writing the plots": (report, "plots"),
    "cache start-up": (components, "load_run_data"),
    "the teacher-cache build": (tc, "_teacher_topk"),
}[stage]
orig = getattr(owner, attr)
def hit(*a, **k):
    os.kill(os.getpid(), getattr(signal, signame))
    return orig(*a, **k)
setattr(owner, attr, hit)
from ddk.recipes.cli import main
sys.exit(main(argv))
"""

# training runs in `make test`; the other stages (15-22 s each) in `make test-all`.
_DISTILL_STAGES = [
    pytest.param("start-up", marks=pytest.mark.slow),
    "training",
    *(
        pytest.param(s, marks=pytest.mark.slow)
        for s in ("the final validation", "saving the student", "writing the plots")
    ),
]


@pytest.mark.parametrize("stage", _DISTILL_STAGES)
def test_a_signal_at_any_stage_of_distill_exits_75_and_the_same_command_finishes(tmp_path, stage):
    """SIGTERM/SIGINT at any moment exit 75 (a scheduler requeues on it; 143 or 130 would drop the
    job); the same command then finishes the run with every step trained once."""
    cmd, env, run = _setup(tmp_path, "sig", steps=2)
    signame = "SIGINT" if stage == "start-up" else "SIGTERM"
    res = subprocess.run(
        [sys.executable, "-c", _SIGNAL_AT, stage, signame, *cmd[3:]], env=env, capture_output=True, timeout=180
    )
    err = res.stderr.decode()
    assert res.returncode == 75, err[-3000:]
    if stage == "training":
        assert f"ddk distill: stopped by SIGTERM after step 1; wrote {run / 'checkpoint-1'}." in err
    else:
        assert (
            f"ddk distill: stopped by {signame} during {stage}. Nothing finished is lost: rerun the same command" in err
        )
    res = subprocess.run(cmd, env=env, capture_output=True, timeout=180)
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (run / "student" / "model.safetensors").is_file() and (run / "summary.json").is_file()
    assert not [p.name for p in run.iterdir() if p.name.startswith(".") and p.name != ".lock"]


@pytest.mark.parametrize("stage", ["cache start-up", "the teacher-cache build"])
def test_a_signal_during_teacher_cache_exits_75_and_the_same_command_finishes(tmp_path, stage):
    from recipe_cases import own_models

    from ddk.data import TeacherCache

    cmd, env, _ = _setup(tmp_path, "unused", steps=2)
    teacher, _, corpus = own_models(tmp_path)
    out = tmp_path / "tc"
    argv = ["teacher-cache", "--teacher", str(teacher), "--data", str(corpus), "--out", str(out), "--top-k", "4"]
    argv += ["--data-dir", str(tmp_path / "cache"), "--seq-len", "16", "--val-samples", "4", "--no-progress"]
    argv += ["--device", "cpu"]
    res = subprocess.run(
        [sys.executable, "-c", _SIGNAL_AT, stage, "SIGTERM", *argv], env=env, capture_output=True, timeout=180
    )
    err = res.stderr.decode()
    assert res.returncode == 75, err[-3000:]
    shown = "start-up" if stage == "cache start-up" else stage
    assert f"ddk teacher-cache: stopped by SIGTERM during {shown}. The finished shards are kept: rerun" in err
    assert not (out / "shards").is_dir() or not [p for p in (out / "shards").iterdir() if p.name.startswith(".")]
    res = subprocess.run([*cmd[:3], *argv], env=env, capture_output=True, timeout=180)
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    assert TeacherCache(out, verify=True).top_k == 4
