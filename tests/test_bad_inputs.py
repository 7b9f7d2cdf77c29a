"""The bad-input matrix (issue 6, item 3): one test per case, or per behaviour of a case.

Cases already pinned next to their module are named in the docstring of each section rather than
repeated here. Everything runs on the CPU in seconds; the recipe tests share one tiny corpus and
teacher (module fixture).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from kd_cases import small_batch

import ddk
from ddk.losses.fused import fused_linear_kd_loss
from ddk.recipes.config import load_yaml, make_config
from ddk.recipes.corpus import CorpusConfig, CorpusError, build_corpus, domain_texts, read_jsonl
from ddk.reliability import NonFiniteError, NonFiniteGuard
from ddk.sampling import MixtureSampler
from ddk.schedule import FactorSmoother

NAMES = ["web", "code", "math"]


# ---------------------------------------------------------------------------- a. NaN / inf
# ddk.reliability.NonFiniteGuard: pinned in tests/ddk/test_reliability.py.


# ---------------------------------------------------------------------------- b. vocabularies
# A teacher narrower than the student is an error in kd_loss / fused_linear_kd_loss (pinned in
# tests/ddk/losses/test_kd.py::test_kd_loss_rejects_bad_input and
# tests/ddk/losses/test_fused.py::test_fused_linear_kd_loss_bad_input_message); the recipe check
# is tested with the recipe fixture below.


def test_kd_loss_teacher_padding_rows_are_sliced() -> None:
    zs, zt, labels, dom = small_batch()
    padded = torch.cat([zt, torch.full((zt.shape[0], 5), 40.0)], dim=1)  # huge padding logits: must be ignored
    a = ddk.kd_loss(zs, zt, labels, domain_ids=dom, num_domains=3)
    b = ddk.kd_loss(zs, padded, labels, domain_ids=dom, num_domains=3)
    assert float(a.loss.detach()) == float(b.loss.detach())
    h, w = torch.randn(6, 4, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    th, tw = torch.randn(6, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    f1 = fused_linear_kd_loss(h, w, labels, teacher_hidden=th, teacher_weight=tw)
    f2 = fused_linear_kd_loss(
        h, w, labels, teacher_hidden=th, teacher_weight=torch.cat([tw, 9 * torch.ones(3, 5, dtype=torch.float64)])
    )
    assert float(f1.loss) == float(f2.loss)


# ---------------------------------------------------------------------------- c. labels out of range
# Label >= V is pinned in tests/ddk/losses/test_kd.py and test_fused.py; negative labels, a custom
# ignore_index and int32 inputs here.


@pytest.mark.parametrize("which", ["kd_loss", "fused_linear_kd_loss"])
def test_labels_negative_and_not_ignore_index_is_an_error(which: str) -> None:
    zs, zt, labels, dom = small_batch()
    bad = labels.clone()
    bad[3] = -1
    h, w = torch.randn(6, 4), torch.randn(7, 4)

    def call(lab: torch.Tensor, **kw):  # type: ignore[no-untyped-def]
        if which == "kd_loss":
            return ddk.kd_loss(zs, zt, lab, **kw)
        return fused_linear_kd_loss(h, w, lab, teacher_logits=zt, **kw)

    with pytest.raises(
        ValueError,
        match=rf"^{which}: labels must be in \[0, 7\) or equal ignore_index=-100; got -1\. "
        r"Labels come from the student's tokenizer",
    ):
        call(bad)
    ok = labels.clone()
    ok[3] = 7  # the ignore_index may lie outside [0, V) ...
    assert (
        int(call(ok.int(), ignore_index=7, domain_ids=dom.int(), num_domains=3).num_tokens) == 5
    )  # ... and int32 works
    with pytest.raises(ValueError, match=rf"^{which}: labels must be in \[0, 7\) or equal ignore_index=7; got -100\."):
        call(torch.full((6,), -100), ignore_index=7)


# ---------------------------------------------------------------------------- d. empty sequences
# Defined behaviour: zero tokens or all tokens ignored -> loss 0 (finite), zero gradient, zero
# counts; the fused all-masked case is also pinned in tests/ddk/losses/test_fused.py.


@pytest.mark.parametrize("backend", ["reference", "chunked", "cpp"])
@pytest.mark.parametrize("n", [0, 4])
def test_kd_loss_empty_or_fully_ignored_batch_is_zero_loss_zero_grad(backend: str, n: int) -> None:
    zs = torch.randn(n, 7, requires_grad=True)
    labels = torch.full((n,), -100)
    out = ddk.kd_loss(
        zs, torch.randn(n, 9), labels, domain_ids=torch.zeros(n, dtype=torch.long), num_domains=2, backend=backend
    )
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0 and int(out.num_tokens) == 0 and out.domain_tokens.tolist() == [0, 0]
    assert zs.grad is not None and float(zs.grad.abs().sum()) == 0.0
    assert NonFiniteGuard().check(1, out)  # finite: a training loop goes on


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_fused_loss_zero_tokens_is_zero_loss_zero_grad(backend: str) -> None:
    h, w = torch.randn(0, 4, requires_grad=True), torch.randn(7, 4, requires_grad=True)
    out = fused_linear_kd_loss(
        h, w, torch.zeros(0, dtype=torch.long), teacher_logits=torch.randn(0, 7), backend=backend
    )
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0 and int(out.num_tokens) == 0
    assert w.grad is None or float(w.grad.abs().sum()) == 0.0


# ---------------------------------------------------------------------------- e. empty domain / validation set
# Pinned elsewhere with the domain named: DomainPartitioner.split ("every declared domain must have
# examples; got none for ['math']", test_partitioner.py), MixtureSampler (domain_sizes >= 1 "for
# domain 'code'", test_mixture.py), DiscrepancyEstimator (an empty validation domain, and one
# whose tokens are all ignored, test_estimator.py). The recipe's own check is tested below.


# ---------------------------------------------------------------------------- f. domain exhausted mid-interval


def test_mixture_sampler_exhausted_domain_is_reused_cyclically_and_logged_once_per_wrap(
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = MixtureSampler([3, 50], 4, [0.5, 0.5], seed=1, domain_names=["tiny", "big"])
    with caplog.at_level(logging.INFO, logger="ddk.sampling.mixture"):
        batches = [s.next_global_batch() for _ in range(6)]  # 'tiny' gives 2 per batch: 12 draws = 4 passes
    tiny = np.concatenate([b[b < 3] for b in batches])
    assert np.bincount(tiny).tolist() == [4, 4, 4]  # 4 full passes, every example once per pass
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 4 and all("domain 'tiny' (3 examples) exhausted" in m for m in msgs)  # one per wrap
    assert "reusing it cyclically from pass 1 with a fresh permutation." in msgs[0]
    assert s.passes().tolist() == [4, 0]


def test_mixture_sampler_many_wraps_in_one_batch_log_one_line_and_only_on_rank0(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="ddk.sampling.mixture"):
        MixtureSampler([1, 20], 8, [0.5, 0.5], domain_names=["one", "big"]).next_global_batch()
        MixtureSampler([1, 20], 8, [0.5, 0.5], domain_names=["one", "big"], rank=1, world_size=2).next_global_batch()
    assert len(caplog.records) == 1
    assert "from pass 4 with a fresh permutation (4 passes completed in this batch)." in caplog.records[0].getMessage()


# ---------------------------------------------------------------------------- g. weights that underflow
# All-zero, negative and NaN weights raise in MixtureSampler (test_mixture.py); zero-weight domains
# are never drawn (test_mixture.py, hypothesis).


@pytest.mark.parametrize("mode,alpha", [("no_smoothing", 0.5), ("ddk", 1.0)])
def test_factor_smoother_underflowing_weights_become_exact_zeros(mode: str, alpha: float) -> None:
    s = FactorSmoother(3, mode=mode, alpha=alpha)
    w = s.initialize([1.0, 720.0, 740.0])  # softmax would give a denormal ~1e-321 for domain 0
    assert w[0].item() == 0.0 and float(w.sum()) == pytest.approx(1.0, abs=1e-15)
    assert bool(((w == 0) | (w >= torch.finfo(torch.float64).tiny)).all())
    w2 = s.update([800.0, 1.0, 1.5])
    if mode == "ddk":  # alpha = 1: psi is proportional to r_t, so a zero weight stays zero
        assert w2[0].item() == 0.0
    else:  # no smoothing: the domain comes back as soon as the ratios say so
        assert w2[0].item() == pytest.approx(1.0)
    sampler = MixtureSampler([5, 5, 5], 6, w.tolist())
    assert all(0 not in sampler.domain_of(sampler.next_global_batch()).tolist() for _ in range(20))


def test_factor_smoother_ddk_floor_keeps_every_weight_positive() -> None:
    s = FactorSmoother(3, alpha=0.5)
    s.initialize([1.0, 720.0, 740.0])
    w = s.update([1.0, 720.0, 740.0])
    assert float(w.min()) >= (1 - 0.5) / 3 - 1e-15


def test_mixture_sampler_denormal_weights_are_renormalised() -> None:
    s = MixtureSampler([4, 4], 4, [5e-324, 5e-324])
    assert s.weights == (0.5, 0.5)
    t = MixtureSampler([4, 4], 4, [1e-320, 1.0])  # effectively zero: never drawn, exact counts kept
    assert all(0 not in t.domain_of(t.next_global_batch()).tolist() for _ in range(50))
    with pytest.raises(
        ValueError,
        match=r"^MixtureSampler: weights must have a positive sum \(at least one domain > 0\); got all zeros\.$",
    ):
        MixtureSampler([4, 4], 4, [0.0, 0.0])


# ---------------------------------------------------------------------------- h. corrupted JSONL
# read_jsonl's report (file and line of every bad line) is pinned in tests/ddk/recipes/test_corpus.py.


def _user_jsonl(path: Path, n: int = 12) -> Path:
    rows = [
        json.dumps({"domain": d, "source": f"{d}{i}", "text": f"{d} text number {i} " * 8})
        for d in ("a", "b")
        for i in range(n)
    ]
    rows.insert(3, '{"domain": "a", "text": "cut off')
    rows.insert(7, "not json at all")
    path.write_text("\n".join(rows) + "\n")
    return path


def test_build_corpus_corrupted_jsonl_lines_raise_with_file_and_line_unless_skipped(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    src = _user_jsonl(tmp_path / "user.jsonl")
    cfg = dict(domains=(), user_jsonl=(str(src),), max_chars=None, validation_fraction=0.25, offline=True)
    with pytest.raises(CorpusError) as info:
        build_corpus(tmp_path / "c1", CorpusConfig(**cfg), progress=False)
    msg = str(info.value)
    assert f"{src}:4: JSONDecodeError" in msg and f"{src}:8: JSONDecodeError" in msg and "2 corrupted line(s)" in msg
    assert "skip_bad_lines=True / --skip-bad-lines" in msg
    man = build_corpus(tmp_path / "c2", CorpusConfig(**cfg, skip_bad_lines=True), progress=False)
    assert man["skipped_lines"] == {str(src.resolve()): 2} and sorted(man["domains"]) == ["a", "b"]
    assert "skipped 2 corrupted line(s)" in capsys.readouterr().err
    assert CorpusConfig(**cfg).key() == CorpusConfig(**cfg, skip_bad_lines=True).key()


def test_corpus_readers_of_a_built_corpus_skip_only_when_asked(tmp_path: Path) -> None:
    src = _user_jsonl(tmp_path / "user.jsonl")
    out = tmp_path / "c"
    build_corpus(
        out,
        CorpusConfig(domains=(), user_jsonl=(str(src),), max_chars=None, validation_fraction=0.25, skip_bad_lines=True),
        progress=False,
    )
    train = out / "a" / "train.jsonl"
    n = len(read_jsonl(train))
    with train.open("a") as f:
        f.write('{"id": 1}\n')  # a record without "text"
    with pytest.raises(CorpusError, match=rf"{train}:{n + 1}: a record must have keys \['text'\]; missing \['text'\]"):
        domain_texts(out, "train", ["a"])
    assert len(domain_texts(out, "train", ["a"], on_error="skip")["a"]) == n


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


# ---------------------------------------------------------------------------- i. unknown config keys


def test_config_yaml_unknown_key_is_named_with_the_valid_ones(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("steps: 5\nalpah: 0.3\n")
    with pytest.raises(ValueError) as info:
        load_yaml(p)
    msg = str(info.value)
    assert msg.startswith(f"load_config: keys of {p} must be config options; got unknown ['alpah'] (valid: [")
    assert "'alpha'" in msg and "'on_nonfinite'" in msg and "'skip_bad_lines'" in msg
    with pytest.raises(
        ValueError,
        match=r"^make_config: overrides must be config options; got unknown \['alpah'\] \(valid: \[.*'alpha'",
    ):
        make_config(alpah=0.3)


# ---------------------------------------------------------------------------- recipe (b, e, a, h)
_HF = all(importlib.util.find_spec(m) is not None for m in ("transformers", "tokenizers"))


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    if not _HF:
        pytest.skip("needs transformers and tokenizers")
    from recipe_cases import own_cfg

    root = tmp_path_factory.mktemp("recipe")
    return root, own_cfg(root, steps=4, interval=2, log_every=1, checkpoint_every=2)


def test_recipe_teacher_with_another_tokenizer_is_an_error_naming_both(recipe, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    from hf_models import make_model, make_tokenizer

    from ddk.engine.models import load_models

    root, cfg = recipe
    other = tmp_path / "teacher"
    tok = make_tokenizer(tmp_path / "tok", vocab_size=310)  # another tokenizer of the same size class
    make_model("llama", len(tok) + 40).save_pretrained(str(other))
    tok.save_pretrained(str(other))
    with pytest.raises(ValueError) as info:
        load_models(dataclasses.replace(cfg, teacher=str(other)), torch.device("cpu"))
    msg = str(info.value)
    assert msg.startswith("distill: teacher and student must share a tokenizer; got different vocabularies in ")
    assert f"{str(other)!r} ({len(tok)} tokens) and {cfg.student!r} (" in msg


def test_recipe_teacher_vocabulary_narrower_is_an_error_wider_is_sliced(recipe) -> None:  # type: ignore[no-untyped-def]
    from hf_models import make_model
    from transformers import AutoTokenizer

    from ddk.engine.models import check_vocabularies

    root, cfg = recipe
    tok = AutoTokenizer.from_pretrained(cfg.student)
    student = make_model("llama", len(tok))
    with pytest.raises(
        ValueError,
        match=rf"^distill: the teacher's vocabulary must cover the student's \(a teacher wider "
        rf"by padding rows is sliced\); got teacher the teacher with {len(tok) - 1} rows "
        rf"and student the student with {len(tok)}\.",
    ):
        check_vocabularies(make_model("llama", len(tok) - 1), student, tok)
    check_vocabularies(make_model("llama", len(tok) + 8), student, tok)
    with pytest.raises(
        ValueError, match=rf"^distill: the student's vocabulary must cover the tokenizer's {len(tok)} tokens"
    ):
        check_vocabularies(student, make_model("llama", len(tok) - 2), tok)


def test_recipe_unknown_model_path_is_an_error_naming_it(recipe, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    from ddk.engine.models import load_models

    root, cfg = recipe
    missing = str(tmp_path / "no-such-teacher")
    with pytest.raises(
        ValueError,
        match=rf"^distill: teacher must be a folder written by save_pretrained \(or a hub "
        rf"name\); got '{missing}', which does not exist\.",
    ):
        load_models(dataclasses.replace(cfg, teacher=missing), torch.device("cpu"))


def test_recipe_record_without_domain_field_is_an_error_with_file_and_line_unless_skipped(
    recipe, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    from ddk.recipes.distill import distill

    root, cfg = recipe
    src = tmp_path / "mine.jsonl"
    lines = Path(cfg.data[0]).read_text().splitlines()
    lines.insert(4, json.dumps({"text": "no domain here"}))
    src.write_text("\n".join(lines) + "\n")
    bad = dataclasses.replace(cfg, data=(str(src),), out=str(tmp_path / "run"))
    with pytest.raises(ValueError, match=rf"{src}:5: "):
        distill(bad)
    with pytest.warns(UserWarning, match="1"):
        distill(dataclasses.replace(bad, skip_bad_records=True))
    assert (tmp_path / "run" / "student" / "config.json").is_file()


def test_recipe_domain_too_small_for_its_validation_split_is_an_error_naming_it(recipe, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    from ddk.recipes.distill import distill

    root, cfg = recipe
    src = tmp_path / "mine.jsonl"
    src.write_text(Path(cfg.data[0]).read_text() + json.dumps({"domain": "tiny", "text": "x y"}) + "\n")
    with pytest.raises(ValueError, match="tiny"):
        distill(dataclasses.replace(cfg, data=(str(src),), out=str(tmp_path / "run")))


def _nan_loss_at(step: int, hit: dict):  # type: ignore[no-untyped-def]
    """A ``causal_lm_kd_loss`` whose ``step``-th training call gives a NaN loss and NaN sums in its first domain."""
    import dataclasses as dc

    import ddk.engine.step as engine_step

    orig = engine_step.causal_lm_kd_loss

    def poisoned(*a, **kw):  # type: ignore[no-untyped-def]
        out = orig(*a, **kw)
        if not torch.is_grad_enabled():
            return out
        hit["calls"] = hit.get("calls", 0) + 1
        if hit["calls"] != step:
            return out
        d0 = int(kw["domain_ids"][0])
        hit["domain"] = d0
        sums = out.domain_ce_sum.clone()
        sums[d0] = float("nan")
        return dc.replace(out, loss=out.loss * float("nan"), domain_ce_sum=sums)

    return poisoned


def test_recipe_distill_nonfinite_raises_with_step_and_domain(recipe, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    import ddk.engine.step as engine_step
    import ddk.recipes.distill as distill_mod

    root, cfg = recipe
    hit: dict = {}
    monkeypatch.setattr(engine_step, "causal_lm_kd_loss", _nan_loss_at(2, hit))
    with pytest.raises(NonFiniteError) as info:
        distill_mod.distill(dataclasses.replace(cfg, out=str(root / "runs" / "raise")))
    name = ["code", "math", "prose"][hit["domain"]]
    msg = str(info.value)
    assert msg.startswith("distill: the loss and gradients must be finite; got loss=nan")
    assert f"at step 2 in the per-domain sums of domain(s) ['{name}']" in msg
    assert msg.endswith(
        "Pass --on-nonfinite skip (config on_nonfinite: skip) to skip such batches; the run resumes from "
        "its last checkpoint."
    )


def test_recipe_distill_nonfinite_skip_counts_in_metrics_and_summary(recipe, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    import ddk.engine.step as engine_step
    import ddk.recipes.distill as distill_mod

    root, cfg = recipe
    monkeypatch.setattr(engine_step, "causal_lm_kd_loss", _nan_loss_at(2, {}))
    c = dataclasses.replace(cfg, out=str(root / "runs" / "skip"), on_nonfinite="skip")
    summary = distill_mod.distill(c)
    assert summary["skipped_batches"] == 1 and summary["skipped_steps"] == [2]
    recs = {r["step"]: r for r in map(json.loads, (Path(c.out) / "metrics.jsonl").read_text().splitlines())}
    assert recs[2]["skipped"] is True and recs[2]["loss"] is None and recs[1]["skipped_batches"] == 0
    assert recs[4]["skipped_batches"] == 1 and "skipped" not in recs[3]
    assert json.loads((Path(c.out) / "summary.json").read_text())["skipped_batches"] == 1
    assert all(math.isfinite(x) for x in summary["student_ce"])


def test_recipe_flags_on_nonfinite_and_skip_bad_lines() -> None:
    from ddk.recipes.cli import build_parser
    from ddk.recipes.config import config_from_args

    args = build_parser().parse_args(["distill", "--on-nonfinite", "skip", "--skip-bad-lines"])
    cfg = config_from_args(args)
    assert cfg.on_nonfinite == "skip" and cfg.skip_bad_lines is True
    with pytest.raises(SystemExit):
        build_parser().parse_args(["distill", "--on-nonfinite", "ignore"])
