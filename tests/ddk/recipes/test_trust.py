"""A run folder you can trust (issue 15): one test per finding, on the tiny models of ``recipe_cases``.

1 no code runs from a crafted checkpoint; 2 corruption is detected (and a bad newest checkpoint
falls back); 3 corpus cache keys follow contents, a partial corpus is retried; 4 no path leaves its
folder, configs read from a run folder are validated; 5 one writer per run folder; 6 a torn log line
never blocks a resume, --no-resume moves the old run aside; 7 a stale student is never evaluated;
8 DDKTrainer's newest checkpoint is always resumable; 9 states are validated whole; 10 SIGTERM
writes a checkpoint and exits 75; 11 loss boundary; 12 errors instead of tracebacks. Plus a crash
during every write of a checkpoint, then a bit-identical resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import torch
from recipe_cases import crash_in_step, own_cfg
from safetensors.torch import load_file

import ddk.engine.loop as engine_loop
import ddk.engine.step as engine_step
import ddk.recipes.distill as real
from ddk._io import file_sha256
from ddk.engine import checkpoint as ckpt
from ddk.engine.preempt import EXIT_PREEMPTED, Preempted
from ddk.recipes.cli import main

ROOT = Path(__file__).resolve().parents[3]


def _cfg(tmp: Path, name: str, **kw):  # type: ignore[no-untyped-def]
    return own_cfg(tmp, out=str(tmp / "runs" / name), **kw)


def _student(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "student" / "model.safetensors"))


def _same_student(a: Path, b: Path) -> None:
    sa, sb = _student(a), _student(b)
    assert sa.keys() == sb.keys() and [k for k in sa if not torch.equal(sa[k], sb[k])] == []


def _flip_bit(path: Path, offset: int = -3) -> None:
    blob = bytearray(path.read_bytes())
    blob[offset] ^= 0x10
    path.write_bytes(bytes(blob))


def _env() -> dict[str, str]:
    return dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
    )


class _Payload:
    """Unpickling this creates ``marker``: a stand-in for any command an attacker would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.marker), "w"))


# ---------------------------------------------------------------------------- 1
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


# ---------------------------------------------------------------------------- 2
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


def test_demo_model_cache_with_flipped_weights_or_garbage_meta_is_rebuilt(tmp_path, capsys):
    from hf_models import make_model, make_tokenizer

    from ddk.recipes.demo import _cached_model, _save_model

    folder = tmp_path / "teacher"
    _save_model(make_model("llama", 300), make_tokenizer(tmp_path / "tok"), folder, {"train_seconds": 1.0})
    assert _cached_model(folder, "teacher") is not None
    _flip_bit(folder / "model.safetensors")
    assert _cached_model(folder, "teacher") is None
    assert "model.safetensors is missing or changed since it was saved" in capsys.readouterr().err
    (folder / "demo_meta.json").write_text("{garbage")
    assert _cached_model(folder, "teacher") is None
    assert "its demo_meta.json is unreadable (JSONDecodeError" in capsys.readouterr().err


# ---------------------------------------------------------------------------- 3
def test_corpus_key_follows_file_contents_and_a_partial_build_is_retried(tmp_path, capsys):
    from ddk.recipes.corpus import CorpusConfig, build_corpus

    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"domain": "mine", "text": f"text {i}\n" * 20}) + "\n" for i in range(8)))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("hello\n" * 50)
    (folder / "b.txt").write_text("world\n" * 50)
    base = dict(
        domains=("math",),
        user_jsonl=(str(data),),
        user_folders={"fold": str(folder)},
        max_chars=None,
        validation_fraction=0.3,
        cache_dir=str(tmp_path / "debs"),
        offline=True,
    )
    key = CorpusConfig(**base).key()
    assert CorpusConfig(**{**base, "offline": False}).key() == key
    with data.open("a") as f:  # the same path, other contents
        f.write(json.dumps({"domain": "mine", "text": "more\n" * 20}) + "\n")
    assert CorpusConfig(**base).key() != key
    key = CorpusConfig(**base).key()
    (folder / "a.txt").write_text("changed\n" * 50)
    assert CorpusConfig(**base).key() != key

    out = tmp_path / "corpus"
    man = build_corpus(out, CorpusConfig(**base), progress=False)  # offline, empty package cache: math skipped
    assert "math" in man["skipped"] and man["complete"] is False
    capsys.readouterr()
    build_corpus(out, CorpusConfig(**base), progress=False)
    assert "its last build skipped ['math']; trying them again" in capsys.readouterr().err


