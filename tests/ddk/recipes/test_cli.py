"""Tests of ddk/recipes/cli.py: its flags, exit statuses and the ``ddk`` commands a user runs."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from recipe_cases import child_env as _env
from recipe_cases import needs_hf
from recipe_cases import run_cfg as _cfg
from recipe_cases import user_jsonl as _user_jsonl

from ddk.engine import checkpoint as ckpt
from ddk.engine.preempt import EXIT_PREEMPTED


def test_cli_data_build_skip_bad_lines_flag(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from ddk.recipes.cli import main

    src = _user_jsonl(tmp_path / "user.jsonl")
    args = [
        "data",
        "build",
        "--no-builtin",
        "--user-jsonl",
        str(src),
        "--max-chars",
        "0",
        "--validation-fraction",
        "0.25",
    ]
    assert main([*args, "--out", str(tmp_path / "c1")]) == 2
    assert f"{src}:4:" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "c2"), "--skip-bad-lines"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped_lines"] == {str(src.resolve()): 2}


def test_recipe_flags_on_nonfinite_and_skip_bad_lines() -> None:
    from ddk.recipes.cli import build_parser
    from ddk.recipes.config import config_from_args

    args = build_parser().parse_args(["demo-real", "--on-nonfinite", "skip", "--skip-bad-lines"])
    cfg = config_from_args(args)
    assert cfg.on_nonfinite == "skip" and cfg.skip_bad_lines is True
    with pytest.raises(SystemExit):
        build_parser().parse_args(["distill", "--on-nonfinite", "ignore"])
    with pytest.raises(SystemExit):  # the demo corpus's option: not one of ddk distill's
        build_parser().parse_args(["distill", "--skip-bad-lines"])


@needs_hf
@pytest.mark.e2e
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
    assert err.count(f"after step {step}") == 1, err[-2000:]  # one line says it, not the loop's and the CLI's


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_a_signal_while_torch_is_imported_exits_75(tmp_path: Path, sig: int) -> None:
    """The ``ddk`` command sets its handlers before it imports torch (``import ddk`` is light): a
    signal in the first seconds, before any command code runs, still exits 75."""
    import ddk.recipes.cli as cli

    assert cli._EXIT_PREEMPTED == EXIT_PREEMPTED
    light = "import sys, ddk, ddk.recipes.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", light], env=_env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    child = (
        "import sys, time, ddk.recipes.cli as c\n"
        "def slow(argv):\n"
        "    print('handlers set', file=sys.stderr, flush=True)\n"
        "    time.sleep(30)  # stands for the imports of torch and transformers\n"
        "c._main = slow\n"
        "sys.exit(c.main(['backends']))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", child], env=_env(), stderr=subprocess.PIPE, cwd=tmp_path)
    assert proc.stderr is not None and proc.stderr.readline().decode().strip() == "handlers set"
    proc.send_signal(sig)
    err = proc.communicate(timeout=60)[1].decode()
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    assert f"ddk: stopped by {signal.Signals(sig).name} during start-up (nothing written)" in err


@needs_hf
@pytest.mark.e2e
@pytest.mark.slow  # minutes on 2 cores: make test-all
def test_cli_distill_2000_domains_under_a_limit_of_256_descriptors(tmp_path: Path) -> None:
    """``ddk distill`` online and ``ddk teacher-cache`` then ``ddk distill --teacher-cache`` with
    2,000 domains in a process allowed 256 open files: no descriptor per domain (a memmap per cache
    file held 2 per domain, 10 with a teacher cache)."""
    import json as _json
    import random

    resource = pytest.importorskip("resource")
    from recipe_cases import own_models

    teacher, student, _ = own_models(tmp_path)
    rng, words = random.Random(0), "the of and to in she he was that it her his had with for as you not".split()
    corpus = tmp_path / "many.jsonl"
    with corpus.open("w") as f:
        for d in range(2000):
            for _ in range(4):
                f.write(_json.dumps({"domain": f"d{d:04d}", "text": " ".join(rng.choices(words, k=12))}) + "\n")
    small = ["--seq-len", "8", "--val-samples", "1", "--eval-batch-size", "64", "--no-progress", "--device", "cpu"]
    small += ["--threads", "1", "--data-dir", str(tmp_path / "cache")]
    run = ["--student", str(student), "--steps", "2", "--batch-size", "4", "--interval", "1000"]
    run += ["--checkpoint-every", "2", "--log-every", "1"]

    def limited() -> None:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard if hard == resource.RLIM_INFINITY else min(256, hard)))

    def ddk(*argv: str) -> None:
        cmd = [sys.executable, "-m", "ddk.recipes.cli", *argv]
        res = subprocess.run(cmd, env=_env(), preexec_fn=limited, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
        assert "Too many open files" not in res.stderr

    ddk("distill", "--teacher", str(teacher), "--data", str(corpus), "--out", str(tmp_path / "online"), *run, *small)
    ddk(
        "teacher-cache",
        "--teacher",
        str(teacher),
        "--data",
        str(corpus),
        "--out",
        str(tmp_path / "tc"),
        "--top-k",
        "4",
        *small,
    )
    ddk("distill", "--teacher-cache", str(tmp_path / "tc"), "--out", str(tmp_path / "cached"), *run, *small)
    for out in ("online", "cached"):
        summary = _json.loads((tmp_path / out / "summary.json").read_text())
        assert len(summary["domains"]) == 2000 and len(summary["final_weights"]) == 2000
        assert [s for s, _ in ckpt.checkpoints(tmp_path / out)] == [2]


@needs_hf
def test_cli_distill_longer_budget_is_refused_with_the_command_that_continues_from_the_student(
    tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    import shlex

    yaml = pytest.importorskip("yaml")
    from ddk.recipes.cli import main

    cfg = _cfg(tmp_path, "run", warmup_steps=6)  # the whole run is warm-up: warned, in one line
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    base = ["distill", "--config", str(tmp_path / "c.yaml")]
    with pytest.warns(UserWarning) as warned:  # the CLI prints it as `ddk distill: warning: <message>`
        assert main(base) == 0
    assert [str(w.message) for w in warned if "warmup" in str(w.message)] == [
        "distill: warmup_steps (6) >= steps (6): the whole run is warm-up, its learning rate rises and never "
        "decays; pass a smaller --warmup-steps (e.g. 0)."
    ]
    capsys.readouterr()
    assert main([*base, "--steps", "9"]) == 2
    err = capsys.readouterr().err
    assert "must keep its budget of 6 steps to resume; got 9 steps" in err
    command = err.split("`")[1]
    run = Path(cfg.out)
    assert command == (
        f"ddk distill --config {run / 'config.json'} --student {run / 'student'} --steps 3 --warmup-steps 0 "
        f"--seed 1 --out {run}-continued"
    )
    assert json.loads((run / "summary.json").read_text())["tokens"] == 6 * 4 * 16  # the run is untouched
    # the command runs as printed: 3 more steps from the distilled student, warned of nothing
    with warnings.catch_warnings(record=True) as more_warned:
        warnings.simplefilter("always")
        assert main(shlex.split(command)[1:]) == 0
    assert not [w for w in more_warned if "warmup" in str(w.message)]
    more = json.loads(Path(f"{run}-continued", "config.json").read_text())
    assert more["student"] == str(run / "student") and more["steps"] == 3 and more["seed"] == 1
    assert json.loads(Path(f"{run}-continued", "summary.json").read_text())["tokens"] == 3 * 4 * 16
    # ... and its learning rate decays (config.json's warm-up of 6 steps would have lasted all 3)
    lrs = [json.loads(x)["lr"] for x in Path(f"{run}-continued", "metrics.jsonl").read_text().splitlines()]
    assert len(lrs) >= 2 and all(a > b for a, b in zip(lrs, lrs[1:])), lrs


@needs_hf
def test_cli_warnings_are_one_line_without_source_and_seq_len_fails_before_packing(tmp_path: Path) -> None:
    """Swapped models (the student larger) warn in one line, no Python source under it; --seq-len
    above the GPT-2 pair's 256 positions is then an error naming both limits, before any data is packed."""
    from recipe_cases import own_models

    teacher, student, corpus = own_models(tmp_path, "gpt2")
    argv = ["distill", "--teacher", str(student), "--student", str(teacher), "--data", str(corpus)]
    argv += ["--seq-len", "512", "--out", str(tmp_path / "run"), "--data-dir", str(tmp_path / "cache"), "--no-progress"]
    res = subprocess.run([sys.executable, "-m", "ddk.recipes.cli", *argv], env=_env(), capture_output=True, text=True)
    lines = [x for x in res.stderr.splitlines() if x.strip() and "it/s]" not in x]  # less transformers' bars
    assert res.returncode == 2, res.stderr
    assert (
        lines[0].startswith("ddk distill: warning: distill: the student has more parameters (") and len(lines) == 2
    ), lines
    assert lines[1].startswith("ddk distill: error: distill: --seq-len must be at most the models' position limits")
    assert (
        f"got 512, with the student '{teacher}' 256, the teacher '{student}' 256. Pass --seq-len 256 or less."
        in lines[1]
    )
    assert not (tmp_path / "cache" / "packed").exists()


