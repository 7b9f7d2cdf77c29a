"""``ddk distill`` under ``torchrun --nproc_per_node=2`` (gloo on loopback, CPU) == one process.

Each multi-process run is a real ``python -m torch.distributed.run --standalone --nproc_per_node=2
-m ddk.recipes.cli distill --teacher --student --data`` on the tiny models and corpus of
``recipe_cases`` (the packed corpus is cached in-process first); the one-process reference is
``distill`` in this process with the same config and the same global batch (4 sequences: 2 per rank).

Tolerance. Two ranks compute the same global-batch gradient as one process, but summed in a
different order (each rank sums its half, then gloo adds the two halves; the validation CE sums
are split the same way), so results differ by float rounding only: about one float32 ulp per
operation, not a different trajectory. Measured on this tiny model after 6 AdamW steps: student
parameters (|p| <= ~1) within 1.2e-7, DDK weights within 4e-9, logged losses within 1e-7
relative. Asserted: parameters ``atol=1e-5`` (float32, a few ulps amplified by at most 6 Adam
steps of lr 2e-3), weights and CE ``rel=1e-6``.

What this cannot see: every window here has the same number of valid tokens, so dividing by the
local instead of the global token count gives the same loss, and AdamW hardly notices a constant
factor on the gradient (a missing or extra factor R). The normalisation itself is checked on
gradients, with uneven valid tokens per rank, in tests/ddk/test_distributed.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
yaml = pytest.importorskip("yaml")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from gloo_workers import gloo_aborted  # noqa: E402
from recipe_cases import demo_cfg, own_cfg, own_models  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import ddk.recipes.distill as real  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
PARAM_ATOL = 1e-5
REL = 1e-6

pytestmark = [
    pytest.mark.e2e,  # torchrun runs
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available"
    ),
]


def _config(tmp: Path, name: str, **kw):  # type: ignore[no-untyped-def]
    base = dict(
        steps=6,
        batch_size=4,
        interval=2,
        checkpoint_every=2,
        log_every=1,
        threads=1,
        keep_checkpoints=2,
        out=str(tmp / "runs" / name),
    )
    base.update(kw)
    return own_cfg(tmp, **base)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):  # type: ignore[no-untyped-def]
    """A folder with the saved models, the corpus and its packed cache."""
    tmp = tmp_path_factory.mktemp("dist")
    from ddk.engine.components import load_run_data
    from ddk.engine.models import load_models

    cfg = _config(tmp, "prep")
    load_run_data(cfg, load_models(cfg, torch.device("cpu"))[2])
    return tmp


def _torchrun(tmp: Path, cfg, *flags: str, command: str = "distill") -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    """``torchrun --standalone --nproc_per_node=2 -m ddk.recipes.cli <command> --config <cfg as YAML> flags...``."""
    path = tmp / f"{Path(cfg.out).name}.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
    )
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DDK_DEBUG"):
        env.pop(k, None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "ddk.recipes.cli",
        command,
        "--config",
        str(path),
        *flags,
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if gloo_aborted(res.returncode, res.stdout + res.stderr):  # gloo's spurious abort: once more
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"torchrun failed ({res.returncode}):\n{res.stderr[-12000:]}"
    return res


def _controller(run: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in (run / "controller.jsonl").read_text().splitlines()]


def _metrics(run: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _student(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "student" / "model.safetensors"))


def _assert_same_run(one: Path, two: Path) -> None:
    """The 2-process run ``two`` matches the 1-process run ``one`` within float summation tolerance."""
    c1, c2 = _controller(one), _controller(two)
    assert [(r["event"], r["step"], r["batch"]) for r in c2] == [(r["event"], r["step"], r["batch"]) for r in c1]
    for r1, r2 in zip(c1, c2):
        assert r2["weights"] == pytest.approx(r1["weights"], rel=REL, abs=0), f"DDK weights differ at step {r1['step']}"
        assert r2["student_ce"] == pytest.approx(r1["student_ce"], rel=REL)
        assert r2["tokens"] == r1["tokens"]
    m1, m2 = _metrics(one), _metrics(two)
    assert [r["step"] for r in m2] == [r["step"] for r in m1] == list(range(1, 7))  # one writer: no duplicate lines
    for r1, r2 in zip(m1, m2):
        assert r2["batch_domain_tokens"] == r1["batch_domain_tokens"]  # global counts: the slices add up
        assert r2["loss"] == pytest.approx(r1["loss"], rel=REL)
    s1, s2 = _student(one), _student(two)
    assert s1.keys() == s2.keys()
    worst = max((s1[k] - s2[k]).abs().max().item() for k in s1)
    assert worst <= PARAM_ATOL, f"student parameters differ by {worst:.3g} > {PARAM_ATOL}"
    sum1, sum2 = (json.loads((r / "summary.json").read_text()) for r in (one, two))
    assert sum2["samples_per_domain"] == sum1["samples_per_domain"]
    assert sorted(p.name for p in two.glob("checkpoint*")) == ["checkpoint-4", "checkpoint-6"]


def test_distill_ddp_two_ranks_match_one_process(tmp):  # type: ignore[no-untyped-def]
    ref = real.distill(_config(tmp, "ddk-1"))
    res = _torchrun(tmp, _config(tmp, "ddk-2", debug_checks=True))  # the rank checksums pass at every interval
    assert res.stdout.count("teacher CE") == 1  # only rank 0 prints the table
    _assert_same_run(tmp / "runs" / "ddk-1", tmp / "runs" / "ddk-2")
    assert json.loads((tmp / "runs" / "ddk-2" / "summary.json").read_text())["final_weights"] == pytest.approx(
        ref["final_weights"], rel=REL
    )


def test_distill_fsdp_two_ranks_match_one_process_and_resume(tmp):  # type: ignore[no-untyped-def]
    # ddk-online: per-rank training-batch sums, all-reduced at each update; interval 3 with checkpoints
    # every 2 steps puts checkpoint-4 mid-interval, so the resume below needs the saved online sums.
    kw = dict(method="ddk-online", interval=3)
    real.distill(_config(tmp, "online-1", **kw))
    run = tmp / "runs" / "online-2"
    _torchrun(tmp, _config(tmp, "online-2", fsdp=True, debug_checks=True, **kw))
    _assert_same_run(tmp / "runs" / "online-1", run)

    # both ranks resume from the newest checkpoint (4) after losing checkpoint-6 and the outputs
    before_student, before_log = _student(run), _controller(run)
    shutil.rmtree(run / "checkpoint-6")
    (run / "summary.json").unlink()
    _torchrun(tmp, _config(tmp, "online-2", fsdp=True, **kw))
    after = _student(run)
    assert [k for k in before_student if not torch.equal(before_student[k], after[k])] == []
    after_log = _controller(run)
    assert [r["step"] for r in after_log] == [r["step"] for r in before_log] == [0, 3, 6]
    for r1, r2 in zip(before_log, after_log):  # the online sums are re-added in another order: float64 rounding
        assert r2["weights"] == pytest.approx(r1["weights"], rel=1e-12)


def test_teacher_under_torchrun_from_a_cold_cache(tmp_path):  # type: ignore[no-untyped-def]
    """Two ranks and nothing cached: rank 0 builds the demo corpus, tokenizer, teacher and student
    while rank 1 waits, then rank 1 finds them: one teacher folder and one printout result."""
    _, _, corpus = own_models(tmp_path)
    cfg = demo_cfg(
        tmp_path, corpus, data_dir=str(tmp_path / "data"), teacher_steps=4, out=str(tmp_path / "runs" / "teacher")
    )
    res = _torchrun(tmp_path, cfg, command="teacher")
    assert res.stdout.count("teacher: ") == 1
    teachers = [p.parent for p in (tmp_path / "data" / "teachers").rglob("demo_meta.json")]
    assert len(teachers) == 1 and (teachers[0] / "model.safetensors").is_file()
    assert f"teacher: {teachers[0]}" in res.stdout


@pytest.mark.slow
def test_teacher_cache_under_torchrun_equals_one_process_and_ddp_distills_from_it(tmp):  # type: ignore[no-untyped-def]
    import numpy as np

    from ddk.data import TeacherCache
    from ddk.recipes.teacher_cache import teacher_cache

    one = teacher_cache(_config(tmp, "tcache-1", top_k=6))
    _torchrun(tmp, _config(tmp, "tcache-2", top_k=6), command="teacher-cache")  # shards dealt to 2 ranks
    two = TeacherCache(tmp / "runs" / "tcache-2", verify=True)
    assert two.manifest["teacher_ce"] == one.manifest["teacher_ce"]
    for split in ("train", "validation"):
        for a, b in zip(one.arrays(split), two.arrays(split)):
            assert all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)
    kw = dict(teacher="", data=(), teacher_cache=str(one.root))
    real.distill(_config(tmp, "cached-1", **kw))
    _torchrun(tmp, _config(tmp, "cached-2", **kw))
    _assert_same_run(tmp / "runs" / "cached-1", tmp / "runs" / "cached-2")