# ---------------------------------------------------------------------------- 4
@pytest.mark.parametrize("domain", ["../../x", "{tmp}/abs", "..", ".hidden"])
def test_data_build_rejects_domain_names_that_leave_the_folder(tmp_path, capsys, domain):
    domain = domain.format(tmp=tmp_path)
    data = tmp_path / "evil.jsonl"
    data.write_text("".join(json.dumps({"domain": domain, "id": f"u{i}", "text": "a\n" * 40}) + "\n" for i in range(6)))
    out = tmp_path / "a" / "b" / "corpus"
    assert (
        main(
            [
                "data",
                "build",
                "--no-builtin",
                "--user-jsonl",
                str(data),
                "--out",
                str(out),
                "--validation-fraction",
                "0.4",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert f"jsonl_units: the domain of record 0 of {data} must " in err and repr(domain) in err
    assert sorted(p.name for p in tmp_path.rglob("*.jsonl")) == ["evil.jsonl"]  # nothing written, inside or out
    with pytest.raises(ValueError, match=r"build_corpus: user_folders names must not"):
        from ddk.recipes.corpus import CorpusConfig, build_corpus

        build_corpus(out, CorpusConfig(domains=(), user_folders={"../up": str(tmp_path)}))


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


# ---------------------------------------------------------------------------- 5
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


# ---------------------------------------------------------------------------- 6
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


# ---------------------------------------------------------------------------- 7
def test_stale_student_is_moved_aside_and_evaluate_refuses_a_foreign_one(tmp_path, monkeypatch):
    kd = _cfg(tmp_path, "run", method="kd", steps=2)
    real.distill(kd)
    run = Path(kd.out)
    crash_in_step(monkeypatch, _cfg(tmp_path, "run", method="cpt", steps=2, resume=False), 1)
    assert not (run / "student").exists()  # the kd student went aside with the rest of that run
    with pytest.raises(ValueError, match=r"evaluate: run_dir must be a finished distill run"):
        real.evaluate(run)
    old = next(p for p in run.iterdir() if p.name.startswith("replaced-"))
    shutil.copytree(old / "student", run / "student")  # a student of another config, put back by hand
    with pytest.raises(
        ValueError,
        match=r"evaluate: the student/ of .* must be the one trained with its config\.json "
        r"\(config digest [0-9a-f]{16}\); got a student of config digest '[0-9a-f]{16}'",
    ):
        real.evaluate(run)


# ---------------------------------------------------------------------------- 8
def test_ddktrainer_newest_checkpoint_holds_the_ddk_state_before_rotation(tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    from hf_models import make_model
    from transformers import TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    from ddk import DDKController, DiscrepancyEstimator, FactorSmoother, MixtureSampler
    from ddk.integrations.transformers import DDK_STATE_NAME, DDKCallback, DDKTrainer

    g = torch.Generator().manual_seed(0)
    train = [
        {"input_ids": torch.randint(30 * d, 30 * d + 30, (12,), generator=g), "domain_id": d}
        for d, n in enumerate((8, 6))
        for _ in range(n)
    ]
    val = {name: [{"input_ids": torch.randint(0, 60, (2, 12), generator=g)}] for name in ("a", "b")}

    def trainer(max_steps: int) -> DDKTrainer:
        ctrl = DDKController(
            DiscrepancyEstimator(val, progress=False),
            FactorSmoother(2),
            MixtureSampler([8, 6], 4, seed=3, domain_names=("a", "b")),
            interval=2,
        )
        args = TrainingArguments(
            output_dir=str(tmp_path),
            max_steps=max_steps,
            per_device_train_batch_size=4,
            save_strategy="steps",
            save_steps=1,
            save_total_limit=1,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            dataloader_num_workers=0,
            logging_steps=100,
        )
        return DDKTrainer(
            model=make_model("llama", 100, seed=2),
            args=args,
            train_dataset=train,
            teacher=make_model("llama", 100, hidden=48, layers=2, seed=1),
            controller=ctrl,
        )

    calls = {"n": 0}
    orig = DDKCallback.on_save

    def crash_after_rotation(self, *a, **k):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:  # checkpoint-2 saved and checkpoint-1 rotated away
            raise KeyboardInterrupt("killed between the rotation and on_save")
        return orig(self, *a, **k)

    monkeypatch.setattr(DDKCallback, "on_save", crash_after_rotation)
    with pytest.raises(KeyboardInterrupt):
        trainer(3).train()
    monkeypatch.undo()
    last = get_last_checkpoint(str(tmp_path))
    assert Path(last).name == "checkpoint-2" and (Path(last) / DDK_STATE_NAME).is_file()
    trainer(3).train(resume_from_checkpoint=True)  # resumable
    assert (tmp_path / "checkpoint-3" / DDK_STATE_NAME).is_file()


# ---------------------------------------------------------------------------- 9
def test_states_are_validated_whole_before_anything_changes():
    from ddk import DDKController, DiscrepancyEstimator, FactorSmoother, MixtureSampler

    sampler = MixtureSampler([10, 10, 10], 6, seed=0)
    for _ in range(4):
        sampler.next_global_batch()
    good = sampler.state_dict()
    for field, value, message in [
        ("carry", [1e6, -1e6, 0.0], r"carry must be in \[-6, 6\] per domain"),
        ("carry", ["0", "0", "0"], r"carry must hold numbers"),
        ("passes", [2**62, 0, 0], r"passes and positions must account for batches_yielded \* global_batch_size = 24"),
    ]:
        with pytest.raises(ValueError, match=rf"MixtureSampler.load_state_dict: {message}"):
            MixtureSampler([10, 10, 10], 6, seed=0).load_state_dict({**good, field: value})

    def controller() -> DDKController:
        batch = [{"input_ids": torch.zeros(1, 4, dtype=torch.long)}]
        est = DiscrepancyEstimator(
            {n: batch for n in ("domain0", "domain1", "domain2")}, progress=False, teacher_ce=[1.0, 2.0, 3.0]
        )
        return DDKController(est, FactorSmoother(3), MixtureSampler([10, 10, 10], 6, seed=0), interval=2)

    src = controller()
    src.sampler.set_weights([0.2, 0.3, 0.5])
    src.smoother.load_state_dict(
        {
            "num_domains": 3,
            "alpha": 0.5,
            "mode": "ddk",
            "init": "discrepancy",
            "weights": [0.2, 0.3, 0.5],
            "history": [{"kind": "init", "ratio": [1.0] * 3, "weights": [0.2, 0.3, 0.5]}],
        }
    )
    src._started = True
    for _ in range(4):
        src.sampler.next_global_batch()
    state = src.state_dict()
    state["controller"].update(last_update_step=4, num_updates=2)
    controller().load_state_dict(state)  # the genuine state loads
    bad_sampler = {
        **state,
        "estimator": {**state["estimator"], "teacher_ce": [9.0, 9.0, 9.0]},
        "sampler": {**state["sampler"], "carry": [1e6, -1e6, 0.0]},
    }
    dst = controller()
    before = (dst.estimator.teacher_ce.tolist(), dst.smoother.initialized, dst.sampler.state_dict())
    with pytest.raises(ValueError, match=r"DDKController.load_state_dict \(sampler\): carry must be in"):
        dst.load_state_dict(bad_sampler)
    assert (dst.estimator.teacher_ce.tolist(), dst.smoother.initialized, dst.sampler.state_dict()) == before
    for part, patch, message in [
        ("controller", {"last_update_step": 10**9}, r"last_update_step'\] must be an int in \[0, 4\]"),
        ("controller", {"num_updates": -1}, r"num_updates'\] must be an int in \[0, last_update_step=4\]"),
        (
            "smoother",
            {"weights": [0.0, 0.0, 0.0]},
            r"\(smoother\): state\['weights'\] must be 3 finite weights >= 0 summing to 1",
        ),
        ("estimator", {"online": [[1.0, -5.0, 0.0, 0.0]] * 3}, r"\(estimator\): state\['online'\] must be 3x4"),
    ]:
        with pytest.raises(ValueError, match=rf"DDKController.load_state_dict.*{message}"):
            controller().load_state_dict({**state, part: {**state[part], **patch}})


# ---------------------------------------------------------------------------- 10
def test_sigterm_finishes_the_step_writes_a_checkpoint_and_resumes_bit_identically(tmp_path, monkeypatch, capsys):
    ref = _cfg(tmp_path, "ref", checkpoint_every=100)
    real.distill(ref)
    cfg = _cfg(tmp_path, "run", checkpoint_every=100)
    calls = {"n": 0}
    orig = engine_step.causal_lm_kd_loss

    def preempted(*a, **k):  # type: ignore[no-untyped-def]
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 3:  # the scheduler's SIGTERM arrives inside step 3
                os.kill(os.getpid(), signal.SIGTERM)
        return orig(*a, **k)

    monkeypatch.setattr(engine_step, "causal_lm_kd_loss", preempted)
    with pytest.raises(
        Preempted,
        match=r"stopped by SIGTERM after step 3; wrote .*checkpoint-3\. Rerun the same "
        r"command to resume from it\.",
    ):
        real.distill(cfg)
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored
    run = Path(cfg.out)
    assert [p.name for _, p in ckpt.checkpoints(run)] == ["checkpoint-3"] and not (run / "summary.json").exists()
    real.distill(cfg)
    _same_student(Path(ref.out), run)


def test_cli_distill_exits_75_on_sigterm_with_its_checkpoint(tmp_path):
    yaml = pytest.importorskip("yaml")
    cfg = _cfg(tmp_path, "run", steps=200, checkpoint_every=1000, log_every=1, threads=1)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    cmd = [sys.executable, "-m", "ddk.recipes.cli", "distill", "--config", str(tmp_path / "c.yaml")]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics, deadline = Path(cfg.out) / "metrics.jsonl", time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and metrics.read_text().count("\n") >= 2:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.01)
    err = proc.communicate(timeout=60)[1].decode()
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    (path,) = [p for _, p in ckpt.checkpoints(Path(cfg.out))]
    step = ckpt.load_checkpoint(path)["step"]
    assert 2 <= step < 200 and f"ddk distill: stopped by SIGTERM after step {step}" in err


# ---------------------------------------------------------------------------- 11
def test_loss_normalizer_must_be_a_positive_finite_scalar():
    from ddk import kd_loss

    zs, zt, y = torch.randn(3, 7), torch.randn(3, 7), torch.tensor([1, 2, 3])
    for value, message in [
        (torch.tensor(0.0), r"must be > 0 .*; got 0\.0\."),
        (torch.tensor(-4.0), r"must be > 0 .*; got -4\.0\."),
        (torch.tensor([1.0, 2.0]), r"must be a scalar .*; got a tensor of shape \(2,\)\."),
        (float("inf"), r"must be finite .*; got inf\."),
        (torch.tensor(float("nan")), r"must be finite .*; got nan\."),
    ]:
        with pytest.raises(ValueError, match=r"kd_loss: normalizer " + message):
            kd_loss(zs, zt, y, normalizer=value)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("masked", ["student", "teacher", "both"])
def test_chunked_kd_of_minus_inf_logits_is_the_references(divergence, masked):
    from ddk import kd_loss
    from ddk_kernels.chunked import kd_chunked_forward
    from ddk_kernels.types import KDConfig

    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(5, 37, generator=g) * 10, torch.randn(5, 37, generator=g) * 10
    if masked in ("student", "both"):
        zs[0, 5] = zs[2, 7] = float("-inf")
    if masked in ("teacher", "both"):
        zt[0, 5] = zt[1, 9] = float("-inf")
    y = torch.tensor([1, 2, 3, 4, 0])
    for temperature in (1.0, 2.0):
        ref = kd_loss(zs.double(), zt.double(), y, divergence=divergence, temperature=temperature, backend="reference")
        x = zs.clone().requires_grad_()
        out = kd_loss(x, zt, y, divergence=divergence, temperature=temperature, backend="chunked")
        cfg = KDConfig(temperature=temperature, divergence=divergence)
        tiled = kd_chunked_forward(zs, zt, y, cfg, block_elems=8)[1].sum()  # vocabulary tiles of 2 columns
        for got in (out.kd_sum, tiled):
            if torch.isinf(ref.kd_sum):  # KL(a || b) is infinite where b = 0 < a: the same inf, never NaN
                assert got == ref.kd_sum
            else:
                assert torch.isclose(got.double(), ref.kd_sum, rtol=1e-5), (got, ref.kd_sum)
        if torch.isfinite(out.loss):
            out.loss.backward()
            assert torch.isfinite(x.grad).all()


# ---------------------------------------------------------------------------- 12
def test_unwritable_out_and_torn_model_files_are_errors_not_tracebacks(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cfg = own_cfg(tmp_path, out=str(blocker / "run"))
    monkeypatch.setattr(
        engine_loop, "load_models", lambda *a: pytest.fail("models loaded before the run folder was checked")
    )
    with pytest.raises(
        ValueError,
        match=r"distill: out must be a folder this process can write; got .*a-file/run' "
        r"\((NotADirectoryError|FileExistsError)",
    ):
        real.distill(cfg)
    monkeypatch.undo()

    bad = tmp_path / "torn-student"
    shutil.copytree(own_cfg(tmp_path).student, bad)
    blob = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    cfg = _cfg(tmp_path, "torn", student=str(bad))
    with pytest.raises(
        ValueError,
        match=rf"distill: student must be a transformers causal LM folder or hub name; "
        rf"loading '{bad}' failed: ",
    ):
        real.distill(cfg)


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
