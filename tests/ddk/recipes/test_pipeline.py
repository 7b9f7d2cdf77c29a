"""The whole real-data pipeline on a tiny user corpus: corpus -> tokenizer -> teacher -> 5 methods."""

from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import ddk.recipes.real as real  # noqa: E402
from ddk.cli import main  # noqa: E402
from ddk.recipes.config import METHODS, make_config  # noqa: E402

WORDS = {
    "prose": "the a lady house walked morning letter sister said very much would could kind gentleman".split(),
    "code": "def return if else for in range self import class None True False x y z print len".split(),
    "german": "der die das und nicht ist ein eine mit auf den zu von sich es wir ihr".split(),
}


def _corpus(tmp_path):  # type: ignore[no-untyped-def]
    rng = random.Random(0)
    rows = []
    for domain, words in WORDS.items():
        for k in range(16):  # 16 units of ~500 chars per domain
            text = "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(8))
            rows.append({"domain": domain, "source": f"{domain}-{k}", "text": text})
    p = tmp_path / "user.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _cfg(tmp_path, **kw):  # type: ignore[no-untyped-def]
    base = dict(data_dir=str(tmp_path / "data"), domains=(), user_jsonl=(str(_corpus(tmp_path)),), max_chars=20000,
                validation_fraction=0.25, offline=True, vocab_size=320, seq_len=16, val_seqs=4, eval_batch_size=4,
                teacher_hidden=32, teacher_layers=1, teacher_heads=2, teacher_intermediate=64, teacher_steps=8,
                teacher_batch_size=4, student_hidden=16, student_layers=1, student_heads=2, student_intermediate=32,
                steps=6, batch_size=4, warmup_steps=2, interval=3, log_every=2, checkpoint_every=3,
                out=str(tmp_path / "runs" / "ddk"), progress=False, device="cpu")  # bit-exact checks: CPU also on GPU machines
    base.update(kw)
    return make_config(**base)


def test_pipeline_end_to_end_all_methods_and_resume(tmp_path, monkeypatch, capsys):
    cfg = _cfg(tmp_path)
    data = real.prepare_data(cfg)
    assert data.names == ["code", "german", "prose"]
    assert all(t.shape[1] == cfg.seq_len + 1 for t in data.train + data.validation)
    teacher, teacher_ce, tdir = real.train_teacher(cfg, data)
    assert (tdir / "teacher_meta.json").is_file() and teacher_ce.shape == (3,)

    # the teacher is cached by config hash: no second training
    monkeypatch.setattr(real, "_new_model", lambda *a, **k: pytest.fail("teacher retrained"))
    _, ce2, tdir2 = real.train_teacher(cfg, real.prepare_data(cfg))
    assert tdir2 == tdir and ce2.tolist() == teacher_ce.tolist()
    monkeypatch.undo()

    summaries = {}
    for m in METHODS:
        c = _cfg(tmp_path, method=m, out=str(tmp_path / "runs" / m))
        summaries[m] = real.distill(c, data, teacher, teacher_ce)
        run = tmp_path / "runs" / m
        for f in ("config.json", "metrics.jsonl", "controller.jsonl", "checkpoint-6.pt", "summary.json", "student/config.json",
                  "weights.png", "gaps.png"):
            assert (run / f).is_file(), f"{m}: missing {f}"
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in metrics] == [2, 3, 4, 6]
        evals = [r for r in metrics if "student_ce" in r]
        assert [r["step"] for r in evals] == [3, 6] and len(evals[0]["teacher_ce"]) == 3 and len(evals[0]["ratio"]) == 3
        assert len(metrics[0]["weights"]) == 3
    assert len({s["tokens"] for s in summaries.values()}) == 1  # equal token budget
    assert summaries["kd"]["final_weights"] == pytest.approx([1 / 3] * 3)
    assert summaries["ddk"]["final_weights"] != pytest.approx([1 / 3] * 3)
    assert "mean" in capsys.readouterr().out  # the summary table

    # crash after the step-3 checkpoint, then resume: same result as the uninterrupted run
    calls = {"n": 0}
    orig = real.kd_loss

    def flaky(*a, **k):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated crash")
        return orig(*a, **k)

    crash_cfg = _cfg(tmp_path, out=str(tmp_path / "runs" / "crash"))
    monkeypatch.setattr(real, "kd_loss", flaky)
    with pytest.raises(KeyboardInterrupt):
        real.distill(crash_cfg, data, teacher, teacher_ce)
    monkeypatch.undo()
    resumed = real.distill(crash_cfg, data, teacher, teacher_ce)
    assert resumed["student_ce"] == pytest.approx(summaries["ddk"]["student_ce"], rel=1e-5)
    assert resumed["final_weights"] == pytest.approx(summaries["ddk"]["final_weights"], rel=1e-6)
    steps = [json.loads(line)["step"] for line in (tmp_path / "runs" / "crash" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 3, 4, 6]

    # evaluate a finished run
    res = real.evaluate(tmp_path / "runs" / "ddk")
    assert res["student_ce"] == pytest.approx(summaries["ddk"]["student_ce"], rel=1e-5)


def test_config_unknown_yaml_key_is_an_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("steps: 5\nstepz: 6\n")
    with pytest.raises(ValueError, match=r"got unknown \['stepz'\]"):
        make_config([p])
    p.write_text("steps: five\n")
    with pytest.raises(ValueError, match="RecipeConfig: steps must be of type int; got 'five'"):
        make_config([p])


def test_config_precedence_defaults_yaml_flags(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("steps: 5\nlr: 0.01\n")
    from ddk.cli import build_parser
    from ddk.recipes.config import config_from_args

    args = build_parser().parse_args(["distill", "--config", str(p), "--lr", "0.5", "--method", "kd", "--no-progress"])
    cfg = config_from_args(args)
    assert (cfg.steps, cfg.lr, cfg.method, cfg.progress, cfg.batch_size) == (5, 0.5, "kd", False, 16)
    with pytest.raises(ValueError, match="RecipeConfig: method must be one of"):
        make_config(method="dkd")


def test_cli_data_build_user_folder(tmp_path, capsys):
    src = tmp_path / "mine"
    src.mkdir()
    for i in range(5):
        (src / f"{i}.txt").write_text(f"file {i}\n" * 20)
    assert main(["data", "build", "--no-builtin", "--user-folder", f"mine={src}", "--out", str(tmp_path / "c"),
                 "--validation-fraction", "0.3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["domains"]) == {"mine"} and out["skipped"] == {}
