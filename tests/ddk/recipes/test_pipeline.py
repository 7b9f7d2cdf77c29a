"""``ddk distill --teacher --student --data`` end to end on tiny saved models of three families."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")

import torch
from recipe_cases import demo_cfg, own_cfg, own_models
from transformers import AutoModelForCausalLM, AutoTokenizer

import ddk.engine.step as engine_step
import ddk.recipes.distill as distill_mod
from ddk.engine import METHODS
from ddk.engine.checkpoint import load_checkpoint
from ddk.recipes.cli import main
from ddk.recipes.config import make_config


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_cli_distill_own_models_end_to_end_and_the_student_reloads(tmp_path: Path, family: str, capsys) -> None:  # type: ignore[no-untyped-def]
    teacher, student, corpus = own_models(tmp_path, family)
    out = tmp_path / "run"
    argv = [
        "distill",
        "--teacher",
        str(teacher),
        "--student",
        str(student),
        "--data",
        str(corpus),
        "--out",
        str(out),
        "--seq-len",
        "16",
        "--val-samples",
        "4",
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--interval",
        "2",
        "--data-dir",
        str(tmp_path / "cache"),
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    assert "mean" in capsys.readouterr().out  # the per-domain table
    for f in (
        "config.json",
        "metrics.jsonl",
        "controller.jsonl",
        "checkpoint-4/manifest.json",
        "summary.json",
        "weights.png",
    ):
        assert (out / f).is_file(), f
    summary = json.loads((out / "summary.json").read_text())
    assert summary["domains"] == ["code", "math", "prose"]
    reloaded = AutoModelForCausalLM.from_pretrained(str(out / "student"))
    tok = AutoTokenizer.from_pretrained(str(out / "student"))
    assert type(reloaded).__name__ == type(AutoModelForCausalLM.from_pretrained(str(student))).__name__
    assert len(tok) == len(AutoTokenizer.from_pretrained(str(student)))
    final = load_checkpoint(out / "checkpoint-4")["student"]
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, final[k]), k  # the saved student is the trained one
    if family in ("qwen2", "gpt2"):  # tied embeddings stay tied: one tensor, one gradient
        assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight


def test_distill_all_methods_equal_budget_and_crash_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:  # type: ignore[no-untyped-def]
    summaries = {}
    for m in METHODS:
        cfg = own_cfg(tmp_path, method=m, out=str(tmp_path / "runs" / m))
        summaries[m] = distill_mod.distill(cfg)
        run = tmp_path / "runs" / m
        for f in (
            "config.json",
            "metrics.jsonl",
            "controller.jsonl",
            "checkpoint-6/manifest.json",
            "summary.json",
            "student/config.json",
            "student/tokenizer.json",
            "weights.png",
            "gaps.png",
        ):
            assert (run / f).is_file(), f"{m}: missing {f}"
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in metrics] == [2, 3, 4, 6]
        evals = [r for r in metrics if "student_ce" in r]
        assert [r["step"] for r in evals] == [3, 6] and len(evals[0]["ratio"]) == 3
    assert len({s["tokens"] for s in summaries.values()}) == 1  # equal token budget
    assert summaries["kd"]["final_weights"] == pytest.approx([1 / 3] * 3)
    assert summaries["ddk"]["final_weights"] != pytest.approx([1 / 3] * 3)
    assert summaries["cpt"]["teacher_ce"] == summaries["kd"]["teacher_ce"]  # cpt measures the gap to the same teacher
    # kd-doremi: uniform start, then DoReMi's step on each logged ratio (float64 oracle)
    recs = [
        json.loads(line) for line in (tmp_path / "runs" / "kd-doremi" / "controller.jsonl").read_text().splitlines()
    ]
    assert [r["event"] for r in recs] == ["init", "update", "update"]
    assert recs[0]["weights"] == pytest.approx([1 / 3] * 3, rel=1e-15)
    for prev, rec in zip(recs, recs[1:]):
        a = np.array(prev["weights"]) * np.exp(np.maximum(np.log(rec["ratio"]), 0.0))
        np.testing.assert_allclose(rec["weights"], 0.999 * a / a.sum() + 1e-3 / 3, rtol=1e-12)
    assert summaries["kd-doremi"]["final_weights"] == pytest.approx(recs[-1]["weights"])
    assert "mean" in capsys.readouterr().out

    # crash after the step-3 checkpoint, then resume: the same result as the uninterrupted run
    calls = {"n": 0}
    orig = engine_step.causal_lm_kd_loss

    def flaky(*a, **k):  # type: ignore[no-untyped-def]
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 4:
                raise KeyboardInterrupt("simulated crash")
        return orig(*a, **k)

    crash = own_cfg(tmp_path, out=str(tmp_path / "runs" / "crash"))
    monkeypatch.setattr(engine_step, "causal_lm_kd_loss", flaky)
    with pytest.raises(KeyboardInterrupt):
        distill_mod.distill(crash)
    monkeypatch.undo()
    resumed = distill_mod.distill(crash)
    assert resumed["student_ce"] == summaries["ddk"]["student_ce"]
    assert resumed["final_weights"] == summaries["ddk"]["final_weights"]
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "runs" / "crash" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [2, 3, 4, 6]

    res = distill_mod.evaluate(tmp_path / "runs" / "ddk")
    assert res["student_ce"] == pytest.approx(summaries["ddk"]["student_ce"], rel=1e-6)


def test_distill_grad_accum_and_logits_loss_match_the_default(tmp_path: Path) -> None:
    ref = distill_mod.distill(own_cfg(tmp_path, method="kd", out=str(tmp_path / "ref")))
    accum = distill_mod.distill(own_cfg(tmp_path, method="kd", grad_accum=2, out=str(tmp_path / "accum")))
    logits = distill_mod.distill(own_cfg(tmp_path, method="kd", loss="logits", out=str(tmp_path / "logits")))
    assert accum["student_ce"] == pytest.approx(ref["student_ce"], rel=1e-4)
    assert logits["student_ce"] == pytest.approx(ref["student_ce"], rel=1e-4)


def test_distill_token_budget_sets_the_steps(tmp_path: Path) -> None:
    cfg = own_cfg(tmp_path, tokens=3 * 4 * 16 - 5)
    assert cfg.total_steps == 3


@pytest.mark.e2e
def test_demo_teacher_pretraining_preempted_then_resumed_is_bit_identical(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import os
    import signal

    from safetensors.torch import load_file

    import ddk.recipes.demo as demo
    from ddk.engine.preempt import Preempted

    _, _, corpus = own_models(tmp_path)
    ref = demo.demo_config(demo_cfg(tmp_path, corpus, data_dir=str(tmp_path / "ref"), student_start="random"))
    cfg = demo_cfg(tmp_path, corpus, data_dir=str(tmp_path / "cut"), student_start="random")  # count teacher steps only
    calls = {"n": 0}
    orig = demo.causal_lm_kd_loss

    def sigterm_at_step_5(*a, **k):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler records it; step 5 finishes and checkpoints
        return orig(*a, **k)

    monkeypatch.setattr(demo, "causal_lm_kd_loss", sigterm_at_step_5)
    with pytest.raises(Preempted, match="after step 5"):
        demo.demo_config(cfg)
    monkeypatch.undo()
    work = [p for p in (tmp_path / "cut" / "teachers").iterdir() if p.name.endswith(".training")]
    assert len(work) == 1 and sorted(p.name for p in work[0].glob("checkpoint-*")) == ["checkpoint-5"]
    counted = {"n": 0}

    def counting(*a, **k):  # type: ignore[no-untyped-def]
        counted["n"] += 1
        return orig(*a, **k)

    monkeypatch.setattr(demo, "causal_lm_kd_loss", counting)
    resumed = demo.demo_config(cfg)
    monkeypatch.undo()
    assert counted["n"] == 8 - 5  # resumed after step 5, not restarted
    a = load_file(str(Path(ref.teacher) / "model.safetensors"))
    b = load_file(str(Path(resumed.teacher) / "model.safetensors"))
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert not work[0].exists()  # the working folder is removed once the teacher is saved


def test_demo_path_builds_teacher_and_student_then_distills_through_the_same_path(tmp_path: Path) -> None:
    from ddk.recipes.demo import demo_config, run_demo

    _, _, corpus = own_models(tmp_path)
    cfg = demo_cfg(tmp_path, corpus, checkpoint_every=2)
    assert cfg.uses_demo
    filled = demo_config(cfg)
    assert not filled.uses_demo and Path(filled.teacher, "config.json").is_file()
    assert json.loads(Path(filled.teacher, "demo_meta.json").read_text())["final_loss"] is not None
    assert demo_config(cfg) == filled  # cached: the same folders, no retraining
    summary = run_demo(cfg)
    assert summary["domains"] == ["code", "math", "prose"]
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "runs" / "demo" / "student")) is not None


def test_config_unknown_yaml_key_is_an_error(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("steps: 5\nstepz: 6\n")
    with pytest.raises(ValueError, match=r"got unknown \['stepz'\]"):
        make_config([p])
    p.write_text("steps: five\n")
    with pytest.raises(ValueError, match="RecipeConfig: steps must be of type int; got 'five'"):
        make_config([p])


def test_config_precedence_defaults_yaml_flags(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("steps: 5\nlr: 0.01\n")
    from ddk.recipes.cli import build_parser
    from ddk.recipes.config import config_from_args

    args = build_parser().parse_args(["distill", "--config", str(p), "--lr", "0.5", "--method", "kd", "--no-progress"])
    cfg = config_from_args(args)
    assert (cfg.steps, cfg.lr, cfg.method, cfg.progress, cfg.batch_size) == (5, 0.5, "kd", False, 16)
    with pytest.raises(ValueError, match="RecipeConfig: method must be one of"):
        make_config(method="dkd")


def test_config_own_models_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="teacher, student and data must be given together"):
        make_config(student="s")
    with pytest.raises(ValueError, match="teacher must be given for method 'ddk'"):
        make_config(student="s", data=("d.jsonl",))
    make_config(student="s", data=("d.jsonl",), method="cpt")  # cpt needs no teacher
    with pytest.raises(ValueError, match="batch_size must be a multiple of grad_accum=3"):
        make_config(batch_size=16, grad_accum=3)
    with pytest.raises(ValueError, match="loss must be one of"):
        make_config(loss="full")


def test_every_distill_flag_has_help_text() -> None:
    from ddk.recipes.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices["distill"]  # type: ignore[union-attr]
    bare = [a.dest for a in sub._actions if a.help is None or a.help.startswith("(default")]
    assert bare == [], bare


def test_cli_data_build_user_folder(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "mine"
    src.mkdir()
    for i in range(5):
        (src / f"{i}.txt").write_text(f"file {i}\n" * 20)
    assert (
        main(
            [
                "data",
                "build",
                "--no-builtin",
                "--user-folder",
                f"mine={src}",
                "--out",
                str(tmp_path / "c"),
                "--validation-fraction",
                "0.3",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert set(out["domains"]) == {"mine"} and out["skipped"] == {}


def test_distill_bf16_autocast_and_gradient_checkpointing_run(tmp_path: Path) -> None:
    ref = distill_mod.distill(own_cfg(tmp_path, method="kd", out=str(tmp_path / "ref")))
    ckpt = distill_mod.distill(own_cfg(tmp_path, method="kd", gradient_checkpointing=True, out=str(tmp_path / "gc")))
    assert ckpt["student_ce"] == pytest.approx(ref["student_ce"], rel=1e-5)  # recomputation changes nothing
    bf16 = distill_mod.distill(own_cfg(tmp_path, method="kd", dtype="bf16", out=str(tmp_path / "bf16")))
    assert bf16["student_ce"] == pytest.approx(ref["student_ce"], rel=2e-2)  # bf16 matmuls, fp32 master weights
    saved = AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16" / "student"))
    assert next(saved.parameters()).dtype == torch.float32


def test_distill_never_allocates_tokens_by_vocab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Largest single CPU allocation of a whole ``distill`` run (training steps and validation
    passes; profiler, ``profile_memory=True``): below ``N * V * 4 / 4`` bytes with the fused loss
    (its tiles are bounded by the workspace, 1 MiB here), at least ``N * V * 4`` with
    ``loss="logits"`` (so the detector can fail). V = 8192 >> H = 32."""
    from datasets import Dataset
    from hf_models import make_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from torch.profiler import ProfilerActivity, profile
    from transformers import PreTrainedTokenizerFast

    from ddk.data import pack_domains
    from ddk_kernels import fused_plan

    monkeypatch.setattr(fused_plan, "default_workspace_bytes", lambda device: 1 << 20)  # tiles of at most 1 MiB
    vocab, seq, b = 8192, 64, 4
    words = {"<eos>": 0, "<pad>": 1, **{f"w{i}": i for i in range(2, vocab)}}
    backend = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>")
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(2, vocab, (200,), generator=g)) for _ in range(16)]
    packed = pack_domains(
        Dataset.from_dict({"text": texts, "domain": ["a", "b"] * 8}), tok, seq_len=seq, val_samples=2, progress=False
    )
    nv_bytes = b * (seq - 1) * vocab * 4

    def peak(loss: str) -> int:
        cfg = make_config(
            teacher="t",
            student="s",
            data=("d",),
            method="kd",
            loss=loss,
            steps=1,
            batch_size=b,
            seq_len=seq,
            val_samples=2,
            eval_batch_size=2,
            out=str(tmp_path / loss),
            progress=False,
            device="cpu",
        )
        prepared = (make_model("llama", vocab, seed=1), make_model("llama", vocab, seed=2), tok, packed)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            distill_mod.distill(cfg, prepared=prepared)
        # AdamW's first step allocates its state for all parameters inside one event: not a tensor of the loss
        return max(e.cpu_memory_usage for e in prof.events() if not e.name.startswith("Optimizer."))

    assert peak("logits") >= nv_bytes
    fused = peak("fused")
    assert fused < nv_bytes // 4, fused
