"""``ddk distill``'s checkpoints: ``checkpoint-<step>/``, the newest ``keep_checkpoints`` kept,
``--resume`` from the newest; in one process on the tiny models and corpus of ``recipe_cases``. The SIGKILL and truncated-file cases are in ``test_kill_resume``; many
processes in ``test_distributed_distill``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import torch
from recipe_cases import crash_in_step, own_cfg
from safetensors.torch import load_file

import ddk.recipes.distill as real
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