@needs_hf
def test_cli_distill_a_file_without_domains_is_told_of_name_equals_file_in_flags(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from recipe_cases import own_models

    from ddk.recipes.cli import main

    teacher, student, _ = own_models(tmp_path)
    code = tmp_path / "code.jsonl"
    code.write_text("".join(json.dumps({"text": f"def f{i}(): return {i}"}) + "\n" for i in range(150)))
    argv = ["distill", "--teacher", str(teacher), "--student", str(student), "--data", str(code)]
    capsys.readouterr()  # the models' making
    assert main([*argv, "--out", str(tmp_path / "run"), "--data-dir", str(tmp_path / "cache"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 8 and err[0].startswith("ddk distill: error: ") and "got 150 bad record(s):" in err[0], err
    assert err[-2:] == [
        "  ... and 145 more",
        f"Give each file its domain with --data NAME=FILE (here: --data code={code}), or name the records' domain "
        "field with --domain-field (the records have the fields ['text']), or drop the bad records with "
        "--skip-bad-records.",
    ]
    assert "on_missing" not in "\n".join(err)


@needs_hf
def test_cli_distill_one_file_per_domain_jsonl_and_parquet_mixed_with_a_labelled_file(tmp_path: Path) -> None:
    """``--data NAME=FILE``: every record of FILE in domain NAME (no domain field in it); a plain
    file's records carry theirs. The same for --validation-data and --test-data; JSONL and Parquet."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from recipe_cases import own_models

    from ddk.recipes.cli import main

    teacher, student, corpus = own_models(tmp_path)
    recs = [json.loads(line) for line in corpus.read_text().splitlines()]
    texts = {d: [{"text": r["text"]} for r in recs if r["domain"] == d] for d in ("code", "prose", "math")}
    (tmp_path / "code.jsonl").write_text("".join(json.dumps(r) + "\n" for r in texts["code"]))
    pq.write_table(pa.Table.from_pylist(texts["prose"]), tmp_path / "prose.parquet")
    labelled = tmp_path / "math.jsonl"  # a plain file: its records name their domain
    labelled.write_text("".join(json.dumps(r) + "\n" for r in recs if r["domain"] == "math"))
    for d in ("code", "prose"):
        (tmp_path / f"{d}-test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in texts[d][:6]))
    data = [f"code={tmp_path / 'code.jsonl'}", f"prose={tmp_path / 'prose.parquet'}", str(labelled)]
    out = tmp_path / "run"
    argv = ["distill", "--teacher", str(teacher), "--student", str(student), "--data", *data, "--out", str(out)]
    argv += ["--test-data", f"code={tmp_path / 'code-test.jsonl'}", f"prose={tmp_path / 'prose-test.jsonl'}"]
    argv += ["--test-data", str(labelled)]
    argv += ["--seq-len", "16", "--val-samples", "4", "--eval-batch-size", "4", "--steps", "2", "--batch-size", "4"]
    argv += ["--interval", "2", "--data-dir", str(tmp_path / "cache"), "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["domains"] == ["code", "math", "prose"] and len(summary["test"]["gap"]) == 3
    assert json.loads((out / "config.json").read_text())["data"] == data  # absolute, as given


@needs_hf
def test_cli_distill_log_file_gets_plain_lines_and_status_lines_without_bars(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """stderr to a file: no ``\\r`` (no tqdm bar of ddk or transformers), one plain line at each
    logging step (--log-every 2, the interval ends 3 and 6, the last step) and the status lines; a
    rerun with --no-progress still says where it resumed."""
    from recipe_cases import own_models

    from ddk.recipes.cli import main

    teacher, student, corpus = own_models(tmp_path)
    out = tmp_path / "run"
    argv = ["distill", "--teacher", str(teacher), "--student", str(student), "--data", str(corpus), "--out", str(out)]
    argv += ["--seq-len", "16", "--val-samples", "4", "--eval-batch-size", "4", "--steps", "6", "--batch-size", "4"]
    argv += ["--interval", "3", "--log-every", "2", "--checkpoint-every", "3", "--data-dir", str(tmp_path / "cache")]
    argv += ["--device", "cpu", "--threads", "1"]
    log = tmp_path / "run.log"
    with log.open("w") as f:
        res = subprocess.run(
            [sys.executable, "-m", "ddk.recipes.cli", *argv], env=_env(), stdout=subprocess.PIPE, stderr=f
        )
    text = log.read_text()
    assert res.returncode == 0, text[-3000:]
    assert "\r" not in text and "it/s" not in text
    lines = text.splitlines()
    steps = [int(x.split()[3].split("/")[0]) for x in lines if x.startswith("distill ddk: step ")]
    assert steps == [2, 3, 4, 6]
    plain = r"distill ddk: step \d/6  loss [\d.]+  ce [\d.]+  kd [\d.]+  lr \S+  [\d,]+ tok/s(  gap .*)?"
    assert all(re.fullmatch(plain, x) for x in lines if x.startswith("distill ddk: step ")), lines
    at_interval = [x for x in lines if x.startswith(("distill ddk: step 3/6", "distill ddk: step 6/6"))]
    assert len(at_interval) == 2 and all(" gap " in x and " weights code " in x for x in at_interval)
    assert f"distill: ddk on 3 domains, 6 steps of 4 x 16 tokens, into {out}" in lines
    assert "distill: step 3/6: saved checkpoint-3" in lines and "distill: step 6/6: saved checkpoint-6" in lines
    assert any(x.startswith("distill: done: 6 steps in ") for x in lines)
    capsys.readouterr()
    assert main([*argv, "--no-progress"]) == 0  # the finished run: said so, nothing trained, validated again
    err = capsys.readouterr().err
    assert f"distill: {out} is finished (step 6 of 6); nothing to train" in err and "\r" not in err
    assert "resumed" not in err and "done:" not in err and "distill ddk: step" not in err
    assert "distill: nothing trained (finished before); validated again in " in err


def test_cli_teacher_prints_the_distill_command_of_the_demo_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``ddk teacher`` (the demo's options) ends with the ``ddk distill`` command that distills its
    teacher into its student on its corpus: ddk distill itself takes none of the demo's options."""
    import dataclasses
    import shlex

    import ddk.recipes.demo as demo
    from ddk.recipes.cli import build_parser, main
    from ddk.recipes.config import config_from_args

    def built(cfg):  # type: ignore[no-untyped-def]
        folder = tmp_path / "demo dir"
        return dataclasses.replace(
            cfg,
            teacher=str(folder / "teacher"),
            student=str(folder / "student"),
            tokenizer=str(folder / "tok"),
            data=(str(folder / "a" / "train.jsonl"), str(folder / "b" / "train.jsonl")),
            validation_data=(str(folder / "a" / "validation.jsonl"),),
        )

    monkeypatch.setattr(demo, "demo_config", built)
    assert main(["teacher", "--teacher-hidden", "64", "--seq-len", "32"]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("distill them: ")][0]
    argv = shlex.split(line.removeprefix("distill them: "))
    assert argv[:2] == ["ddk", "distill"]
    cfg = config_from_args(build_parser().parse_args(argv[1:]), command="distill")
    want = built(config_from_args(build_parser().parse_args(["teacher", "--seq-len", "32"]), command="teacher"))
    for k in ("teacher", "student", "tokenizer", "data", "validation_data", "seq_len"):
        assert getattr(cfg, k) == getattr(want, k), k


@needs_hf
def test_cli_evaluate_into_a_log_file_has_no_loading_bars(tmp_path: Path) -> None:
    """Like distill, ``ddk evaluate`` with stderr not a terminal prints no ``\\r`` bars of transformers."""
    from ddk.recipes.distill import distill

    cfg = _cfg(tmp_path, "run", steps=2, warmup_steps=1)
    distill(cfg)
    res = subprocess.run(
        [sys.executable, "-m", "ddk.recipes.cli", "evaluate", str(cfg.out)], env=_env(), capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "\r" not in res.stderr and "Loading weights" not in res.stderr, res.stderr[-2000:]
    assert "student CE" in res.stdout
