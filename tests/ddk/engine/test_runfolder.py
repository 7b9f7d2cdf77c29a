"""Tests of ddk/engine/runfolder.py: one writer per run folder, and a run's config.json read back
like user input; on the tiny models of ``recipe_cases``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from recipe_cases import child_env as _env
from recipe_cases import run_cfg as _cfg

import ddk.recipes.distill as real
from ddk.recipes.cli import main


def test_evaluate_validates_the_run_config_like_user_input(tmp_path, capsys):
    cfg = _cfg(tmp_path, "run", steps=2)
    real.distill(cfg)
    run = Path(cfg.out)
    (run / "config.json").write_text("{not json")
    assert main(["evaluate", str(run)]) == 2
    assert (
        f"ddk evaluate: error: evaluate: {run / 'config.json'} must be the JSON config written by ddk distill; "
        "got an unreadable file (JSONDecodeError" in capsys.readouterr().err
    )
    (run / "config.json").write_text(json.dumps({**cfg.to_dict(), "steps": "6; rm -rf /"}))
    with pytest.raises(
        ValueError,
        match=r"evaluate: .*config\.json must be a valid config written by ddk distill; "
        r"got: RunConfig: steps must be of type int; got '6; rm -rf /'\.",
    ):
        real.evaluate(run)


@pytest.mark.e2e
def test_second_writer_on_a_run_folder_is_refused_naming_the_holder(tmp_path):
    cfg = _cfg(tmp_path, "run", steps=2)
    code = (
        "import sys, time; from ddk._io import folder_lock\n"
        "with folder_lock(sys.argv[1], 'distill', 'out'):\n    print('locked', flush=True); time.sleep(120)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, cfg.out], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(
            ValueError,
            match=rf"distill: out must not be in use by another process; got "
            rf"'{cfg.out}' locked by pid {holder.pid} .*Wait for that run to finish",
        ):
            real.distill(cfg)
        assert not (Path(cfg.out) / "config.json").exists()  # nothing written
    finally:
        holder.kill()
        holder.wait()
    real.distill(cfg)  # the kernel dropped the killed holder's lock
    assert (Path(cfg.out) / "summary.json").is_file()


@pytest.mark.parametrize("where", ["student", "student/sub", "parent"])
def test_out_equal_to_inside_or_around_an_input_is_refused_before_anything_is_written(tmp_path, where) -> None:  # type: ignore[no-untyped-def]
    from recipe_cases import own_cfg, own_models

    _, student, _ = own_models(tmp_path, "llama")
    out = {"student": student, "student/sub": student / "sub", "parent": student.parent}[where]
    before = sorted(p.name for p in student.iterdir())
    with pytest.raises(ValueError, match=r"out must be a folder apart from the inputs; .* (teacher|student)="):
        own_cfg(tmp_path, out=str(out))
    assert sorted(p.name for p in student.iterdir()) == before


@pytest.mark.parametrize("where", ["cache", "cache/packed/key"])
def test_out_equal_to_data_dir_or_inside_its_packed_caches_is_refused(tmp_path, where) -> None:  # type: ignore[no-untyped-def]
    from recipe_cases import own_cfg

    with pytest.raises(ValueError, match=r"out must be a folder apart from the caches; .* which is data_dir"):
        own_cfg(tmp_path, out=str(tmp_path / where))  # own_cfg's data_dir is tmp_path/cache
    own_cfg(tmp_path, out=str(tmp_path / "cache" / "runs" / "mine"))  # a run folder beside the caches is fine


def test_run_folder_files_are_readable_by_the_team(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Every file of a run folder (JSON, checkpoints, the student's safetensors) gets the mode a
    plain ``open()`` would give under the process's umask (0644 under 022), not mkstemp's 0600."""
    import os
    import stat

    from recipe_cases import own_cfg

    from ddk.recipes.distill import distill

    old = os.umask(0o022)
    try:
        distill(own_cfg(tmp_path, steps=2, interval=1, checkpoint_every=1, out=str(tmp_path / "run")))
    finally:
        os.umask(old)
    modes = {
        p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode)
        for p in (tmp_path / "run").rglob("*")
        if p.is_file() and p.name != ".lock"
    }
    assert "run/student/model.safetensors" in modes and "run/checkpoint-2/tensors.safetensors" in modes
    assert {k: oct(m) for k, m in modes.items() if m & 0o044 != 0o044} == {}


@pytest.mark.parametrize(
    "name",
    [".lock", "metrics.jsonl", "controller.jsonl", "weights.png", ".student.tmp-PID", ".student.old-7", "checkpoint-1"],
)
def test_a_link_where_distill_writes_is_an_error_naming_it_and_nothing_leaves_out(tmp_path, name) -> None:  # type: ignore[no-untyped-def]
    """A symbolic link planted in the run folder (dangling, to a file or a folder outside) is never
    written through: the run stops with an error naming it, and the target is untouched."""
    import os

    from recipe_cases import own_cfg

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me\n")
    run = tmp_path / "run"
    run.mkdir()
    link = run / name.replace("PID", str(os.getpid()))  # save_student's temporary folder of this process
    folders = (".student.tmp-PID", ".student.old-7", "checkpoint-1")
    target = outside if name in folders else {".lock": outside / "precious.txt"}.get(name, outside / "new")
    link.symlink_to(target)
    with pytest.raises(ValueError, match=rf"{link.name} must not be a symbolic link .*got a link to '{target}'"):
        real.distill(own_cfg(tmp_path, steps=2, interval=1, checkpoint_every=1, out=str(run)))
    assert (outside / "precious.txt").read_text() == "keep me\n"  # a .lock link had it truncated to the pid
    assert sorted(p.name for p in outside.iterdir()) == ["precious.txt"]  # nothing written into or beside it
    assert os.path.islink(link)
    assert not (run / "config.json").exists()  # found before anything is written


def test_a_dangling_metrics_link_planted_before_a_resume_is_an_error_naming_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from recipe_cases import own_cfg

    cfg = own_cfg(tmp_path, steps=2, interval=1, checkpoint_every=1, out=str(tmp_path / "run"))
    real.distill(cfg)
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.unlink()
    metrics.symlink_to(tmp_path / "elsewhere.jsonl")
    with pytest.raises(ValueError, match=r"distill: .*metrics\.jsonl must not be a symbolic link"):
        real.distill(cfg)
    assert not (tmp_path / "elsewhere.jsonl").exists()  # was created by the resumed run's append


def test_teacher_offload_may_change_on_resume_and_leaves_the_config_digest() -> None:
    """Where the teacher's shards wait (host memory or the device) changes no result: a run resumes
    with or without ``--teacher-offload cpu`` and ``ddk evaluate`` accepts its student either way
    (the end-to-end resume: tests/ddk/engine/test_parallel.py)."""
    from ddk.engine.config import RunConfig
    from ddk.engine.runfolder import RESUME_IGNORED, config_digest, result_options

    plain, offloaded = (
        RunConfig(teacher="t", student="s", data=("d.jsonl",), fsdp=True, teacher_offload=mode)
        for mode in ("none", "cpu")
    )
    assert "teacher_offload" in RESUME_IGNORED
    assert result_options(plain.run_dict()) == result_options(offloaded.run_dict())
    assert config_digest(plain) == config_digest(offloaded)
